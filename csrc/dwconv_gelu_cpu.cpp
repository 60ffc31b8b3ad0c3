// CPU twin of dwconv_gelu.cu.
//
// Each thread takes a contiguous range of output rows. The five input rows that a row of
// outputs needs live in a ring, converted to fp32, zero-padded, and re-laid out in blocks of
// kBlock channels, (C / kBlock, W + 4, kBlock): the next output row stages one new input row
// with a single sequential read. The taps are laid out the same way, (C / kBlock, 25, kBlock),
// so every load of the multiply-add loop sits at a compile-time offset, the padding needs no
// special cases, and fp16/bf16 inputs are converted once rather than once per tap.
//
// The backward reuses the ring: one pass recomputes the pre-activation, forms
// g = grad_out * GELU'(pre-activation) and sums the weight and bias gradients; a second pass
// convolves g with the flipped taps for the input gradient.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "cpu_math.h"
#include "ltrm.h"

namespace mematte {
namespace {

constexpr int64_t kSize = 5;
constexpr int64_t kPad = 2;
// Channels per block and output pixels per step: kPixels x kBlock fp32 accumulators fill
// 8 AVX-512 or 16 AVX2 registers, and each tap's weights are loaded once per kPixels outputs.
constexpr int64_t kBlock = 32;
constexpr int64_t kPixels = 4;

// Rows per task of the backward's first pass. Tasks have a fixed size, so the weight and bias
// gradients (per-task partial sums added in task order) do not depend on the thread count.
constexpr int64_t kGradRowsPerTask = 16;
// Per task and channel: 25 weight-tap sums, then the bias sum.
constexpr int64_t kPartialRows = kSize * kSize + 1;

// A conv pass: out = epilogue(conv5x5(x) + bias), x of in_t, out of out_t.
template <typename in_t, typename out_t>
struct ConvArgs {
  const in_t* x;       // (B, H, W, C)
  const float* taps;   // (blocks, 25, kBlock), zero past C
  const float* bias;   // (blocks, kBlock), zero past C
  out_t* out;          // (B, H, W, C)
  int64_t H, W, C, blocks;
};

// The backward's first pass: the pre-activation recomputed from x, g = grad_out * GELU'(it),
// and per-task partial sums of the weight and bias gradients.
template <typename scalar_t>
struct GradArgs {
  const scalar_t* x;         // (B, H, W, C)
  const scalar_t* grad_out;  // (B, H, W, C)
  const float* taps;         // (blocks, 25, kBlock), zero past C
  const float* bias;         // (blocks, kBlock), zero past C
  float* g;                  // (B, H, W, C)
  float* partials;           // (tasks, blocks, kPartialRows, kBlock)
  int64_t H, W, C, blocks, tasks_per_image;
};

// A thread's ring of five staged input rows, each (blocks, W' + 4, kBlock) with W' = W rounded
// up to kPixels. Only the W real columns are ever written; the columns around them stay 0.
class RowRing {
 public:
  RowRing(int64_t W, int64_t blocks)
      : block_stride_((padded_width(W) + 2 * kPad) * kBlock),
        row_stride_(blocks * block_stride_),
        data_(kSize * row_stride_, 0.0f) {}

  static int64_t padded_width(int64_t W) { return (W + kPixels - 1) / kPixels * kPixels; }

  // Staged input row r (r >= -kPad), block 0; block b is b * block_stride() further.
  float* row(int64_t r) { return data_.data() + ((r + kPad) % kSize) * row_stride_; }
  int64_t block_stride() const { return block_stride_; }

  // The staged rows h - 2 .. h + 2 of block b: the inputs of output row h.
  MEMATTE_INLINE void rows_around(int64_t h, int64_t b, const float* (&rows)[kSize]) {
    for (int64_t i = 0; i < kSize; ++i) rows[i] = row(h + i - kPad) + b * block_stride_;
  }

 private:
  int64_t block_stride_;
  int64_t row_stride_;
  std::vector<float> data_;
};

// Input row h of `image` (H, W, C) into the ring (zeros if h is in the padding; channels past
// C are 0 so that the last block computes on zeros, never on garbage).
template <typename in_t>
MEMATTE_INLINE void stage_row(const in_t* image, int64_t h, int64_t H, int64_t W, int64_t C, int64_t blocks,
                              RowRing& ring) {
  float* staged = ring.row(h) + kPad * kBlock;
  const int64_t stride = ring.block_stride();
  if (h < 0 || h >= H) {
    for (int64_t b = 0; b < blocks; ++b) std::fill(staged + b * stride, staged + b * stride + W * kBlock, 0.0f);
    return;
  }
  const int64_t full_blocks = C / kBlock, tail = C % kBlock;
  for (int64_t w = 0; w < W; ++w) {
    const in_t* __restrict src = image + (h * W + w) * C;
    float* __restrict dst = staged + w * kBlock;
    for (int64_t b = 0; b < full_blocks; ++b) {
      for (int64_t c = 0; c < kBlock; ++c) dst[b * stride + c] = cpu::to_float(src[b * kBlock + c]);
    }
    if (tail != 0) {
      for (int64_t c = 0; c < kBlock; ++c) {
        dst[full_blocks * stride + c] = c < tail ? cpu::to_float(src[full_blocks * kBlock + c]) : 0.0f;
      }
    }
  }
}

// conv5x5 + bias of the kPixels outputs w0 .. w0 + kPixels - 1 of one row, channels of one
// block, from that block's five staged input rows.
MEMATTE_INLINE void conv_pixels(const float* const (&in_rows)[kSize], const float* __restrict taps,
                                const float* __restrict bias, int64_t w0, float (&acc)[kPixels][kBlock]) {
  for (int64_t p = 0; p < kPixels; ++p)
    for (int64_t c = 0; c < kBlock; ++c) acc[p][c] = bias[c];
  for (int64_t i = 0; i < kSize; ++i) {
    // Staged column w + j holds input column w + j - 2.
    const float* __restrict in = in_rows[i] + w0 * kBlock;
    for (int64_t j = 0; j < kSize; ++j) {
      const float* __restrict tap = taps + (i * kSize + j) * kBlock;
      for (int64_t p = 0; p < kPixels; ++p)
        for (int64_t c = 0; c < kBlock; ++c) acc[p][c] += tap[c] * in[(j + p) * kBlock + c];
    }
  }
}

// Output row h, channels of block b, kPixels outputs at a time; GELU applied when kGelu.
template <bool kGelu, typename in_t, typename out_t>
MEMATTE_INLINE void conv_row_block(const ConvArgs<in_t, out_t>& a, RowRing& ring, int64_t h, int64_t b,
                                   out_t* __restrict out_row) {
  const float* in_rows[kSize];
  ring.rows_around(h, b, in_rows);
  const float* taps = a.taps + b * kSize * kSize * kBlock;
  const float* bias = a.bias + b * kBlock;
  const int64_t c0 = b * kBlock, n = std::min(kBlock, a.C - c0);
  for (int64_t w0 = 0; w0 < a.W; w0 += kPixels) {
    float acc[kPixels][kBlock];
    conv_pixels(in_rows, taps, bias, w0, acc);
    for (int64_t p = 0; p < std::min(kPixels, a.W - w0); ++p) {
      out_t* __restrict out = out_row + (w0 + p) * a.C + c0;
      for (int64_t c = 0; c < n; ++c) out[c] = cpu::from_float<out_t>(kGelu ? cpu::gelu(acc[p][c]) : acc[p][c]);
    }
  }
}

template <bool kGelu, typename in_t, typename out_t>
MEMATTE_INLINE void conv_rows_impl(const ConvArgs<in_t, out_t>& a, int64_t row_begin, int64_t row_end) {
  RowRing ring(a.W, a.blocks);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t h = row % a.H;
    const in_t* image = a.x + (row - h) * a.W * a.C;
    if (row == row_begin || h == 0) {
      for (int64_t r = h - kPad; r < h + kPad; ++r) stage_row(image, r, a.H, a.W, a.C, a.blocks, ring);
    }
    stage_row(image, h + kPad, a.H, a.W, a.C, a.blocks, ring);
    for (int64_t b = 0; b < a.blocks; ++b) conv_row_block<kGelu>(a, ring, h, b, a.out + row * a.W * a.C);
  }
}

// Task `task` of the backward's first pass: rows h_begin .. h_begin + kGradRowsPerTask - 1 of
// one image. For each row and channel block, g = grad_out * GELU'(conv5x5(x) + bias) is
// written out, and the row's contribution to the weight gradient, sum_w g[w] * x[h + i - 2,
// w + j - 2] per tap (i, j), and to the bias gradient, sum_w g[w], is added to the task's sums.
template <typename scalar_t>
MEMATTE_INLINE void gelu_grad_rows_impl(const GradArgs<scalar_t>& a, int64_t task) {
  const int64_t h_begin = (task % a.tasks_per_image) * kGradRowsPerTask;
  const int64_t h_end = std::min(a.H, h_begin + kGradRowsPerTask);
  const int64_t image = (task / a.tasks_per_image) * a.H * a.W * a.C;
  RowRing ring(a.W, a.blocks);
  for (int64_t r = h_begin - kPad; r < h_begin + kPad; ++r) stage_row(a.x + image, r, a.H, a.W, a.C, a.blocks, ring);
  float* partial = a.partials + task * a.blocks * kPartialRows * kBlock;
  std::fill(partial, partial + a.blocks * kPartialRows * kBlock, 0.0f);
  // g of one row and block, (W', kBlock); channels past C stay 0.
  std::vector<float> g_block(RowRing::padded_width(a.W) * kBlock, 0.0f);

  for (int64_t h = h_begin; h < h_end; ++h) {
    stage_row(a.x + image, h + kPad, a.H, a.W, a.C, a.blocks, ring);
    const int64_t row = image + h * a.W * a.C;
    for (int64_t b = 0; b < a.blocks; ++b) {
      const float* in_rows[kSize];
      ring.rows_around(h, b, in_rows);
      const int64_t c0 = b * kBlock, n = std::min(kBlock, a.C - c0);
      for (int64_t w0 = 0; w0 < a.W; w0 += kPixels) {
        float acc[kPixels][kBlock];
        conv_pixels(in_rows, a.taps + b * kSize * kSize * kBlock, a.bias + b * kBlock, w0, acc);
        for (int64_t p = 0; p < std::min(kPixels, a.W - w0); ++p) {
          const scalar_t* __restrict grad = a.grad_out + row + (w0 + p) * a.C + c0;
          float* __restrict g = g_block.data() + (w0 + p) * kBlock;
          float* __restrict g_out = a.g + row + (w0 + p) * a.C + c0;
          for (int64_t c = 0; c < n; ++c) g[c] = cpu::to_float(grad[c]) * cpu::gelu_grad(acc[p][c]);
          for (int64_t c = 0; c < n; ++c) g_out[c] = g[c];
        }
      }

      float* __restrict sums = partial + b * kPartialRows * kBlock;
      const float* __restrict g = g_block.data();
      for (int64_t i = 0; i < kSize; ++i) {
        for (int64_t j = 0; j < kSize; ++j) {
          const float* __restrict in = in_rows[i] + j * kBlock;
          float* __restrict tap_sum = sums + (i * kSize + j) * kBlock;
          float acc[kBlock];
          for (int64_t c = 0; c < kBlock; ++c) acc[c] = tap_sum[c];
          for (int64_t w = 0; w < a.W; ++w)
            for (int64_t c = 0; c < kBlock; ++c) acc[c] += g[w * kBlock + c] * in[w * kBlock + c];
          for (int64_t c = 0; c < kBlock; ++c) tap_sum[c] = acc[c];
        }
      }
      float* __restrict bias_sum = sums + kSize * kSize * kBlock;
      float acc[kBlock];
      for (int64_t c = 0; c < kBlock; ++c) acc[c] = bias_sum[c];
      for (int64_t w = 0; w < a.W; ++w)
        for (int64_t c = 0; c < kBlock; ++c) acc[c] += g[w * kBlock + c];
      for (int64_t c = 0; c < kBlock; ++c) bias_sum[c] = acc[c];
    }
  }
}

// One non-template overload per dtype: target_clones needs a plain function to clone.
#define MEMATTE_DWCONV_KERNELS(scalar_t)                                                                 \
  MEMATTE_CPU_CLONES void dwconv_gelu_rows(const ConvArgs<scalar_t, scalar_t>& a, int64_t begin, int64_t end) { \
    conv_rows_impl<true>(a, begin, end);                                                                  \
  }                                                                                                       \
  MEMATTE_CPU_CLONES void conv_rows(const ConvArgs<float, scalar_t>& a, int64_t begin, int64_t end) {    \
    conv_rows_impl<false>(a, begin, end);                                                                 \
  }                                                                                                       \
  MEMATTE_CPU_CLONES void gelu_grad_rows(const GradArgs<scalar_t>& a, int64_t task) { gelu_grad_rows_impl(a, task); }
MEMATTE_DWCONV_KERNELS(float)
MEMATTE_DWCONV_KERNELS(c10::Half)
MEMATTE_DWCONV_KERNELS(c10::BFloat16)
#undef MEMATTE_DWCONV_KERNELS

// The weights (C, 1, 5, 5) in the ring's block layout (blocks, 25, kBlock), fp32, zero past C.
// Flipped, tap (i, j) holds weight (4 - i, 4 - j): the conv whose result is the input gradient.
at::Tensor blocked_taps(const at::Tensor& weight, bool flipped) {
  const int64_t C = weight.size(0), blocks = (C + kBlock - 1) / kBlock;
  const at::Tensor weight_fp32 = weight.to(at::kFloat).contiguous();
  at::Tensor taps = at::zeros({blocks, kSize * kSize, kBlock}, weight_fp32.options());
  const float* src = weight_fp32.const_data_ptr<float>();
  float* dst = taps.mutable_data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t tap = 0; tap < kSize * kSize; ++tap) {
      const int64_t from = flipped ? kSize * kSize - 1 - tap : tap;
      dst[((c / kBlock) * kSize * kSize + tap) * kBlock + c % kBlock] = src[c * kSize * kSize + from];
    }
  }
  return taps;
}

// The bias (C) as (blocks, kBlock), fp32, zero past C.
at::Tensor blocked_bias(const at::Tensor& bias) {
  const int64_t C = bias.size(0), blocks = (C + kBlock - 1) / kBlock;
  const at::Tensor bias_fp32 = bias.to(at::kFloat).contiguous();
  at::Tensor blocked = at::zeros({blocks, kBlock}, bias_fp32.options());
  std::copy_n(bias_fp32.const_data_ptr<float>(), C, blocked.mutable_data_ptr<float>());
  return blocked;
}

}  // namespace

at::Tensor dwconv_gelu_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  const at::Tensor taps = blocked_taps(weight, /*flipped=*/false);
  const at::Tensor bias_blocked = blocked_bias(bias);
  MEMATTE_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "dwconv_gelu_cpu", [&] {
    const ConvArgs<scalar_t, scalar_t> args{x.const_data_ptr<scalar_t>(), taps.const_data_ptr<float>(),
                                            bias_blocked.const_data_ptr<float>(), out.mutable_data_ptr<scalar_t>(),
                                            H, W, C, taps.size(0)};
    // Contiguous row ranges let the ring reuse 4 of its 5 staged rows from one row to the next.
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) { dwconv_gelu_rows(args, begin, end); });
  });
  return out;
}

// The pre-activation is recomputed (25 multiply-adds an element) rather than kept alive from
// forward to backward as another (B, H, W, C) tensor; g is one fp32 (B, H, W, C) temporary.
std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_gelu_backward_cpu(const at::Tensor& grad_out,
                                                                       const at::Tensor& x,
                                                                       const at::Tensor& weight,
                                                                       const at::Tensor& bias) {
  at::Tensor grad_x = at::empty_like(x);
  if (x.numel() == 0) {
    return {grad_x, at::zeros(weight.sizes(), weight.options()), at::zeros(bias.sizes(), bias.options())};
  }
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  const at::Tensor taps = blocked_taps(weight, /*flipped=*/false);
  const at::Tensor flipped_taps = blocked_taps(weight, /*flipped=*/true);
  const at::Tensor bias_blocked = blocked_bias(bias);
  const at::Tensor zero_bias = at::zeros_like(bias_blocked);
  const int64_t blocks = taps.size(0);
  const int64_t tasks_per_image = (H + kGradRowsPerTask - 1) / kGradRowsPerTask;
  const int64_t tasks = B * tasks_per_image;
  const at::TensorOptions fp32 = x.options().dtype(at::kFloat);
  at::Tensor g = at::empty({B, H, W, C}, fp32);
  at::Tensor partials = at::empty({tasks, blocks, kPartialRows, kBlock}, fp32);

  MEMATTE_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "dwconv_gelu_backward_cpu", [&] {
    const GradArgs<scalar_t> grad_args{x.const_data_ptr<scalar_t>(),     grad_out.const_data_ptr<scalar_t>(),
                                       taps.const_data_ptr<float>(),      bias_blocked.const_data_ptr<float>(),
                                       g.mutable_data_ptr<float>(),       partials.mutable_data_ptr<float>(),
                                       H, W, C, blocks, tasks_per_image};
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) gelu_grad_rows(grad_args, task);
    });
    const ConvArgs<float, scalar_t> dx_args{g.const_data_ptr<float>(), flipped_taps.const_data_ptr<float>(),
                                            zero_bias.const_data_ptr<float>(), grad_x.mutable_data_ptr<scalar_t>(),
                                            H, W, C, blocks};
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) { conv_rows(dx_args, begin, end); });
  });

  // The task sums in task order, out of the block layout.
  at::Tensor grad_weight = at::empty({C, kSize * kSize}, fp32);
  at::Tensor grad_bias = at::empty({C}, fp32);
  std::vector<float> total(blocks * kPartialRows * kBlock, 0.0f);
  const float* sums = partials.const_data_ptr<float>();
  for (int64_t task = 0; task < tasks; ++task) {
    for (size_t i = 0; i < total.size(); ++i) total[i] += sums[task * total.size() + i];
  }
  float* dw = grad_weight.mutable_data_ptr<float>();
  float* db = grad_bias.mutable_data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    const float* channel = total.data() + (c / kBlock) * kPartialRows * kBlock + c % kBlock;
    for (int64_t tap = 0; tap < kSize * kSize; ++tap) dw[c * kSize * kSize + tap] = channel[tap * kBlock];
    db[c] = channel[kSize * kSize * kBlock];
  }
  return {grad_x, grad_weight.view(weight.sizes()).to(weight.scalar_type()), grad_bias.to(bias.scalar_type())};
}

}  // namespace mematte
