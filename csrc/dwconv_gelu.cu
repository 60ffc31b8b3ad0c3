// Depthwise 5x5 conv (padding 2) + bias + exact GELU on channels-last (B, H, W, C).
//
// A thread owns kVec consecutive channels of one output column w and kRowsPerThread
// consecutive output rows. It keeps its 25 x kVec weights in registers and walks the
// kRowsPerThread + 4 input rows once, each loaded row feeding every output row it touches.
// Consecutive threads take consecutive channel vectors, so a warp reads and writes whole
// contiguous runs of a pixel's channels; the horizontal neighbours a thread shares with the
// threads of columns w +- 1, w +- 2 come from L1.
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>

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

// grid.x covers (w, channel vector) pairs of one row; grid.y covers (image, row tile) pairs,
// striding when there are more of them than grid.y allows.
template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
dwconv_gelu_kernel(const scalar_t* __restrict__ x, const float* __restrict__ taps, const float* __restrict__ bias,
                   scalar_t* __restrict__ out, int B, int H, int W, int C) {
  const int vecs_per_pixel = C / kVec;
  const int pixel_vec = blockIdx.x * kThreads + threadIdx.x;
  if (pixel_vec >= W * vecs_per_pixel) return;
  const int w = pixel_vec / vecs_per_pixel;
  const int c = (pixel_vec % vecs_per_pixel) * kVec;

  float weight[kSize * kSize][kVec];
#pragma unroll
  for (int tap = 0; tap < kSize * kSize; ++tap) load_as_float<float, kVec>(taps + tap * C + c, weight[tap]);
  float bias_vec[kVec];
  load_as_float<float, kVec>(bias + c, bias_vec);

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
          load_as_float<scalar_t, kVec>(x + image + (static_cast<int64_t>(h_in) * W + w_in) * C + c, in[j]);
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
      for (int k = 0; k < kVec; ++k) y[k] = acc[o][k] * normcdff(acc[o][k]);  // exact GELU: x * Phi(x)
      store_from_float<scalar_t, kVec>(y, out + image + (static_cast<int64_t>(h0 + o) * W + w) * C + c);
    }
  }
}

// The weights as fp32 (25, C), tap-major: a thread's kVec channels of one tap are contiguous.
at::Tensor taps_fp32(const at::Tensor& weight) {
  return weight.reshape({weight.size(0), kSize * kSize}).t().to(at::kFloat).contiguous();
}

template <typename scalar_t, int kVec>
void launch_dwconv_gelu(const at::Tensor& x, const at::Tensor& taps, const at::Tensor& bias, at::Tensor& out) {
  const int B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  const dim3 grid(ceil_div(static_cast<int64_t>(W) * (C / kVec), kThreads),
                  std::min<int64_t>(static_cast<int64_t>(B) * ceil_div(H, kRowsPerThread), kMaxGridY));
  dwconv_gelu_kernel<scalar_t, kVec><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      x.const_data_ptr<scalar_t>(), taps.const_data_ptr<float>(), bias.const_data_ptr<float>(),
      out.mutable_data_ptr<scalar_t>(), B, H, W, C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor dwconv_gelu_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(x.size(0) * x.size(1) <= kIntMax && x.size(2) * x.size(3) <= kIntMax,
              "mematte_ext.dwconv_gelu: x of shape ", x.sizes(), " is too large for the CUDA kernel's 32-bit indices");
  const at::Tensor taps = taps_fp32(weight);
  const at::Tensor bias_fp32 = bias.to(at::kFloat).contiguous();
  // 4 channels per thread: 16-byte fp32 and 8-byte fp16/bf16 accesses, and 100 weight registers.
  constexpr int kVec = 4;
  MEMATTE_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "dwconv_gelu_cuda", [&] {
    if (cuda::vector_aligned<kVec>(x.size(3), x.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>())) {
      launch_dwconv_gelu<scalar_t, kVec>(x, taps, bias_fp32, out);
    } else {
      launch_dwconv_gelu<scalar_t, 1>(x, taps, bias_fp32, out);
    }
  });
  return out;
}

}  // namespace mematte
