// CPU twin of dwconv_gelu.cu.
//
// Each thread takes a contiguous range of output rows. The five input rows that a row of
// outputs needs live in a ring, converted to fp32, zero-padded, and re-laid out in blocks of
// kBlock channels, (C / kBlock, W + 4, kBlock): the next output row stages one new input row
// with a single sequential read. The taps are laid out the same way, (C / kBlock, 25, kBlock),
// so every load of the multiply-add loop sits at a compile-time offset, the padding needs no
// special cases, and fp16/bf16 inputs are converted once rather than once per tap.
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
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

template <typename scalar_t>
struct DwconvArgs {
  const scalar_t* x;   // (B, H, W, C)
  const float* taps;   // (blocks, 25, kBlock), zero past C
  const float* bias;   // (blocks, kBlock), zero past C
  scalar_t* out;       // (B, H, W, C)
  int64_t H, W, C, blocks;
};

// A thread's ring of five staged input rows, each (blocks, W' + 4, kBlock) with W' = W rounded
// up to kPixels. Only the W real columns are ever written; the columns around them stay 0.
class RowRing {
 public:
  RowRing(int64_t W, int64_t blocks)
      : block_stride_(((W + kPixels - 1) / kPixels * kPixels + 2 * kPad) * kBlock),
        row_stride_(blocks * block_stride_),
        data_(kSize * row_stride_, 0.0f) {}

  // Staged input row r (r >= -kPad), block 0; block b is b * block_stride() further.
  float* row(int64_t r) { return data_.data() + ((r + kPad) % kSize) * row_stride_; }
  int64_t block_stride() const { return block_stride_; }

 private:
  int64_t block_stride_;
  int64_t row_stride_;
  std::vector<float> data_;
};

// Input row h of `image` into the ring (zeros if h is in the padding; channels past C are 0
// so that the last block computes on zeros, never on garbage).
template <typename scalar_t>
MEMATTE_INLINE void stage_row(const DwconvArgs<scalar_t>& a, const scalar_t* image, int64_t h, RowRing& ring) {
  float* staged = ring.row(h) + kPad * kBlock;
  const int64_t stride = ring.block_stride();
  if (h < 0 || h >= a.H) {
    for (int64_t b = 0; b < a.blocks; ++b) std::fill(staged + b * stride, staged + b * stride + a.W * kBlock, 0.0f);
    return;
  }
  const int64_t full_blocks = a.C / kBlock, tail = a.C % kBlock;
  for (int64_t w = 0; w < a.W; ++w) {
    const scalar_t* __restrict src = image + (h * a.W + w) * a.C;
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

// Output row h, channels of block b, from the five staged input rows h - 2 .. h + 2,
// kPixels outputs at a time.
template <typename scalar_t>
MEMATTE_INLINE void conv_row_block(const DwconvArgs<scalar_t>& a, RowRing& ring, int64_t h, int64_t b,
                                   scalar_t* __restrict out_row) {
  const float* in_rows[kSize];
  for (int64_t i = 0; i < kSize; ++i) in_rows[i] = ring.row(h + i - kPad) + b * ring.block_stride();
  const float* __restrict taps = a.taps + b * kSize * kSize * kBlock;
  const float* __restrict bias = a.bias + b * kBlock;
  const int64_t c0 = b * kBlock, n = std::min(kBlock, a.C - c0);
  for (int64_t w0 = 0; w0 < a.W; w0 += kPixels) {
    float acc[kPixels][kBlock];
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
    for (int64_t p = 0; p < std::min(kPixels, a.W - w0); ++p) {
      scalar_t* __restrict out = out_row + (w0 + p) * a.C + c0;
      for (int64_t c = 0; c < n; ++c) out[c] = cpu::from_float<scalar_t>(cpu::gelu(acc[p][c]));
    }
  }
}

template <typename scalar_t>
MEMATTE_INLINE void dwconv_gelu_rows_impl(const DwconvArgs<scalar_t>& a, int64_t row_begin, int64_t row_end) {
  RowRing ring(a.W, a.blocks);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t h = row % a.H;
    const scalar_t* image = a.x + (row - h) * a.W * a.C;
    if (row == row_begin || h == 0) {
      for (int64_t r = h - kPad; r < h + kPad; ++r) stage_row(a, image, r, ring);
    }
    stage_row(a, image, h + kPad, ring);
    for (int64_t b = 0; b < a.blocks; ++b) conv_row_block(a, ring, h, b, a.out + row * a.W * a.C);
  }
}

// One non-template overload per dtype: target_clones needs a plain function to clone.
MEMATTE_CPU_CLONES void dwconv_gelu_rows(const DwconvArgs<float>& a, int64_t begin, int64_t end) {
  dwconv_gelu_rows_impl(a, begin, end);
}
MEMATTE_CPU_CLONES void dwconv_gelu_rows(const DwconvArgs<c10::Half>& a, int64_t begin, int64_t end) {
  dwconv_gelu_rows_impl(a, begin, end);
}
MEMATTE_CPU_CLONES void dwconv_gelu_rows(const DwconvArgs<c10::BFloat16>& a, int64_t begin, int64_t end) {
  dwconv_gelu_rows_impl(a, begin, end);
}

}  // namespace

at::Tensor dwconv_gelu_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  const int64_t blocks = (C + kBlock - 1) / kBlock;

  // Weights in the ring's block layout, fp32, zero past C.
  const at::Tensor weight_fp32 = weight.to(at::kFloat).contiguous();  // (C, 1, 5, 5)
  const at::Tensor bias_fp32 = bias.to(at::kFloat).contiguous();
  at::Tensor taps = at::zeros({blocks, kSize * kSize, kBlock}, weight_fp32.options());
  at::Tensor bias_blocked = at::zeros({blocks, kBlock}, weight_fp32.options());
  const float* w_src = weight_fp32.const_data_ptr<float>();
  float* taps_dst = taps.mutable_data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t tap = 0; tap < kSize * kSize; ++tap) {
      taps_dst[((c / kBlock) * kSize * kSize + tap) * kBlock + c % kBlock] = w_src[c * kSize * kSize + tap];
    }
  }
  std::copy_n(bias_fp32.const_data_ptr<float>(), C, bias_blocked.mutable_data_ptr<float>());

  MEMATTE_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "dwconv_gelu_cpu", [&] {
    const DwconvArgs<scalar_t> args{x.const_data_ptr<scalar_t>(), taps.const_data_ptr<float>(),
                                    bias_blocked.const_data_ptr<float>(), out.mutable_data_ptr<scalar_t>(),
                                    H, W, C, blocks};
    // Contiguous row ranges let the ring reuse 4 of its 5 staged rows from one row to the next.
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) { dwconv_gelu_rows(args, begin, end); });
  });
  return out;
}

}  // namespace mematte
