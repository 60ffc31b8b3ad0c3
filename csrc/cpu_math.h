// Scalar building blocks for the CPU kernels, written so that GCC and Clang vectorise the
// channel loops that call them: no branches (only selects), no libm calls.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#define MEMATTE_INLINE inline __attribute__((always_inline))

// The hot loops are compiled for AVX-512 and AVX2+FMA next to the baseline ISA, and the
// loader picks the best one at run time, so one wheel is fast everywhere without -march.
// GCC 11+ on Linux (ifunc); other compilers get the baseline loops.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define MEMATTE_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MEMATTE_CPU_CLONES
#endif

// Kernels written with AVX512-BF16 intrinsics (vdpbf16ps) are compiled for that ISA only and
// called after cpu_has_avx512_bf16() says the CPU has it.
#if defined(__x86_64__) && defined(__GNUC__) && (__GNUC__ >= 11 || defined(__clang__))
#define MEMATTE_HAVE_AVX512BF16_KERNEL 1
#include <immintrin.h>
#if !defined(__clang__) && __GNUC__ == 12
// GCC 12's AVX-512 intrinsics start from _mm512_undefined_ps() and warn about it wherever
// they are inlined (GCC bug 105593, fixed in GCC 13).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#define MEMATTE_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma")))
#endif

// Kernels written with AVX2 + FMA intrinsics, likewise called after cpu_has_avx2_fma().
#if defined(__x86_64__) && defined(__GNUC__) && (__GNUC__ >= 11 || defined(__clang__))
#define MEMATTE_HAVE_AVX2_KERNEL 1
#include <immintrin.h>
#define MEMATTE_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace mematte::cpu {

MEMATTE_INLINE float to_float(float v) { return v; }
MEMATTE_INLINE float to_float(c10::Half v) { return static_cast<float>(v); }
MEMATTE_INLINE float to_float(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

template <typename scalar_t>
MEMATTE_INLINE scalar_t from_float(float v);

template <>
MEMATTE_INLINE float from_float<float>(float v) {
  return v;
}

template <>
MEMATTE_INLINE c10::Half from_float<c10::Half>(float v) {
  return c10::Half(v);
}

// Round to nearest even, NaN kept quiet: what c10::BFloat16(float) does, spelled without a
// branch so that the store loop vectorises.
template <>
MEMATTE_INLINE c10::BFloat16 from_float<c10::BFloat16>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(v != v ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

// 2^f for |f| <= 1/2: a degree-5 minimax polynomial (relative error 8e-8), highest power
// first, shared by the scalar and vector forms of exp2_nonpositive.
constexpr float kExp2Poly[6] = {1.3276446843519807e-3f, 9.675541892647743e-3f, 5.550713464617729e-2f,
                                2.4022120237350464e-1f, 6.931469440460205e-1f, 1.0000001192092896f};

// 2^y for y <= 0: y = n + f with n an integer and |f| <= 1/2, 2^f from kExp2Poly, 2^n from
// the exponent bits. Inputs under -126 give 2^-126, still a normal float.
MEMATTE_INLINE float exp2_nonpositive(float y) {
  y = std::max(y, -126.0f);
  constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (y + kRoundMagic) - kRoundMagic;
  const float f = y - n;
  float p = kExp2Poly[0];
  for (int i = 1; i < 6; ++i) p = p * f + kExp2Poly[i];
  const uint32_t scale_bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  return p * scale;
}

// 0.5 * erfc(|x| / sqrt(2)), i.e. Phi(-|x|), to a relative error < 1.2e-7 for every x: from
// erfc (Numerical Recipes' Chebyshev fit, erfc(z) = t exp(-z^2 + P(t))) rather than from
// 1 + erf, so the tail keeps its relative accuracy instead of cancelling. P is pre-scaled by
// log2(e) to feed exp2 directly.
MEMATTE_INLINE float half_erfc_abs(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  const float z = std::fabs(x) * 0.70710678118654752f;
  const float t = 1.0f / (1.0f + 0.5f * z);
  float p = 0.17087277f * kLog2e;
  p = p * t - 0.82215223f * kLog2e;
  p = p * t + 1.48851587f * kLog2e;
  p = p * t - 1.13520398f * kLog2e;
  p = p * t + 0.27886807f * kLog2e;
  p = p * t - 0.18628806f * kLog2e;
  p = p * t + 0.09678418f * kLog2e;
  p = p * t + 0.37409196f * kLog2e;
  p = p * t + 1.00002368f * kLog2e;
  p = p * t - 1.26551223f * kLog2e;
  return 0.5f * t * exp2_nonpositive(p - z * z * kLog2e);
}

// Exact (erf) GELU, x * Phi(x), within 4e-7 absolute and 2e-6 relative wherever |GELU| > 1e-3.
MEMATTE_INLINE float gelu(float x) {
  const float half_erfc = half_erfc_abs(x);
  return x * (x < 0.0f ? half_erfc : 1.0f - half_erfc);
}

// The derivative of exact GELU: Phi(x) + x * phi(x), phi the standard normal density.
MEMATTE_INLINE float gelu_grad(float x) {
  constexpr float kInvSqrt2Pi = 0.39894228040143268f;
  constexpr float kHalfLog2e = 0.72134752044448170f;
  const float half_erfc = half_erfc_abs(x);
  const float cdf = x < 0.0f ? half_erfc : 1.0f - half_erfc;
  return cdf + x * kInvSqrt2Pi * exp2_nonpositive(-x * x * kHalfLog2e);
}

}  // namespace mematte::cpu
