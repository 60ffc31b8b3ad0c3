// Efficient channel attention on channels-last (B, H, W, C):
//   out = z + z * sigmoid(conv1d_k(mean_hw(z))) [+ residual]
// in three launches: fp32 channel sums over chunks of rows (fixed chunking, no atomics, so
// results are reproducible), one block per image turning them into the gate, and one pass
// that applies the gate and adds the residual. Blocks are 32 channel vectors wide (a warp
// reads 32 consecutive vectors of one row) and kRowsPerBlock rows tall.
//
// The backward has the same three launches: chunk sums of z and of grad_out * z, one block per
// image for the gate's gradient (and its share of the weight gradient), and one pass for the
// input gradient grad_z = grad_out * (1 + gate) + (gradient through the mean) / HW.
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

constexpr int kVecsPerBlock = 32;
constexpr int kRowsPerBlock = 8;
constexpr int kGateThreads = 512;
constexpr int kMaxGridY = 65535;
constexpr int kMaxGridZ = 65535;  // grid.z is the image
// Fewer rows per chunk than this and the partial sums cost more than they parallelise.
constexpr int kMinRowsPerChunk = 64;
// Blocks per SM to aim for in the two passes over z.
constexpr int kBlocksPerSm = 4;

// chunk_sums[b, chunk, c] = sum of z[b, r, c] over the chunk's rows, in fp32. With kGrad, also
// grad_sums[b, chunk, c] = sum of grad[b, r, c] * z[b, r, c].
template <typename scalar_t, int kVec, bool kGrad>
__global__ void __launch_bounds__(kVecsPerBlock * kRowsPerBlock)
eca_chunk_sums_kernel(const scalar_t* __restrict__ z, const scalar_t* __restrict__ grad,
                      float* __restrict__ chunk_sums, float* __restrict__ grad_sums, int HW, int C,
                      int rows_per_chunk) {
  constexpr int kSums = kGrad ? 2 : 1;
  const int b = blockIdx.z, chunk = blockIdx.y;
  const int c = (blockIdx.x * kVecsPerBlock + threadIdx.x) * kVec;
  const bool active = c < C;
  const int row_end = min(HW, (chunk + 1) * rows_per_chunk);

  float sum[kSums][kVec] = {};
  if (active) {
    const int64_t image = static_cast<int64_t>(b) * HW * C + c;
    for (int r = chunk * rows_per_chunk + threadIdx.y; r < row_end; r += kRowsPerBlock) {
      float v[kVec];
      load_as_float<scalar_t, kVec>(z + image + static_cast<int64_t>(r) * C, v);
#pragma unroll
      for (int k = 0; k < kVec; ++k) sum[0][k] += v[k];
      if constexpr (kGrad) {
        float dv[kVec];
        load_as_float<scalar_t, kVec>(grad + image + static_cast<int64_t>(r) * C, dv);
#pragma unroll
        for (int k = 0; k < kVec; ++k) sum[kSums - 1][k] = fmaf(dv[k], v[k], sum[kSums - 1][k]);
      }
    }
  }

  __shared__ float partial[kRowsPerBlock][kVecsPerBlock][kSums][kVec];
#pragma unroll
  for (int s = 0; s < kSums; ++s)
#pragma unroll
    for (int k = 0; k < kVec; ++k) partial[threadIdx.y][threadIdx.x][s][k] = sum[s][k];
  __syncthreads();
  if (threadIdx.y != 0 || !active) return;
#pragma unroll
  for (int y = 1; y < kRowsPerBlock; ++y)
#pragma unroll
    for (int s = 0; s < kSums; ++s)
#pragma unroll
      for (int k = 0; k < kVec; ++k) sum[s][k] += partial[y][threadIdx.x][s][k];
  const int64_t offset = (static_cast<int64_t>(b) * gridDim.y + chunk) * C + c;
#pragma unroll
  for (int k = 0; k < kVec; ++k) chunk_sums[offset + k] = sum[0][k];
  if constexpr (kGrad) {
#pragma unroll
    for (int k = 0; k < kVec; ++k) grad_sums[offset + k] = sum[kSums - 1][k];
  }
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

// One block per image, the gate's backward: with mean m, logit l = conv1d(m), gate s and
// d_l = (sum_hw grad * z) * s * (1 - s),
//   scale[b, c] = 1 + s[c],  shift[b, c] = (sum_t taps[t] * d_l[c - t + pad]) / HW,
//   grad_taps[b, t] = sum_c d_l[c] * m[c + t - pad],
// everything outside [0, C) being zero. The sums over c are fixed-order tree reductions.
__global__ void __launch_bounds__(kGateThreads)
eca_gate_backward_kernel(const float* __restrict__ chunk_sums, const float* __restrict__ grad_sums,
                         const float* __restrict__ taps, float* __restrict__ scale, float* __restrict__ shift,
                         float* __restrict__ grad_taps, int chunks, int HW, int C, int k) {
  extern __shared__ float shared[];
  float* mean = shared;                // (C)
  float* dlogit = shared + C;          // (C)
  float* reduce = shared + 2 * C;      // (kGateThreads)
  const int b = blockIdx.x;
  const int64_t sums_offset = static_cast<int64_t>(b) * chunks * C;
  for (int c = threadIdx.x; c < C; c += kGateThreads) {
    float total = 0.0f, grad_total = 0.0f;
    for (int chunk = 0; chunk < chunks; ++chunk) {
      total += chunk_sums[sums_offset + static_cast<int64_t>(chunk) * C + c];
      grad_total += grad_sums[sums_offset + static_cast<int64_t>(chunk) * C + c];
    }
    mean[c] = total / static_cast<float>(HW);
    dlogit[c] = grad_total;  // the gate's gradient, for now
  }
  __syncthreads();
  const int pad = (k - 1) / 2;
  for (int c = threadIdx.x; c < C; c += kGateThreads) {
    float logit = 0.0f;
    for (int t = max(0, pad - c); t < min(k, C + pad - c); ++t) logit = fmaf(taps[t], mean[c + t - pad], logit);
    const float gate = 1.0f / (1.0f + expf(-logit));
    scale[b * C + c] = 1.0f + gate;
    dlogit[c] *= gate * (1.0f - gate);
  }
  __syncthreads();
  for (int c = threadIdx.x; c < C; c += kGateThreads) {
    // mean[c] feeds logit[c - t + pad] through tap t.
    float dmean = 0.0f;
    for (int t = max(0, c + pad - (C - 1)); t < min(k, c + pad + 1); ++t) {
      dmean = fmaf(taps[t], dlogit[c - t + pad], dmean);
    }
    shift[b * C + c] = dmean / static_cast<float>(HW);
  }
  for (int t = 0; t < k; ++t) {
    float sum = 0.0f;
    for (int c = max(0, pad - t) + threadIdx.x; c < min(C, C + pad - t); c += kGateThreads) {
      sum = fmaf(dlogit[c], mean[c + t - pad], sum);
    }
    reduce[threadIdx.x] = sum;
    __syncthreads();
    for (int stride = kGateThreads / 2; stride > 0; stride /= 2) {
      if (threadIdx.x < stride) reduce[threadIdx.x] += reduce[threadIdx.x + stride];
      __syncthreads();
    }
    if (threadIdx.x == 0) grad_taps[b * k + t] = reduce[0];
    __syncthreads();
  }
}

// grad_z = grad * scale + shift, the per-image (B, C) coefficients of eca_gate_backward_kernel.
template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kVecsPerBlock * kRowsPerBlock)
eca_grad_apply_kernel(const scalar_t* __restrict__ grad, const float* __restrict__ scale,
                      const float* __restrict__ shift, scalar_t* __restrict__ grad_z, int HW, int C) {
  const int b = blockIdx.z;
  const int c = (blockIdx.x * kVecsPerBlock + threadIdx.x) * kVec;
  if (c >= C) return;
  float a[kVec], d[kVec];
  load_as_float<float, kVec>(scale + b * C + c, a);
  load_as_float<float, kVec>(shift + b * C + c, d);
  const int64_t image = static_cast<int64_t>(b) * HW * C + c;
  for (int r = blockIdx.y * kRowsPerBlock + threadIdx.y; r < HW; r += gridDim.y * kRowsPerBlock) {
    const int64_t offset = image + static_cast<int64_t>(r) * C;
    float v[kVec];
    load_as_float<scalar_t, kVec>(grad + offset, v);
#pragma unroll
    for (int k = 0; k < kVec; ++k) v[k] = fmaf(v[k], a[k], d[k]);
    store_from_float<scalar_t, kVec>(v, grad_z + offset);
  }
}

// Chunks of rows per image and blocks per image of the passes over z, for about
// kBlocksPerSm blocks per SM.
struct EcaGrid {
  int channel_blocks, chunks, rows_per_chunk, apply_blocks;
};

EcaGrid eca_grid(int B, int HW, int C, int kVec, int device) {
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  const int channel_blocks = ceil_div(C, kVecsPerBlock * kVec);
  const int blocks_per_image = std::max(1, ceil_div(kBlocksPerSm * sm_count, channel_blocks * B));
  const int chunks = std::max(1, std::min({blocks_per_image, ceil_div(HW, kMinRowsPerChunk), kMaxGridY}));
  return {channel_blocks, chunks, ceil_div(HW, chunks),
          std::min({blocks_per_image, ceil_div(HW, kRowsPerBlock), kMaxGridY})};
}

template <typename scalar_t, int kVec>
void launch_eca_backward(const at::Tensor& grad, const at::Tensor& z, const at::Tensor& taps, at::Tensor& grad_z,
                         at::Tensor& grad_taps) {
  const int B = z.size(0), HW = z.size(1) * z.size(2), C = z.size(3), k = taps.numel();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const EcaGrid grid = eca_grid(B, HW, C, kVec, z.get_device());
  const at::TensorOptions fp32 = z.options().dtype(at::kFloat);
  at::Tensor chunk_sums = at::empty({2, B, grid.chunks, C}, fp32);  // of z, of grad * z
  const dim3 block(kVecsPerBlock, kRowsPerBlock);
  eca_chunk_sums_kernel<scalar_t, kVec, true><<<dim3(grid.channel_blocks, grid.chunks, B), block, 0, stream>>>(
      z.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(), chunk_sums[0].mutable_data_ptr<float>(),
      chunk_sums[1].mutable_data_ptr<float>(), HW, C, grid.rows_per_chunk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  at::Tensor scale = at::empty({B, C}, fp32);
  at::Tensor shift = at::empty({B, C}, fp32);
  at::Tensor image_grad_taps = at::empty({B, k}, fp32);
  eca_gate_backward_kernel<<<B, kGateThreads, (2 * C + kGateThreads) * sizeof(float), stream>>>(
      chunk_sums[0].const_data_ptr<float>(), chunk_sums[1].const_data_ptr<float>(), taps.const_data_ptr<float>(),
      scale.mutable_data_ptr<float>(), shift.mutable_data_ptr<float>(), image_grad_taps.mutable_data_ptr<float>(),
      grid.chunks, HW, C, k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  eca_grad_apply_kernel<scalar_t, kVec><<<dim3(grid.channel_blocks, grid.apply_blocks, B), block, 0, stream>>>(
      grad.const_data_ptr<scalar_t>(), scale.const_data_ptr<float>(), shift.const_data_ptr<float>(),
      grad_z.mutable_data_ptr<scalar_t>(), HW, C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // The images' shares added up (torch's sum is reproducible: no atomics).
  grad_taps = image_grad_taps.sum(0);
}

template <typename scalar_t, int kVec>
void launch_eca(const at::Tensor& z, const at::Tensor& taps, const scalar_t* residual, at::Tensor& out) {
  const int B = z.size(0), HW = z.size(1) * z.size(2), C = z.size(3);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const EcaGrid grid = eca_grid(B, HW, C, kVec, z.get_device());
  const at::TensorOptions fp32 = z.options().dtype(at::kFloat);

  at::Tensor chunk_sums = at::empty({B, grid.chunks, C}, fp32);
  const dim3 block(kVecsPerBlock, kRowsPerBlock);
  eca_chunk_sums_kernel<scalar_t, kVec, false><<<dim3(grid.channel_blocks, grid.chunks, B), block, 0, stream>>>(
      z.const_data_ptr<scalar_t>(), nullptr, chunk_sums.mutable_data_ptr<float>(), nullptr, HW, C,
      grid.rows_per_chunk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  at::Tensor gate = at::empty({B, C}, fp32);
  eca_gate_kernel<<<B, kGateThreads, C * sizeof(float), stream>>>(
      chunk_sums.const_data_ptr<float>(), taps.const_data_ptr<float>(), gate.mutable_data_ptr<float>(), grid.chunks, HW,
      C, taps.numel());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const dim3 apply_grid(grid.channel_blocks, grid.apply_blocks, B);
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

std::tuple<at::Tensor, at::Tensor> eca_backward_cuda(const at::Tensor& grad_out, const at::Tensor& z,
                                                     const at::Tensor& weight) {
  const c10::cuda::CUDAGuard guard(z.device());
  at::Tensor grad_z = at::empty_like(z);
  if (z.numel() == 0) return {grad_z, at::zeros(weight.sizes(), weight.options())};
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(z.size(0) <= kMaxGridZ && z.size(1) * z.size(2) <= kIntMax && z.size(3) <= kIntMax,
              "mematte_ext.eca_backward: z of shape ", z.sizes(),
              " is too large for the CUDA kernel's grid and 32-bit indices");
  // The gate kernel holds one image's channel means and their gradients in shared memory.
  TORCH_CHECK((2 * z.size(3) + kGateThreads) * static_cast<int64_t>(sizeof(float)) <= 48 * 1024,
              "mematte_ext.eca_backward: the CUDA kernel supports up to ", (48 * 1024 / 4 - kGateThreads) / 2,
              " channels, got ", z.size(3));
  const at::Tensor taps = weight.reshape({-1}).to(at::kFloat).contiguous();
  at::Tensor grad_taps;
  MEMATTE_DISPATCH_FLOAT_HALF_BF16(z.scalar_type(), "eca_backward_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const scalar_t* grad_data = grad_out.const_data_ptr<scalar_t>();
    if (cuda::vector_aligned<kVec>(z.size(3), z.const_data_ptr<scalar_t>(), grad_data,
                                   grad_z.const_data_ptr<scalar_t>())) {
      launch_eca_backward<scalar_t, kVec>(grad_out, z, taps, grad_z, grad_taps);
    } else {
      launch_eca_backward<scalar_t, 1>(grad_out, z, taps, grad_z, grad_taps);
    }
  });
  return {grad_z, grad_taps.view(weight.sizes()).to(weight.scalar_type())};
}

}  // namespace mematte
