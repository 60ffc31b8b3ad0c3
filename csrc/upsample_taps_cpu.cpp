// CPU kernel of upsample_taps_relu_: the epilogue of a decoder fusion block,
//
//   out = relu(out + conv3x3(upsample2x(x), W))        (zero padding 1, bilinear, align_corners=False)
//
// given taps = the 1x1 projections W[:, :, ky, kx] . x of the low-resolution input, one per
// 3x3 tap. Upsampling and channel mixing are both linear and commute, so
// conv3x3(up(x), W)(p) = sum_k up(W_k . x)(p + offset_k): the channel mixing runs at a quarter
// of the pixels (a GEMM, done by the caller) and only the per-channel resampling and the sum
// over taps run at full resolution, here, without ever writing the upsampled input.
//
// The bilinear weights of a tap depend on its row (vertical) and its column (horizontal)
// separately, so an output row is made in two passes:
//   1. staged[j, kx] = sum over kernel rows ky of the vertical blend, for that output row, of
//      the two low-resolution rows of tap (ky, kx) at low-resolution column j  -> (w, 3, C) fp32;
//   2. out[x] = relu(out[x] + sum over kx of the horizontal blend of staged[., kx] at x + kx - 1).
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu_math.h"
#include "ltrm.h"

namespace mematte {
namespace {

constexpr int64_t kTaps = 3;  // per kernel row and per kernel column

// One axis of a x2 bilinear upsampling (align_corners=False, PyTorch's index rule): output
// index o reads inputs i0 and i1 with weights (1 - lambda, lambda).
struct Source {
  int64_t i0, i1;
  float lambda;
};

Source source_index(int64_t o, int64_t in_size) {
  const float src = std::max((static_cast<float>(o) + 0.5f) * 0.5f - 0.5f, 0.0f);
  const int64_t i0 = static_cast<int64_t>(src);
  return {i0, std::min(i0 + 1, in_size - 1), src - static_cast<float>(i0)};
}

// 16 fp32 lanes as a GCC/Clang vector: one AVX-512 register, two AVX2 registers, and so on
// down to the baseline ISA, whichever clone the loader picks. The helpers below are always
// inlined, so no such vector crosses a call boundary and GCC's ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
using f32x16 = float __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

MEMATTE_INLINE f32x16 load_lanes(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

using u32x16 = uint32_t __attribute__((vector_size(64)));
using i32x16 = int32_t __attribute__((vector_size(64)));
using u16x16 = uint16_t __attribute__((vector_size(32)));

template <typename scalar_t>
MEMATTE_INLINE f32x16 load_lanes_as_float(const scalar_t* p) {
  float buffer[kLanes];
  for (int64_t c = 0; c < kLanes; ++c) buffer[c] = cpu::to_float(p[c]);
  return load_lanes(buffer);
}

// bf16 is the top half of an fp32: widen and shift, as vector operations.
template <>
MEMATTE_INLINE f32x16 load_lanes_as_float<c10::BFloat16>(const c10::BFloat16* p) {
  u16x16 half;
  std::memcpy(&half, p, sizeof(half));
  const u32x16 bits = __builtin_convertvector(half, u32x16) << 16;
  f32x16 v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

template <typename scalar_t>
MEMATTE_INLINE void store_lanes(scalar_t* p, f32x16 v) {
  float buffer[kLanes];
  std::memcpy(buffer, &v, sizeof(v));
  for (int64_t c = 0; c < kLanes; ++c) p[c] = cpu::from_float<scalar_t>(buffer[c]);
}

// cpu::from_float<BFloat16> (round to nearest even, NaN kept quiet) on 16 lanes at once.
template <>
MEMATTE_INLINE void store_lanes<c10::BFloat16>(c10::BFloat16* p, f32x16 v) {
  u32x16 bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const u32x16 rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const u32x16 quiet_nan = u32x16{} + 0x7FC0u;
  const u32x16 out = (v != v) ? quiet_nan : rounded;
  const u16x16 half = __builtin_convertvector(out, u16x16);
  std::memcpy(p, &half, sizeof(half));
}

// Pass 1: staged (w, 3, C) = sum over the kernel rows that fall inside the image of the
// vertical blend of their taps' two source rows, in one pass over the staged row. tap_row(i)
// points at low-resolution row i of the taps, (w, 3, 3, C), in fp32 or the activations' dtype.
template <typename tap_t, typename TapRow>
MEMATTE_INLINE void stage_row(TapRow tap_row, int64_t h, int64_t w, int64_t C, int64_t y, float* __restrict staged) {
  const int64_t span = kTaps * C;  // one kernel row's taps at one pixel
  const tap_t* top[kTaps];
  const tap_t* bottom[kTaps];
  float lambda[kTaps];
  int64_t n = 0;
  for (int64_t ky = 0; ky < kTaps; ++ky) {
    const int64_t r = y + ky - 1;
    if (r < 0 || r >= 2 * h) continue;  // the conv's zero padding
    const Source s = source_index(r, h);
    top[n] = tap_row(s.i0) + ky * span;
    bottom[n] = tap_row(s.i1) + ky * span;
    lambda[n++] = s.lambda;
  }
  auto blend = [&](int64_t e, int64_t i) {
    const float v0 = cpu::to_float(top[e][i]);
    return v0 + lambda[e] * (cpu::to_float(bottom[e][i]) - v0);
  };
  // Output rows inside the image read three kernel rows, the first and last two (H >= 2);
  // each case is a straight loop over the channels, which vectorises.
  for (int64_t j = 0; j < w; ++j) {
    const int64_t offset = j * kTaps * span;
    float* __restrict dst = staged + j * span;
    if (n == 3) {
      for (int64_t c = offset; c < offset + span; ++c) dst[c - offset] = blend(0, c) + blend(1, c) + blend(2, c);
    } else {
      for (int64_t c = offset; c < offset + span; ++c) dst[c - offset] = blend(0, c) + blend(1, c);
    }
  }
}

// Pass 2 for one output pixel: its kernel columns' horizontal blends of the staged row,
// 16 channels at a time with the accumulator in registers, then the tail.
template <typename scalar_t>
MEMATTE_INLINE void sum_columns(scalar_t* __restrict out_px, const float* const* left, const float* const* right,
                                const float* lambda, int64_t n_cols, int64_t C) {
  int64_t c0 = 0;
  for (; c0 + kLanes <= C; c0 += kLanes) {
    f32x16 acc = load_lanes_as_float(out_px + c0);
    for (int64_t t = 0; t < n_cols; ++t) {
      const f32x16 l = load_lanes(left[t] + c0), r = load_lanes(right[t] + c0);
      acc += l + lambda[t] * (r - l);
    }
    const f32x16 zero = {};
    store_lanes(out_px + c0, acc < zero ? zero : acc);  // relu that keeps NaN, like torch.relu
  }
  for (int64_t c = c0; c < C; ++c) {
    float acc = cpu::to_float(out_px[c]);
    for (int64_t t = 0; t < n_cols; ++t) acc += left[t][c] + lambda[t] * (right[t][c] - left[t][c]);
    out_px[c] = cpu::from_float<scalar_t>(acc < 0.0f ? 0.0f : acc);
  }
}

// Pass 2 for a row of W = 2w output pixels.
template <typename scalar_t>
MEMATTE_INLINE void sum_row(scalar_t* out_row, const float* staged, const Source* cols, int64_t W, int64_t C) {
  for (int64_t x = 0; x < W; ++x) {
    const float* left[kTaps];
    const float* right[kTaps];
    float lambda[kTaps];
    int64_t n_cols = 0;
    for (int64_t kx = 0; kx < kTaps; ++kx) {
      const int64_t col = x + kx - 1;
      if (col < 0 || col >= W) continue;  // the conv's zero padding
      const Source& s = cols[col];
      left[n_cols] = staged + (s.i0 * kTaps + kx) * C;
      right[n_cols] = staged + (s.i1 * kTaps + kx) * C;
      lambda[n_cols++] = s.lambda;
    }
    sum_columns(out_row + x * C, left, right, lambda, n_cols, C);
  }
}

template <typename scalar_t>
struct UpsampleTapsArgs {
  scalar_t* out;         // (B, H, W, C), H = 2h, W = 2w
  const scalar_t* taps;  // (B, h, w, 3, 3, C)
  const Source* cols;    // (W,) source column of each output column
  int64_t h, w, C;
};

template <typename scalar_t>
MEMATTE_INLINE void upsample_taps_rows_impl(const UpsampleTapsArgs<scalar_t>& a, int64_t row_begin, int64_t row_end) {
  const int64_t H = 2 * a.h, W = 2 * a.w, C = a.C;
  std::vector<float> staged(a.w * kTaps * C);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t b = row / H;
    auto tap_row = [&](int64_t i) { return a.taps + (b * a.h + i) * a.w * kTaps * kTaps * C; };
    stage_row<scalar_t>(tap_row, a.h, a.w, C, row % H, staged.data());
    sum_row(a.out + row * W * C, staged.data(), a.cols, W, C);
  }
}

// One non-template overload per dtype: target_clones needs a plain function to clone.
MEMATTE_CPU_CLONES void upsample_taps_rows(const UpsampleTapsArgs<float>& a, int64_t begin, int64_t end) {
  upsample_taps_rows_impl(a, begin, end);
}
MEMATTE_CPU_CLONES void upsample_taps_rows(const UpsampleTapsArgs<c10::Half>& a, int64_t begin, int64_t end) {
  upsample_taps_rows_impl(a, begin, end);
}
MEMATTE_CPU_CLONES void upsample_taps_rows(const UpsampleTapsArgs<c10::BFloat16>& a, int64_t begin, int64_t end) {
  upsample_taps_rows_impl(a, begin, end);
}

#ifdef MEMATTE_HAVE_AVX512BF16_KERNEL
// upsample_conv_relu_: the same two passes, with the taps made here from x, a low-resolution
// row at a time, on vdpbf16ps and kept in fp32: the GEMM of the unfused path is shallow
// (Cin = 64..384 deep) and writes 9C channels per pixel only to read them back.
struct UpsampleConvArgs {
  c10::BFloat16* out;      // (B, H, W, C)
  const c10::BFloat16* x;  // (B, h, w, Cin)
  const uint16_t* weight;  // (Cin / 2, 9C, 2): pairs of input channels share a 32-bit lane
  const Source* cols;
  int64_t h, w, cin, C;
};

constexpr int64_t kTilePixels = 4;  // pixels x 4 registers of taps = 16 accumulators
constexpr int64_t kTileGroups = 4;

// taps[r, 16 g0 : 16 (g0 + G)] = x[r] . weight for P pixels.
template <int P, int G>
MEMATTE_AVX512BF16 void project_tile(const UpsampleConvArgs& a, const c10::BFloat16* x_px, int64_t g0, float* dst) {
  const int64_t taps = 9 * a.C;
  __m512 acc[P][G];
  for (int r = 0; r < P; ++r)
    for (int g = 0; g < G; ++g) acc[r][g] = _mm512_setzero_ps();
  const uint16_t* weight = a.weight + g0 * kLanes * 2;
  for (int64_t p = 0; p < a.cin / 2; ++p) {
    __m512bh wv[G];
    for (int g = 0; g < G; ++g) wv[g] = (__m512bh)_mm512_loadu_si512(weight + (p * taps + g * kLanes) * 2);
    for (int r = 0; r < P; ++r) {
      int32_t pair;
      std::memcpy(&pair, x_px + r * a.cin + 2 * p, sizeof(pair));
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
      for (int g = 0; g < G; ++g) acc[r][g] = _mm512_dpbf16_ps(acc[r][g], xv, wv[g]);
    }
  }
  for (int r = 0; r < P; ++r)
    for (int g = 0; g < G; ++g) _mm512_storeu_ps(dst + r * taps + (g0 + g) * kLanes, acc[r][g]);
}

template <int P>
MEMATTE_AVX512BF16 void project_pixels(const UpsampleConvArgs& a, const c10::BFloat16* x_px, float* dst) {
  const int64_t groups = 9 * a.C / kLanes;
  int64_t g0 = 0;
  for (; g0 + kTileGroups <= groups; g0 += kTileGroups) project_tile<P, kTileGroups>(a, x_px, g0, dst);
  switch (groups - g0) {
    case 3: project_tile<P, 3>(a, x_px, g0, dst); break;
    case 2: project_tile<P, 2>(a, x_px, g0, dst); break;
    case 1: project_tile<P, 1>(a, x_px, g0, dst); break;
    default: break;
  }
}

// Low-resolution row i of image b's taps, (w, 9C) fp32.
MEMATTE_AVX512BF16 void project_row(const UpsampleConvArgs& a, int64_t b, int64_t i, float* dst) {
  const c10::BFloat16* x_row = a.x + (b * a.h + i) * a.w * a.cin;
  const int64_t taps = 9 * a.C;
  int64_t j = 0;
  for (; j + kTilePixels <= a.w; j += kTilePixels) project_pixels<kTilePixels>(a, x_row + j * a.cin, dst + j * taps);
  switch (a.w - j) {
    case 3: project_pixels<3>(a, x_row + j * a.cin, dst + j * taps); break;
    case 2: project_pixels<2>(a, x_row + j * a.cin, dst + j * taps); break;
    case 1: project_pixels<1>(a, x_row + j * a.cin, dst + j * taps); break;
    default: break;
  }
}

MEMATTE_AVX512BF16 void upsample_conv_rows(const UpsampleConvArgs& a, int64_t row_begin, int64_t row_end) {
  const int64_t H = 2 * a.h, W = 2 * a.w, C = a.C, row_size = a.w * 9 * C;
  // The low-resolution rows an output row reads (i - 1 .. i + 1) are consecutive, so four
  // slots keyed by row modulo 4 hold them without collisions.
  constexpr int64_t kSlots = 4;
  std::vector<float> ring(kSlots * row_size);
  int64_t slot_row[kSlots] = {-1, -1, -1, -1};
  std::vector<float> staged(a.w * kTaps * C);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t b = row / H;
    auto tap_row = [&](int64_t i) -> const float* {
      const int64_t key = b * a.h + i, slot = key % kSlots;
      if (slot_row[slot] != key) project_row(a, b, i, ring.data() + slot * row_size), slot_row[slot] = key;
      return ring.data() + slot * row_size;
    };
    stage_row<float>(tap_row, a.h, a.w, C, row % H, staged.data());
    sum_row(a.out + row * W * C, staged.data(), a.cols, W, C);
  }
}
#endif

}  // namespace

void upsample_taps_relu_cpu(at::Tensor& out, const at::Tensor& taps) {
  if (out.numel() == 0) return;
  const int64_t B = out.size(0), H = out.size(1), W = out.size(2), C = out.size(3);
  const int64_t h = taps.size(1), w = taps.size(2);
  std::vector<Source> cols(W);
  for (int64_t x = 0; x < W; ++x) cols[x] = source_index(x, w);
  MEMATTE_DISPATCH_FLOAT_HALF_BF16(out.scalar_type(), "upsample_taps_relu_cpu", [&] {
    const UpsampleTapsArgs<scalar_t> args{out.mutable_data_ptr<scalar_t>(), taps.const_data_ptr<scalar_t>(),
                                          cols.data(), h, w, C};
    // A few rows per task amortise the per-task staging buffer.
    at::parallel_for(0, B * H, 4, [&](int64_t begin, int64_t end) { upsample_taps_rows(args, begin, end); });
  });
}

void upsample_conv_relu_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight) {
#ifdef MEMATTE_HAVE_AVX512BF16_KERNEL
  if (out.numel() == 0) return;
  const int64_t B = out.size(0), H = out.size(1), W = out.size(2), C = out.size(3);
  const int64_t h = x.size(1), w = x.size(2), cin = x.size(3);
  std::vector<Source> cols(W);
  for (int64_t col = 0; col < W; ++col) cols[col] = source_index(col, w);
  // weight (C, Cin, 3, 3) -> (Cin / 2, 9C, 2) bf16, tap-major like upsample_taps_relu_'s taps.
  const at::Tensor w_src = weight.to(at::kBFloat16).contiguous();
  const uint16_t* src = reinterpret_cast<const uint16_t*>(w_src.const_data_ptr<c10::BFloat16>());
  std::vector<uint16_t> packed(cin * 9 * C);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t i = 0; i < cin; ++i)
      for (int64_t t = 0; t < 9; ++t) packed[((i / 2) * 9 * C + t * C + c) * 2 + i % 2] = src[(c * cin + i) * 9 + t];
  const UpsampleConvArgs args{out.mutable_data_ptr<c10::BFloat16>(), x.const_data_ptr<c10::BFloat16>(), packed.data(),
                              cols.data(), h, w, cin, C};
  // Contiguous row ranges: each range makes its low-resolution rows once (plus one at its start).
  at::parallel_for(0, B * H, 4, [&](int64_t begin, int64_t end) { upsample_conv_rows(args, begin, end); });
#else
  TORCH_CHECK(false, "mematte_ext.upsample_conv_relu_: this build has no AVX512-BF16 kernel");
#endif
}

}  // namespace mematte
