// Depthwise 5x5 conv (padding 2) + bias + exact GELU on channels-last (B, H, W, C).
//
// A thread owns kVec consecutive channels of one output column w and kRowsPerThread
// consecutive output rows. It keeps its 25 x kVec weights in registers and walks the
// kRowsPerThread + 4 input rows once, each loaded row feeding every output row it touches.
// Consecutive threads take consecutive channel vectors, so a warp reads and writes whole
// contiguous runs of a pixel's channels; the horizontal neighbours a thread shares with the
// threads of columns w +- 1, w +- 2 come from L1.
//
// The backward's first kernel gives each thread kGradVec channels of a chunk of rows and walks
// every row left to right with the 5x5 input window in registers: it recomputes the
// pre-activation, writes g = grad_out * GELU'(pre-activation) in fp32, and sums g * window
// (the weight gradient) and g (the bias gradient) over its pixels. A small kernel adds the
// chunk sums in chunk order, without atomics, so the result is reproducible. The input
// gradient, the conv of g with the flipped taps, is the forward kernel without bias and GELU.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "cuda_utils.cuh"
#include "ltrm.h"

namespace mematte {
namespace {

using cuda::ceil_div;
using cuda::load_as_float;
using cuda::store_from_float;

constexpr int kSize = 5;
constexpr int kPad = 2;
// 8 input rows loaded per 4 output rows; with the weights in registers this is ~170 registers
// a thread (ptxas, sm_90), so about 12 warps per SM, each with long runs of independent FMAs.
constexpr int kRowsPerThread = 4;
constexpr int kThreads = 128;
constexpr int kMaxGridY = 65535;

// The backward's first kernel: 2 channels a thread keep its window, taps and sums (3 x 50
// floats) in registers; fp32 accesses are 8 bytes, bf16 4, a warp's still contiguous.
constexpr int kGradVec = 2;
constexpr int kGradThreads = 128;
constexpr int kGradSums = kSize * kSize + 1;  // 25 weight taps, then the bias
// Blocks per SM to aim for in the backward's first kernel.
constexpr int kBlocksPerSm = 4;

// out = GELU(conv5x5(x) + bias) when kForward, else out = conv5x5(x) (the input gradient, from
// g and the flipped taps).
// grid.x covers (w, channel vector) pairs of one row; grid.y covers (image, row tile) pairs,
// striding when there are more of them than grid.y allows.
template <typename in_t, typename out_t, int kVec, bool kForward>
__global__ void __launch_bounds__(kThreads)
dwconv_kernel(const in_t* __restrict__ x, const float* __restrict__ taps, const float* __restrict__ bias,
              out_t* __restrict__ out, int B, int H, int W, int C) {
  const int vecs_per_pixel = C / kVec;
  const int pixel_vec = blockIdx.x * kThreads + threadIdx.x;
  if (pixel_vec >= W * vecs_per_pixel) return;
  const int w = pixel_vec / vecs_per_pixel;
  const int c = (pixel_vec % vecs_per_pixel) * kVec;

  float weight[kSize * kSize][kVec];
#pragma unroll
  for (int tap = 0; tap < kSize * kSize; ++tap) load_as_float<float, kVec>(taps + tap * C + c, weight[tap]);
  float bias_vec[kVec] = {};
  if constexpr (kForward) load_as_float<float, kVec>(bias + c, bias_vec);

  const int row_tiles = ceil_div(H, kRowsPerThread);
  for (int tile = blockIdx.y; tile < B * row_tiles; tile += gridDim.y) {
    const int b = tile / row_tiles;
    const int h0 = (tile % row_tiles) * kRowsPerThread;
    const int64_t image = static_cast<int64_t>(b) * H * W * C;

    float acc[kRowsPerThread][kVec];
#pragma unroll
    for (int o = 0; o < kRowsPerThread; ++o)
#pragma unroll
      for (int k = 0; k < kVec; ++k) acc[o][k] = bias_vec[k];

#pragma unroll
    for (int r = 0; r < kRowsPerThread + kSize - 1; ++r) {
      const int h_in = h0 - kPad + r;
      if (h_in < 0 || h_in >= H) continue;  // zero padding
      float in[kSize][kVec];
#pragma unroll
      for (int j = 0; j < kSize; ++j) {
        const int w_in = w - kPad + j;
        if (w_in >= 0 && w_in < W) {
          load_as_float<in_t, kVec>(x + image + (static_cast<int64_t>(h_in) * W + w_in) * C + c, in[j]);
        } else {
#pragma unroll
          for (int k = 0; k < kVec; ++k) in[j][k] = 0.0f;
        }
      }
      // Input row r is kernel row i = r - o of output row o; after unrolling, the pairs
      // outside the kernel are dropped at compile time.
#pragma unroll
      for (int o = 0; o < kRowsPerThread; ++o) {
        const int i = r - o;
        if (i < 0 || i >= kSize) continue;
#pragma unroll
        for (int j = 0; j < kSize; ++j)
#pragma unroll
          for (int k = 0; k < kVec; ++k) acc[o][k] = fmaf(weight[i * kSize + j][k], in[j][k], acc[o][k]);
      }
    }

#pragma unroll
    for (int o = 0; o < kRowsPerThread; ++o) {
      if (h0 + o >= H) break;
      float y[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) y[k] = kForward ? acc[o][k] * normcdff(acc[o][k]) : acc[o][k];  // x * Phi(x)
      store_from_float<out_t, kVec>(y, out + image + (static_cast<int64_t>(h0 + o) * W + w) * C + c);
    }
  }
}

// x[h, w, c .. c + kVec) of one image as fp32, zeros outside the image (the conv's padding).
template <typename scalar_t, int kVec>
__device__ __forceinline__ void load_or_zero(const scalar_t* __restrict__ image, int h, int w, int H, int W, int C,
                                             int c, float (&dst)[kVec]) {
  if (h >= 0 && h < H && w >= 0 && w < W) {
    load_as_float<scalar_t, kVec>(image + (static_cast<int64_t>(h) * W + w) * C + c, dst);
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) dst[k] = 0.0f;
  }
}

// The backward's first kernel. grid.x covers channel vectors, grid.y the tasks: chunks of
// rows_per_task rows of one image. Writes g (B, H, W, C) fp32 and the task's sums
// partials[task] (kGradSums, C): sum g * x[h + i - 2, w + j - 2] for tap (i, j), then sum g.
template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kGradThreads)
dwconv_gelu_grad_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ grad_out,
                        const float* __restrict__ taps, const float* __restrict__ bias, float* __restrict__ g,
                        float* __restrict__ partials, int H, int W, int C, int rows_per_task, int tasks_per_image) {
  const int c = (blockIdx.x * kGradThreads + threadIdx.x) * kVec;
  if (c >= C) return;
  const int task = blockIdx.y;
  const int h_begin = (task % tasks_per_image) * rows_per_task;
  const int h_end = min(H, h_begin + rows_per_task);
  const int64_t image = static_cast<int64_t>(task / tasks_per_image) * H * W * C;
  constexpr float kInvSqrt2Pi = 0.3989422804014327f;

  float weight[kSize * kSize][kVec];
#pragma unroll
  for (int tap = 0; tap < kSize * kSize; ++tap) load_as_float<float, kVec>(taps + tap * C + c, weight[tap]);
  float bias_vec[kVec];
  load_as_float<float, kVec>(bias + c, bias_vec);
  float sums[kGradSums][kVec] = {};

  for (int h = h_begin; h < h_end; ++h) {
    // window[i][j] = x[h + i - 2, w + j - 2]; before the first shift, columns -2 .. 1.
    float window[kSize][kSize][kVec];
#pragma unroll
    for (int i = 0; i < kSize; ++i)
#pragma unroll
      for (int j = 1; j < kSize; ++j) {
        load_or_zero<scalar_t, kVec>(x + image, h + i - kPad, j - 1 - kPad, H, W, C, c, window[i][j]);
      }

    for (int w = 0; w < W; ++w) {
      float pre[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) pre[k] = bias_vec[k];
#pragma unroll
      for (int i = 0; i < kSize; ++i) {
#pragma unroll
        for (int j = 0; j < kSize - 1; ++j)
#pragma unroll
          for (int k = 0; k < kVec; ++k) window[i][j][k] = window[i][j + 1][k];
        load_or_zero<scalar_t, kVec>(x + image, h + i - kPad, w + kPad, H, W, C, c, window[i][kSize - 1]);
#pragma unroll
        for (int j = 0; j < kSize; ++j)
#pragma unroll
          for (int k = 0; k < kVec; ++k) pre[k] = fmaf(weight[i * kSize + j][k], window[i][j][k], pre[k]);
      }

      const int64_t offset = image + (static_cast<int64_t>(h) * W + w) * C + c;
      float grad[kVec];
      load_as_float<scalar_t, kVec>(grad_out + offset, grad);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        // GELU'(y) = Phi(y) + y * phi(y)
        const float y = pre[k];
        grad[k] *= normcdff(y) + y * kInvSqrt2Pi * expf(-0.5f * y * y);
      }
      store_from_float<float, kVec>(grad, g + offset);
#pragma unroll
      for (int tap = 0; tap < kSize * kSize; ++tap)
#pragma unroll
        for (int k = 0; k < kVec; ++k) sums[tap][k] = fmaf(grad[k], window[tap / kSize][tap % kSize][k], sums[tap][k]);
#pragma unroll
      for (int k = 0; k < kVec; ++k) sums[kGradSums - 1][k] += grad[k];
    }
  }

  float* dst = partials + static_cast<int64_t>(task) * kGradSums * C + c;
#pragma unroll
  for (int s = 0; s < kGradSums; ++s) store_from_float<float, kVec>(sums[s], dst + static_cast<int64_t>(s) * C);
}

// sums[s, c] = sum over tasks of partials[task, s, c], in task order: reproducible, no atomics.
__global__ void __launch_bounds__(kThreads)
sum_partials_kernel(const float* __restrict__ partials, float* __restrict__ sums, int tasks, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= n) return;
  float total = 0.0f;
  for (int task = 0; task < tasks; ++task) total += partials[task * n + i];
  sums[i] = total;
}

// The weights as fp32 (25, C), tap-major: a thread's kVec channels of one tap are contiguous.
at::Tensor taps_fp32(const at::Tensor& weight) {
  return weight.reshape({weight.size(0), kSize * kSize}).t().to(at::kFloat).contiguous();
}

template <typename in_t, typename out_t, int kVec, bool kForward>
void launch_dwconv(const at::Tensor& x, const at::Tensor& taps, const float* bias, at::Tensor& out) {
  const int B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  const dim3 grid(ceil_div(static_cast<int64_t>(W) * (C / kVec), kThreads),
                  std::min<int64_t>(static_cast<int64_t>(B) * ceil_div(H, kRowsPerThread), kMaxGridY));
  dwconv_kernel<in_t, out_t, kVec, kForward><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      x.const_data_ptr<in_t>(), taps.const_data_ptr<float>(), bias, out.mutable_data_ptr<out_t>(), B, H, W, C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_size(const char* op, const at::Tensor& x) {
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(x.size(0) * x.size(1) <= kIntMax && x.size(2) * x.size(3) <= kIntMax, "mematte_ext.", op,
              ": x of shape ", x.sizes(), " is too large for the CUDA kernel's 32-bit indices");
}

}  // namespace

at::Tensor dwconv_gelu_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  check_size("dwconv_gelu", x);
  const at::Tensor taps = taps_fp32(weight);
  // A float32 bias is used as it is, so it may sit anywhere in its storage.
  const at::Tensor bias_fp32 = bias.to(at::kFloat).contiguous();
  // 4 channels per thread: 16-byte fp32 and 8-byte fp16/bf16 accesses, and 100 weight registers.
  constexpr int kVec = 4;
  MEMATTE_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "dwconv_gelu_cuda", [&] {
    const float* bias_data = bias_fp32.const_data_ptr<float>();
    if (cuda::vector_aligned<kVec>(x.size(3), x.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>()) &&
        cuda::vector_aligned<kVec>(x.size(3), bias_data)) {
      launch_dwconv<scalar_t, scalar_t, kVec, true>(x, taps, bias_data, out);
    } else {
      launch_dwconv<scalar_t, scalar_t, 1, true>(x, taps, bias_data, out);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_gelu_backward_cuda(const at::Tensor& grad_out,
                                                                        const at::Tensor& x,
                                                                        const at::Tensor& weight,
                                                                        const at::Tensor& bias) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor grad_x = at::empty_like(x);
  if (x.numel() == 0) {
    return {grad_x, at::zeros(weight.sizes(), weight.options()), at::zeros(bias.sizes(), bias.options())};
  }
  check_size("dwconv_gelu_backward", x);
  const int B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  const at::Tensor taps = taps_fp32(weight);
  const at::Tensor flipped_taps = taps_fp32(weight.flip({2, 3}));
  const at::Tensor bias_fp32 = bias.to(at::kFloat).contiguous();

  // Enough (image, row chunk) tasks to fill the GPU, each at least one row.
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, x.get_device()));
  const int channel_blocks = ceil_div(ceil_div(C, kGradVec), kGradThreads);
  const int wanted = std::max(1, ceil_div(kBlocksPerSm * sm_count, static_cast<int64_t>(channel_blocks) * B));
  const int rows_per_task = ceil_div(H, std::min<int64_t>({wanted, H, kMaxGridY / B}));
  const int tasks_per_image = ceil_div(H, rows_per_task);
  TORCH_CHECK(static_cast<int64_t>(B) * tasks_per_image <= kMaxGridY, "mematte_ext.dwconv_gelu_backward: batch of ",
              B, " is too large for the CUDA kernel's grid");
  const at::TensorOptions fp32 = x.options().dtype(at::kFloat);
  at::Tensor g = at::empty({B, H, W, C}, fp32);
  at::Tensor partials = at::empty({B * tasks_per_image, kGradSums, C}, fp32);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  MEMATTE_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "dwconv_gelu_backward_cuda", [&] {
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    const scalar_t* grad_data = grad_out.const_data_ptr<scalar_t>();
    const float* bias_data = bias_fp32.const_data_ptr<float>();
    if (cuda::vector_aligned<kGradVec>(C, x_data, grad_data) && cuda::vector_aligned<kGradVec>(C, bias_data)) {
      const dim3 grid(ceil_div(C / kGradVec, kGradThreads), B * tasks_per_image);
      dwconv_gelu_grad_kernel<scalar_t, kGradVec><<<grid, kGradThreads, 0, stream>>>(
          x_data, grad_data, taps.const_data_ptr<float>(), bias_data, g.mutable_data_ptr<float>(),
          partials.mutable_data_ptr<float>(), H, W, C, rows_per_task, tasks_per_image);
    } else {
      const dim3 grid(ceil_div(C, kGradThreads), B * tasks_per_image);
      dwconv_gelu_grad_kernel<scalar_t, 1><<<grid, kGradThreads, 0, stream>>>(
          x_data, grad_data, taps.const_data_ptr<float>(), bias_data, g.mutable_data_ptr<float>(),
          partials.mutable_data_ptr<float>(), H, W, C, rows_per_task, tasks_per_image);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // g and grad_x are fresh allocations: aligned whenever C allows.
    constexpr int kVec = 4;
    if (C % kVec == 0) {
      launch_dwconv<float, scalar_t, kVec, false>(g, flipped_taps, nullptr, grad_x);
    } else {
      launch_dwconv<float, scalar_t, 1, false>(g, flipped_taps, nullptr, grad_x);
    }
  });

  at::Tensor sums = at::empty({kGradSums, C}, fp32);
  const int64_t n = sums.numel();
  sum_partials_kernel<<<ceil_div(n, kThreads), kThreads, 0, stream>>>(
      partials.const_data_ptr<float>(), sums.mutable_data_ptr<float>(), B * tasks_per_image, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Out of the tap-major layout.
  const at::Tensor grad_weight = sums.narrow(0, 0, kSize * kSize).t().contiguous().view(weight.sizes());
  const at::Tensor grad_bias = sums.select(0, kSize * kSize).clone();
  return {grad_x, grad_weight.to(weight.scalar_type()), grad_bias.to(bias.scalar_type())};
}

}  // namespace mematte
