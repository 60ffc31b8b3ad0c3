// Small helpers shared by the CUDA kernels.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace mematte::cuda {

// kVec consecutive elements moved with one load or store instruction.
template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Pack {
  scalar_t v[kVec];
};

template <typename scalar_t, int kVec>
__device__ __forceinline__ void load_as_float(const scalar_t* __restrict__ src, float (&dst)[kVec]) {
  const Pack<scalar_t, kVec> pack = *reinterpret_cast<const Pack<scalar_t, kVec>*>(src);
#pragma unroll
  for (int k = 0; k < kVec; ++k) dst[k] = static_cast<float>(pack.v[k]);
}

template <typename scalar_t, int kVec>
__device__ __forceinline__ void store_from_float(const float (&src)[kVec], scalar_t* __restrict__ dst) {
  Pack<scalar_t, kVec> pack;
#pragma unroll
  for (int k = 0; k < kVec; ++k) pack.v[k] = static_cast<scalar_t>(src[k]);
  *reinterpret_cast<Pack<scalar_t, kVec>*>(dst) = pack;
}

// Whether every pointer allows kVec-element accesses at multiples of kVec elements.
template <int kVec, typename scalar_t, typename... Rest>
inline bool vector_aligned(int64_t channels, const scalar_t* first, const Rest*... rest) {
  constexpr uintptr_t kBytes = sizeof(scalar_t) * kVec;
  if (channels % kVec != 0) return false;
  for (const void* ptr : {static_cast<const void*>(first), static_cast<const void*>(rest)...}) {
    if (reinterpret_cast<uintptr_t>(ptr) % kBytes != 0) return false;
  }
  return true;
}

__host__ __device__ inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace mematte::cuda
