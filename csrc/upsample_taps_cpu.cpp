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
// down to the baseline ISA, whichever clone the loader picks.
using f32x16 = float __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

MEMATTE_INLINE f32x16 load_lanes(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename scalar_t>
MEMATTE_INLINE f32x16 load_lanes_as_float(const scalar_t* p) {
  float buffer[kLanes];
  for (int64_t c = 0; c < kLanes; ++c) buffer[c] = cpu::to_float(p[c]);
  return load_lanes(buffer);
}

template <typename scalar_t>
MEMATTE_INLINE void store_lanes(scalar_t* p, f32x16 v) {
  float buffer[kLanes];
  std::memcpy(buffer, &v, sizeof(v));
  for (int64_t c = 0; c < kLanes; ++c) p[c] = cpu::from_float<scalar_t>(buffer[c]);
}

template <typename scalar_t>
struct UpsampleTapsArgs {
  scalar_t* out;         // (B, H, W, C), H = 2h, W = 2w
  const scalar_t* taps;  // (B, h, w, 3, 3, C)
  const Source* cols;    // (W,) source column of each output column
  int64_t h, w, C;
};

// Pass 1: staged (w, 3, C) = sum over the kernel rows that fall inside the image of the
// vertical blend of their taps' two source rows.
template <typename scalar_t>
MEMATTE_INLINE void stage_row(const UpsampleTapsArgs<scalar_t>& a, int64_t b, int64_t y, float* __restrict staged) {
  const int64_t H = 2 * a.h, span = kTaps * a.C;  // one kernel row's taps at one pixel
  bool first = true;
  for (int64_t ky = 0; ky < kTaps; ++ky) {
    const int64_t r = y + ky - 1;
    if (r < 0 || r >= H) continue;  // the conv's zero padding
    const Source s = source_index(r, a.h);
    const scalar_t* top = a.taps + ((b * a.h + s.i0) * a.w * kTaps + ky) * span;
    const scalar_t* bottom = a.taps + ((b * a.h + s.i1) * a.w * kTaps + ky) * span;
    for (int64_t j = 0; j < a.w; ++j) {
      const scalar_t* __restrict t0 = top + j * kTaps * span;
      const scalar_t* __restrict t1 = bottom + j * kTaps * span;
      float* __restrict dst = staged + j * span;
      if (first) {
        for (int64_t c = 0; c < span; ++c) {
          const float v0 = cpu::to_float(t0[c]);
          dst[c] = v0 + s.lambda * (cpu::to_float(t1[c]) - v0);
        }
      } else {
        for (int64_t c = 0; c < span; ++c) {
          const float v0 = cpu::to_float(t0[c]);
          dst[c] += v0 + s.lambda * (cpu::to_float(t1[c]) - v0);
        }
      }
    }
    first = false;
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

template <typename scalar_t>
MEMATTE_INLINE void upsample_taps_rows_impl(const UpsampleTapsArgs<scalar_t>& a, int64_t row_begin, int64_t row_end) {
  const int64_t H = 2 * a.h, W = 2 * a.w, C = a.C;
  std::vector<float> staged(a.w * kTaps * C);
  for (int64_t row = row_begin; row < row_end; ++row) {
    stage_row(a, row / H, row % H, staged.data());
    scalar_t* out_row = a.out + row * W * C;
    for (int64_t x = 0; x < W; ++x) {
      const float* left[kTaps];
      const float* right[kTaps];
      float lambda[kTaps];
      int64_t n_cols = 0;
      for (int64_t kx = 0; kx < kTaps; ++kx) {
        const int64_t col = x + kx - 1;
        if (col < 0 || col >= W) continue;  // the conv's zero padding
        const Source& s = a.cols[col];
        left[n_cols] = staged.data() + (s.i0 * kTaps + kx) * C;
        right[n_cols] = staged.data() + (s.i1 * kTaps + kx) * C;
        lambda[n_cols++] = s.lambda;
      }
      sum_columns(out_row + x * C, left, right, lambda, n_cols, C);
    }
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

}  // namespace mematte
