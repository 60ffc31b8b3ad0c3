// Scalar stand-ins for the AVX-512 (BF16) intrinsics csrc/attention_cpu.cpp uses, lane by lane
// as the instructions define them, so that the kernel's own source runs (slowly) on CPUs
// without AVX-512: tests/test_cpu_attention_emulated.py compiles it against this header.
// Included after the system headers: the intrinsic and vector-type names are macros here.
#pragma once
#include <c10/util/BFloat16.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#define MEMATTE_INLINE inline
#define MEMATTE_HAVE_AVX512BF16_KERNEL 1
#define MEMATTE_AVX512BF16
#define _MM_FROUND_TO_NEAREST_INT 0
#define _MM_FROUND_NO_EXC 8
union V512 { float f[16]; int32_t i[16]; uint32_t u32[16]; uint16_t u16[32]; int16_t i16[32]; };
union V256 { uint16_t u16[16]; int32_t i[8]; };
#define __m512 V512
#define __m512i V512
#define __m512bh V512
#define __m256i V256
#define __m256bh V256
#define __mmask16 uint16_t
static inline float bf(uint16_t b) { uint32_t u = uint32_t(b) << 16; float f; std::memcpy(&f, &u, 4); return f; }
static inline uint16_t to_bf_rne(float f) { uint32_t u; std::memcpy(&u, &f, 4); if (std::isnan(f)) return 0x7fc0; u += 0x7fff + ((u >> 16) & 1); return uint16_t(u >> 16); }
#define L16 for (int l = 0; l < 16; ++l)
static inline V512 emu_mm512_set1_ps(float a) { V512 r; L16 r.f[l] = a; return r; }
static inline V512 emu_mm512_setzero_ps() { V512 r; std::memset(&r, 0, 64); return r; }
static inline V512 emu_mm512_setzero_si512() { return emu_mm512_setzero_ps(); }
static inline V512 emu_mm512_set1_epi32(int32_t a) { V512 r; L16 r.i[l] = a; return r; }
static inline V512 emu_mm512_set1_epi16(int16_t a) { V512 r; for (int l = 0; l < 32; ++l) r.i16[l] = a; return r; }
static inline V512 emu_mm512_setr_epi32(int a0,int a1,int a2,int a3,int a4,int a5,int a6,int a7,int a8,int a9,int a10,int a11,int a12,int a13,int a14,int a15) {
  V512 r; int v[16] = {a0,a1,a2,a3,a4,a5,a6,a7,a8,a9,a10,a11,a12,a13,a14,a15}; L16 r.i[l] = v[l]; return r; }
static inline V512 emu_mm512_loadu_si512(const void* p) { V512 r; std::memcpy(&r, p, 64); return r; }
static inline V512 emu_mm512_load_si512(const void* p) { return emu_mm512_loadu_si512(p); }
static inline V512 emu_mm512_loadu_ps(const float* p) { return emu_mm512_loadu_si512(p); }
static inline void emu_mm512_storeu_si512(void* p, V512 a) { std::memcpy(p, &a, 64); }
static inline void emu_mm512_store_si512(void* p, V512 a) { std::memcpy(p, &a, 64); }
static inline void emu_mm512_storeu_ps(float* p, V512 a) { std::memcpy(p, &a, 64); }
static inline void emu_mm256_storeu_si256(V256* p, V256 a) { std::memcpy(p, &a, 32); }
static inline V512 emu_mm512_maskz_loadu_ps(__mmask16 k, const float* p) { V512 r; L16 r.f[l] = (k >> l & 1) ? p[l] : 0.f; return r; }
static inline void emu_mm512_mask_storeu_ps(float* p, __mmask16 k, V512 a) { L16 if (k >> l & 1) p[l] = a.f[l]; }
static inline V512 emu_mm512_add_ps(V512 a, V512 b) { L16 a.f[l] += b.f[l]; return a; }
static inline V512 emu_mm512_sub_ps(V512 a, V512 b) { L16 a.f[l] -= b.f[l]; return a; }
static inline V512 emu_mm512_mul_ps(V512 a, V512 b) { L16 a.f[l] *= b.f[l]; return a; }
static inline V512 emu_mm512_fmadd_ps(V512 a, V512 b, V512 c) { L16 a.f[l] = std::fma(a.f[l], b.f[l], c.f[l]); return a; }
static inline V512 emu_mm512_max_ps(V512 a, V512 b) { L16 a.f[l] = a.f[l] > b.f[l] ? a.f[l] : b.f[l]; return a; }
static inline V512 emu_mm512_mask_mov_ps(V512 src, __mmask16 k, V512 a) { L16 if (!(k >> l & 1)) a.f[l] = src.f[l]; return a; }
static inline V512 emu_mm512_maskz_mov_ps(__mmask16 k, V512 a) { L16 if (!(k >> l & 1)) a.f[l] = 0.f; return a; }
static inline V512 emu_mm512_mask_mul_ps(V512 src, __mmask16 k, V512 a, V512 b) { L16 a.f[l] = (k >> l & 1) ? a.f[l] * b.f[l] : src.f[l]; return a; }
static inline float emu_mm512_reduce_max_ps(V512 a) { float m = a.f[0]; for (int l = 1; l < 16; ++l) m = a.f[l] > m ? a.f[l] : m; return m; }
static inline float emu_mm512_reduce_add_ps(V512 a) { float s = 0; L16 s += a.f[l]; return s; }
static inline V512 emu_mm512_roundscale_ps(V512 a, int) { L16 a.f[l] = std::nearbyint(a.f[l]); return a; }
static inline V512 emu_mm512_scalef_ps(V512 a, V512 b) { L16 a.f[l] = std::ldexp(a.f[l], int(std::floor(b.f[l]))); return a; }
static inline V512 emu_mm512_dpbf16_ps(V512 acc, V512 a, V512 b) {
  L16 acc.f[l] += bf(a.u16[2 * l]) * bf(b.u16[2 * l]) + bf(a.u16[2 * l + 1]) * bf(b.u16[2 * l + 1]); return acc; }
static inline V256 emu_mm512_cvtneps_pbh(V512 a) { V256 r; L16 r.u16[l] = to_bf_rne(a.f[l]); return r; }
static inline V512 emu_mm512_cvtepu16_epi32(V256 a) { V512 r; L16 r.u32[l] = a.u16[l]; return r; }
static inline V512 emu_mm512_slli_epi32(V512 a, int s) { L16 a.u32[l] <<= s; return a; }
static inline V512 emu_mm512_castsi512_ps(V512 a) { return a; }
static inline V512 emu_mm512_add_epi32(V512 a, V512 b) { L16 a.i[l] += b.i[l]; return a; }
static inline V512 emu_mm512_add_epi16(V512 a, V512 b) { for (int l = 0; l < 32; ++l) a.u16[l] += b.u16[l]; return a; }
static inline V512 emu_mm512_permutexvar_ps(V512 idx, V512 a) { V512 r; L16 r.f[l] = a.f[idx.i[l] & 15]; return r; }
static inline V512 emu_mm512_permutex2var_epi16(V512 a, V512 idx, V512 b) {
  V512 r; for (int l = 0; l < 32; ++l) { int s = idx.u16[l] & 63; r.u16[l] = s < 32 ? a.u16[s] : b.u16[s - 32]; } return r; }
static inline V512 emu_mm512_i32gather_ps(V512 idx, const void* base, int scale) {
  V512 r; L16 { float v; std::memcpy(&v, static_cast<const char*>(base) + int64_t(idx.i[l]) * scale, 4); r.f[l] = v; } return r; }

#undef _mm256_storeu_si256
#define _mm256_storeu_si256 emu_mm256_storeu_si256
#undef _mm512_add_epi16
#define _mm512_add_epi16 emu_mm512_add_epi16
#undef _mm512_add_epi32
#define _mm512_add_epi32 emu_mm512_add_epi32
#undef _mm512_add_ps
#define _mm512_add_ps emu_mm512_add_ps
#undef _mm512_castsi512_ps
#define _mm512_castsi512_ps emu_mm512_castsi512_ps
#undef _mm512_cvtepu16_epi32
#define _mm512_cvtepu16_epi32 emu_mm512_cvtepu16_epi32
#undef _mm512_cvtneps_pbh
#define _mm512_cvtneps_pbh emu_mm512_cvtneps_pbh
#undef _mm512_dpbf16_ps
#define _mm512_dpbf16_ps emu_mm512_dpbf16_ps
#undef _mm512_fmadd_ps
#define _mm512_fmadd_ps emu_mm512_fmadd_ps
#undef _mm512_i32gather_ps
#define _mm512_i32gather_ps emu_mm512_i32gather_ps
#undef _mm512_load_si512
#define _mm512_load_si512 emu_mm512_load_si512
#undef _mm512_loadu_ps
#define _mm512_loadu_ps emu_mm512_loadu_ps
#undef _mm512_loadu_si512
#define _mm512_loadu_si512 emu_mm512_loadu_si512
#undef _mm512_mask_mov_ps
#define _mm512_mask_mov_ps emu_mm512_mask_mov_ps
#undef _mm512_mask_mul_ps
#define _mm512_mask_mul_ps emu_mm512_mask_mul_ps
#undef _mm512_mask_storeu_ps
#define _mm512_mask_storeu_ps emu_mm512_mask_storeu_ps
#undef _mm512_maskz_loadu_ps
#define _mm512_maskz_loadu_ps emu_mm512_maskz_loadu_ps
#undef _mm512_maskz_mov_ps
#define _mm512_maskz_mov_ps emu_mm512_maskz_mov_ps
#undef _mm512_max_ps
#define _mm512_max_ps emu_mm512_max_ps
#undef _mm512_mul_ps
#define _mm512_mul_ps emu_mm512_mul_ps
#undef _mm512_permutex2var_epi16
#define _mm512_permutex2var_epi16 emu_mm512_permutex2var_epi16
#undef _mm512_permutexvar_ps
#define _mm512_permutexvar_ps emu_mm512_permutexvar_ps
#undef _mm512_reduce_add_ps
#define _mm512_reduce_add_ps emu_mm512_reduce_add_ps
#undef _mm512_reduce_max_ps
#define _mm512_reduce_max_ps emu_mm512_reduce_max_ps
#undef _mm512_roundscale_ps
#define _mm512_roundscale_ps emu_mm512_roundscale_ps
#undef _mm512_scalef_ps
#define _mm512_scalef_ps emu_mm512_scalef_ps
#undef _mm512_set1_epi16
#define _mm512_set1_epi16 emu_mm512_set1_epi16
#undef _mm512_set1_epi32
#define _mm512_set1_epi32 emu_mm512_set1_epi32
#undef _mm512_set1_ps
#define _mm512_set1_ps emu_mm512_set1_ps
#undef _mm512_setr_epi32
#define _mm512_setr_epi32 emu_mm512_setr_epi32
#undef _mm512_setzero_ps
#define _mm512_setzero_ps emu_mm512_setzero_ps
#undef _mm512_setzero_si512
#define _mm512_setzero_si512 emu_mm512_setzero_si512
#undef _mm512_slli_epi32
#define _mm512_slli_epi32 emu_mm512_slli_epi32
#undef _mm512_store_si512
#define _mm512_store_si512 emu_mm512_store_si512
#undef _mm512_storeu_ps
#define _mm512_storeu_ps emu_mm512_storeu_ps
#undef _mm512_storeu_si512
#define _mm512_storeu_si512 emu_mm512_storeu_si512
#undef _mm512_sub_ps
#define _mm512_sub_ps emu_mm512_sub_ps
