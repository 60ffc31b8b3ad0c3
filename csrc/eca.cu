// Efficient channel attention on channels-last (B, H, W, C):
//   out = z + z * sigmoid(conv1d_k(mean_hw(z))) [+ residual]
// in three launches: fp32 channel sums over chunks of rows (fixed chunking, no atomics, so
// results are reproducible), one block per image turning them into the gate, and one pass
// that applies the gate and adds the residual. Blocks are 32 channel vectors wide (a warp
// reads 32 consecutive vectors of one row) and kRowsPerBlock rows tall.
#include <ATen/ops/empty.h>
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

constexpr int kVecsPerBlock = 32;
constexpr int kRowsPerBlock = 8;
constexpr int kGateThreads = 512;
constexpr int kMaxGridY = 65535;
constexpr int kMaxGridZ = 65535;  // grid.z is the image
// Fewer rows per chunk than this and the partial sums cost more than they parallelise.
constexpr int kMinRowsPerChunk = 64;
// Blocks per SM to aim for in the two passes over z.
constexpr int kBlocksPerSm = 4;

// chunk_sums[b, chunk, c] = sum of z[b, r, c] over the chunk's rows, in fp32.
template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kVecsPerBlock * kRowsPerBlock)
eca_chunk_sums_kernel(const scalar_t* __restrict__ z, float* __restrict__ chunk_sums, int HW, int C,
                      int rows_per_chunk) {
  const int b = blockIdx.z, chunk = blockIdx.y;
  const int c = (blockIdx.x * kVecsPerBlock + threadIdx.x) * kVec;
  const bool active = c < C;
  const int row_end = min(HW, (chunk + 1) * rows_per_chunk);

  float sum[kVec] = {};
  if (active) {
    const scalar_t* image = z + static_cast<int64_t>(b) * HW * C + c;
    for (int r = chunk * rows_per_chunk + threadIdx.y; r < row_end; r += kRowsPerBlock) {
      float v[kVec];
      load_as_float<scalar_t, kVec>(image + static_cast<int64_t>(r) * C, v);
#pragma unroll
      for (int k = 0; k < kVec; ++k) sum[k] += v[k];
    }
  }

  __shared__ float partial[kRowsPerBlock][kVecsPerBlock][kVec];
#pragma unroll
  for (int k = 0; k < kVec; ++k) partial[threadIdx.y][threadIdx.x][k] = sum[k];
  __syncthreads();
  if (threadIdx.y != 0 || !active) return;
#pragma unroll
  for (int y = 1; y < kRowsPerBlock; ++y)
#pragma unroll
    for (int k = 0; k < kVec; ++k) sum[k] += partial[y][threadIdx.x][k];
  float* dst = chunk_sums + (static_cast<int64_t>(b) * gridDim.y + chunk) * C + c;
#pragma unroll
  for (int k = 0; k < kVec; ++k) dst[k] = sum[k];
}

// One block per image: means into shared memory, then gate[b, c] =
// sigmoid(sum_t taps[t] * mean[c + t - pad]) with zeros outside [0, C).
__global__ void __launch_bounds__(kGateThreads)
eca_gate_kernel(const float* __restrict__ chunk_sums, const float* __restrict__ taps, float* __restrict__ gate,
                int chunks, int HW, int C, int k) {
  extern __shared__ float mean[];
  const int b = blockIdx.x;
  const float* sums = chunk_sums + static_cast<int64_t>(b) * chunks * C;
  for (int c = threadIdx.x; c < C; c += kGateThreads) {
    float total = 0.0f;
    for (int chunk = 0; chunk < chunks; ++chunk) total += sums[static_cast<int64_t>(chunk) * C + c];
    mean[c] = total / static_cast<float>(HW);
  }
  __syncthreads();
  const int pad = (k - 1) / 2;
  for (int c = threadIdx.x; c < C; c += kGateThreads) {
    float logit = 0.0f;
    for (int t = max(0, pad - c); t < min(k, C + pad - c); ++t) logit = fmaf(taps[t], mean[c + t - pad], logit);
    gate[b * C + c] = 1.0f / (1.0f + expf(-logit));
  }
}

// out = z + z * gate (+ residual), computed in fp32 and rounded once to the output dtype.
// Each thread keeps its channels' gate in registers and strides over the rows of one image.
template <typename scalar_t, int kVec, bool kResidual>
__global__ void __launch_bounds__(kVecsPerBlock * kRowsPerBlock)
eca_apply_kernel(const scalar_t* __restrict__ z, const scalar_t* __restrict__ residual, const float* __restrict__ gate,
                 scalar_t* __restrict__ out, int HW, int C) {
  const int b = blockIdx.z;
  const int c = (blockIdx.x * kVecsPerBlock + threadIdx.x) * kVec;
  if (c >= C) return;
  float g[kVec];
  load_as_float<float, kVec>(gate + b * C + c, g);
  const int64_t image = static_cast<int64_t>(b) * HW * C + c;
  for (int r = blockIdx.y * kRowsPerBlock + threadIdx.y; r < HW; r += gridDim.y * kRowsPerBlock) {
    const int64_t offset = image + static_cast<int64_t>(r) * C;
    float v[kVec], y[kVec];
    load_as_float<scalar_t, kVec>(z + offset, v);
#pragma unroll
    for (int k = 0; k < kVec; ++k) y[k] = fmaf(v[k], g[k], v[k]);
    if constexpr (kResidual) {
      float res[kVec];
      load_as_float<scalar_t, kVec>(residual + offset, res);
#pragma unroll
      for (int k = 0; k < kVec; ++k) y[k] += res[k];
    }
    store_from_float<scalar_t, kVec>(y, out + offset);
  }
}

template <typename scalar_t, int kVec>
void launch_eca(const at::Tensor& z, const at::Tensor& taps, const scalar_t* residual, at::Tensor& out) {
  const int B = z.size(0), HW = z.size(1) * z.size(2), C = z.size(3);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int channel_blocks = ceil_div(C, kVecsPerBlock * kVec);
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, z.get_device()));
  const int target_blocks = kBlocksPerSm * sm_count;
  const int blocks_per_image = std::max(1, ceil_div(target_blocks, channel_blocks * B));
  const at::TensorOptions fp32 = z.options().dtype(at::kFloat);

  const int chunks = std::max(1, std::min({blocks_per_image, ceil_div(HW, kMinRowsPerChunk), kMaxGridY}));
  const int rows_per_chunk = ceil_div(HW, chunks);
  at::Tensor chunk_sums = at::empty({B, chunks, C}, fp32);
  const dim3 block(kVecsPerBlock, kRowsPerBlock);
  eca_chunk_sums_kernel<scalar_t, kVec><<<dim3(channel_blocks, chunks, B), block, 0, stream>>>(
      z.const_data_ptr<scalar_t>(), chunk_sums.mutable_data_ptr<float>(), HW, C, rows_per_chunk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  at::Tensor gate = at::empty({B, C}, fp32);
  eca_gate_kernel<<<B, kGateThreads, C * sizeof(float), stream>>>(
      chunk_sums.const_data_ptr<float>(), taps.const_data_ptr<float>(), gate.mutable_data_ptr<float>(), chunks, HW, C,
      taps.numel());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const dim3 apply_grid(channel_blocks, std::min({blocks_per_image, ceil_div(HW, kRowsPerBlock), kMaxGridY}), B);
  if (residual != nullptr) {
    eca_apply_kernel<scalar_t, kVec, true><<<apply_grid, block, 0, stream>>>(
        z.const_data_ptr<scalar_t>(), residual, gate.const_data_ptr<float>(), out.mutable_data_ptr<scalar_t>(), HW, C);
  } else {
    eca_apply_kernel<scalar_t, kVec, false><<<apply_grid, block, 0, stream>>>(
        z.const_data_ptr<scalar_t>(), nullptr, gate.const_data_ptr<float>(), out.mutable_data_ptr<scalar_t>(), HW, C);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor eca_cuda(const at::Tensor& z, const at::Tensor& weight, const std::optional<at::Tensor>& residual) {
  const c10::cuda::CUDAGuard guard(z.device());
  at::Tensor out = at::empty_like(z);
  if (z.numel() == 0) return out;
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(z.size(0) <= kMaxGridZ && z.size(1) * z.size(2) <= kIntMax && z.size(3) <= kIntMax,
              "mematte_ext.eca: z of shape ", z.sizes(), " is too large for the CUDA kernel's grid and 32-bit indices");
  // The gate kernel holds one image's channel means in shared memory (48 KiB by default).
  TORCH_CHECK(z.size(3) * static_cast<int64_t>(sizeof(float)) <= 48 * 1024,
              "mematte_ext.eca: the CUDA kernel supports up to 12288 channels, got ", z.size(3));
  const at::Tensor taps = weight.reshape({-1}).to(at::kFloat).contiguous();
  MEMATTE_DISPATCH_FLOAT_HALF_BF16(z.scalar_type(), "eca_cuda", [&] {
    // 16-byte accesses: 4 fp32 or 8 fp16/bf16 channels per thread.
    constexpr int kVec = 16 / sizeof(scalar_t);
    const scalar_t* res = residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr;
    if (cuda::vector_aligned<kVec>(z.size(3), z.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(), res)) {
      launch_eca<scalar_t, kVec>(z, taps, res, out);
    } else {
      launch_eca<scalar_t, 1>(z, taps, res, out);
    }
  });
  return out;
}

}  // namespace mematte
