// ViTMatte's global attention on CPUs with AVX2 + FMA, computed in fp32 for fp32, bf16 and
// fp16 tensors (head dim 64):
//
//   out[i] = softmax_j(scale * q[i] . k[j] + q[i] . rel_h[row(i), row(j)] + q[i] . rel_w[col(i), col(j)]) v[j]
//
// over all the H x W tokens j of i's image, straight from the (B, H, W, 3C) qkv projection.
// Flash-style: the logits exist one (query block x key block) tile at a time, the softmax is
// online, and the position bias is gathered inside the key loop from each query's own terms,
// bias_h[i, 0:H] and bias_w[i, 0:W], computed per query block. Memory: the position tables
// transposed (H x 64 x H + W x 64 x W floats), the packed keys and values of one (image, head)
// and per-thread tiles; never N x N, never N x (H + W).
//
// Work per (image, head): K and V are converted to fp32 and re-laid out once,
//   K: (key blocks of 16, 64 channels, 16 keys)  so a 16-key row of logits is 64 FMAs;
//   V: (keys, 64 channels)                       row-major, 16 channels per micro-tile;
// then each task takes kBlockM queries through all keys in blocks of kBlockN:
// logits tile (6 x 16 micro-tiles) -> bias, online softmax in base 2 -> output tile
// (6 x 16 micro-tiles). The micro-tiles keep 12 accumulators in registers.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_math.h"
#include "ltrm.h"

namespace mematte {

bool cpu_has_avx2_fma() {
#ifdef MEMATTE_HAVE_AVX2_KERNEL
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

#ifdef MEMATTE_HAVE_AVX2_KERNEL
namespace {

constexpr int64_t kDim = 64;      // head dim
constexpr int64_t kLanes = 8;     // fp32 lanes of a register
constexpr int64_t kKeyTile = 16;  // keys per logits micro-tile, and per packed K block
constexpr int64_t kRows = 6;      // query rows per micro-tile: 6 x 16 = 12 accumulators
constexpr int64_t kBlockM = 48;   // queries per task
constexpr int64_t kBlockN = 128;  // keys per softmax step
constexpr int64_t kBiasCols = 32; // bias rows are computed 32 columns (4 registers) at a time

constexpr float kLog2e = 1.4426950408889634f;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct GridArgs {
  int64_t H, W, heads;
  int64_t stride_token;  // elements between consecutive tokens of qkv (3C)
  float scale_log2;      // scale * log2(e): the softmax runs in base 2
  // The gathered position tables, transposed and widened: (H, 64, H_pad) and (W, 64, W_pad)
  // with H_pad, W_pad multiples of kBiasCols, zero past H (W); premultiplied by log2(e).
  const float* rel_h_t;
  const float* rel_w_t;
  int64_t h_pad, w_pad;
};

MEMATTE_AVX2 inline __m256 exp2_nonpositive(__m256 y) {
  // As cpu::exp2_nonpositive: 2^n * 2^f, |f| <= 1/2, 2^f from cpu::kExp2Poly.
  y = _mm256_max_ps(_mm256_set1_ps(-126.0f), y);  // max returns its second operand for NaN: keep it
  const __m256 n = _mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(y, n);
  __m256 p = _mm256_set1_ps(cpu::kExp2Poly[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(cpu::kExp2Poly[i]));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

MEMATTE_AVX2 inline float reduce_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

MEMATTE_AVX2 inline float reduce_add(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One (image, head)'s keys and values in fp32: kp (N_pad / 16, 64, 16), vp (N_pad, 64), zero
// past N (N_pad a multiple of kBlockN). Key blocks [block_begin, block_end) of 16.
template <typename scalar_t>
MEMATTE_AVX2 void pack_kv(const scalar_t* k, const scalar_t* v, int64_t n, int64_t stride, int64_t block_begin,
                          int64_t block_end, float* kp, float* vp) {
  for (int64_t blk = block_begin; blk < block_end; ++blk) {
    float* kb = kp + blk * kDim * kKeyTile;
    for (int64_t t = 0; t < kKeyTile; ++t) {
      const int64_t j = blk * kKeyTile + t;
      float* vrow = vp + j * kDim;
      if (j >= n) {
        for (int64_t c = 0; c < kDim; ++c) kb[c * kKeyTile + t] = 0.0f, vrow[c] = 0.0f;
        continue;
      }
      const scalar_t* krow = k + j * stride;
      for (int64_t c = 0; c < kDim; ++c) kb[c * kKeyTile + t] = cpu::to_float(krow[c]);
      const scalar_t* src = v + j * stride;
      for (int64_t c = 0; c < kDim; ++c) vrow[c] = cpu::to_float(src[c]);
    }
  }
}

// logits[r, 0:16 * tiles] = q[r] . k[0:16 * tiles] for kRows rows; q_rows (kRows, 64),
// k_block packed (tiles, 64, 16), logits with row stride kBlockN.
MEMATTE_AVX2 inline void logits_tile(const float* q_rows, const float* k_block, int64_t tiles, float* logits) {
  for (int64_t t = 0; t < tiles; ++t) {
    const float* kb = k_block + t * kDim * kKeyTile;
    __m256 acc[kRows][2];
    for (int64_t r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t c = 0; c < kDim; ++c) {
      const __m256 b0 = _mm256_loadu_ps(kb + c * kKeyTile), b1 = _mm256_loadu_ps(kb + c * kKeyTile + kLanes);
      for (int64_t r = 0; r < kRows; ++r) {
        const __m256 a = _mm256_broadcast_ss(q_rows + r * kDim + c);
        acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
      }
    }
    for (int64_t r = 0; r < kRows; ++r) {
      _mm256_storeu_ps(logits + r * kBlockN + t * kKeyTile, acc[r][0]);
      _mm256_storeu_ps(logits + r * kBlockN + t * kKeyTile + kLanes, acc[r][1]);
    }
  }
}

// out[r, :] = out[r, :] * rescale[r] + probs[r, 0:keys] . v[0:keys] for kRows rows, 16
// channels at a time; probs with row stride kBlockN, v (keys, 64), out (kRows, 64).
MEMATTE_AVX2 inline void output_tile(const float* probs, const float* v_block, int64_t keys, const float* rescale,
                                     float* out) {
  for (int64_t c0 = 0; c0 < kDim; c0 += 2 * kLanes) {
    __m256 acc[kRows][2];
    for (int64_t r = 0; r < kRows; ++r) {
      const __m256 s = _mm256_set1_ps(rescale[r]);
      acc[r][0] = _mm256_mul_ps(_mm256_loadu_ps(out + r * kDim + c0), s);
      acc[r][1] = _mm256_mul_ps(_mm256_loadu_ps(out + r * kDim + c0 + kLanes), s);
    }
    for (int64_t j = 0; j < keys; ++j) {
      const __m256 b0 = _mm256_loadu_ps(v_block + j * kDim + c0), b1 = _mm256_loadu_ps(v_block + j * kDim + c0 + kLanes);
      for (int64_t r = 0; r < kRows; ++r) {
        const __m256 a = _mm256_broadcast_ss(probs + r * kBlockN + j);
        acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
      }
    }
    for (int64_t r = 0; r < kRows; ++r) {
      _mm256_storeu_ps(out + r * kDim + c0, acc[r][0]);
      _mm256_storeu_ps(out + r * kDim + c0 + kLanes, acc[r][1]);
    }
  }
}

// bias[0:cols_pad] = q . table[0:cols_pad], table (64, cols_pad): one query's position terms
// along one grid axis, 4 registers at a time so that the FMA chains overlap.
MEMATTE_AVX2 inline void position_terms(const float* q, const float* table, int64_t cols_pad, float* bias) {
  for (int64_t x0 = 0; x0 < cols_pad; x0 += kBiasCols) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t c = 0; c < kDim; ++c) {
      const __m256 a = _mm256_broadcast_ss(q + c);
      for (int64_t t = 0; t < 4; ++t) acc[t] = _mm256_fmadd_ps(a, _mm256_loadu_ps(table + c * cols_pad + x0 + t * kLanes), acc[t]);
    }
    for (int64_t t = 0; t < 4; ++t) _mm256_storeu_ps(bias + x0 + t * kLanes, acc[t]);
  }
}

// Per-thread tiles of one query block.
struct Scratch {
  std::vector<float> q, logits, out, bias_h, bias_w;
  Scratch(const GridArgs& a)
      : q(kBlockM * kDim), logits(kBlockM * kBlockN), out(kBlockM * kDim), bias_h(kBlockM * a.h_pad),
        bias_w(kBlockM * a.w_pad) {}
};

// kBlockM queries [m0, m0 + rows) of one (image, head) against all N keys, packed in kp, vp.
template <typename scalar_t>
MEMATTE_AVX2 void attend_block(const GridArgs& a, const scalar_t* q, scalar_t* out, int64_t out_stride, int64_t m0,
                               const float* kp, const float* vp, Scratch& s) {
  const int64_t N = a.H * a.W;
  const int64_t rows = std::min(kBlockM, N - m0);
  const int64_t tile_rows = round_up(rows, kRows);
  float* q_rows = s.q.data();
  float* logits = s.logits.data();
  float* acc = s.out.data();
  // The block's queries in fp32 (rows past the end repeat the last one: valid, unwritten),
  // and each query's position terms, already in base 2.
  for (int64_t r = 0; r < tile_rows; ++r) {
    const int64_t i = m0 + std::min(r, rows - 1);
    const scalar_t* src = q + i * a.stride_token;
    for (int64_t c = 0; c < kDim; ++c) q_rows[r * kDim + c] = cpu::to_float(src[c]);
    position_terms(q_rows + r * kDim, a.rel_h_t + (i / a.W) * kDim * a.h_pad, a.h_pad, s.bias_h.data() + r * a.h_pad);
    position_terms(q_rows + r * kDim, a.rel_w_t + (i % a.W) * kDim * a.w_pad, a.w_pad, s.bias_w.data() + r * a.w_pad);
  }
  std::fill(acc, acc + tile_rows * kDim, 0.0f);
  float row_max[kBlockM], row_sum[kBlockM], rescale[kBlockM];
  std::fill(row_max, row_max + kBlockM, -std::numeric_limits<float>::infinity());
  std::fill(row_sum, row_sum + kBlockM, 0.0f);

  const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 minus_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t n0 = 0; n0 < N; n0 += kBlockN) {
    const int64_t valid = std::min(kBlockN, N - n0);
    const int64_t vectors = (valid + kLanes - 1) / kLanes;
    for (int64_t r = 0; r < tile_rows; r += kRows) {
      logits_tile(q_rows + r * kDim, kp + n0 * kDim, (valid + kKeyTile - 1) / kKeyTile, logits + r * kBlockN);
    }
    for (int64_t r = 0; r < tile_rows; ++r) {
      float* row = logits + r * kBlockN;
      const float* bias_h = s.bias_h.data() + r * a.h_pad;
      const float* bias_w = s.bias_w.data() + r * a.w_pad;
      // Scale and bias, one grid row of keys at a time: bias_h is constant along it and
      // bias_w a contiguous run.
      for (int64_t j0 = 0; j0 < valid;) {
        const int64_t y = (n0 + j0) / a.W, x0 = (n0 + j0) % a.W;
        const int64_t run = std::min(valid - j0, a.W - x0);
        const float bh = bias_h[y];
        for (int64_t t = 0; t < run; ++t) row[j0 + t] = row[j0 + t] * a.scale_log2 + (bh + bias_w[x0 + t]);
        j0 += run;
      }
      __m256 block_max = minus_inf;
      for (int64_t t = 0; t < vectors; ++t) {
        const __m256 live = _mm256_cmp_ps(lane, _mm256_set1_ps(static_cast<float>(valid - t * kLanes)), _CMP_LT_OQ);
        const __m256 x = _mm256_blendv_ps(minus_inf, _mm256_loadu_ps(row + t * kLanes), live);
        block_max = _mm256_max_ps(block_max, x);
      }
      const float next = std::max(row_max[r], reduce_max(block_max));
      // First block: 2^-126 times a zero sum and zero accumulators.
      rescale[r] = cpu::exp2_nonpositive(row_max[r] - next);
      row_max[r] = next;
      const __m256 m = _mm256_set1_ps(next);
      __m256 sum = _mm256_setzero_ps();
      for (int64_t t = 0; t < vectors; ++t) {
        const __m256 live = _mm256_cmp_ps(lane, _mm256_set1_ps(static_cast<float>(valid - t * kLanes)), _CMP_LT_OQ);
        const __m256 p = _mm256_and_ps(live, exp2_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(row + t * kLanes), m)));
        sum = _mm256_add_ps(sum, p);
        _mm256_storeu_ps(row + t * kLanes, p);
      }
      row_sum[r] = row_sum[r] * rescale[r] + reduce_add(sum);
    }
    for (int64_t r = 0; r < tile_rows; r += kRows) {
      output_tile(logits + r * kBlockN, vp + n0 * kDim, valid, rescale + r, acc + r * kDim);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = 1.0f / row_sum[r];
    scalar_t* dst = out + (m0 + r) * out_stride;
    for (int64_t c = 0; c < kDim; ++c) dst[c] = cpu::from_float<scalar_t>(acc[r * kDim + c] * inv);
  }
}

template <typename scalar_t>
void run_grid(const at::Tensor& qkv, const at::Tensor& rel_h, const at::Tensor& rel_w, int64_t heads, double scale,
              at::Tensor& out) {
  const int64_t B = qkv.size(0), H = qkv.size(1), W = qkv.size(2), C = heads * kDim, N = H * W;
  const int64_t h_pad = round_up(H, kBiasCols), w_pad = round_up(W, kBiasCols);
  const std::vector<float> rel_h_t = transposed_rel_table(rel_h, h_pad), rel_w_t = transposed_rel_table(rel_w, w_pad);
  const GridArgs a{H, W, heads, 3 * C, static_cast<float>(scale * kLog2e), rel_h_t.data(), rel_w_t.data(), h_pad, w_pad};
  const int64_t n_pad = round_up(N, kBlockN);
  std::vector<float> kp(n_pad * kDim), vp(n_pad * kDim);
  const scalar_t* base = qkv.const_data_ptr<scalar_t>();
  scalar_t* out_base = out.mutable_data_ptr<scalar_t>();
  // One (image, head) at a time: its packed keys and values (N x 512 bytes) stay shared in
  // the cache by every thread's query blocks.
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < heads; ++h) {
      const scalar_t* q = base + b * N * 3 * C + h * kDim;
      at::parallel_for(0, n_pad / kKeyTile, 16, [&](int64_t begin, int64_t end) {
        pack_kv(q + C, q + 2 * C, N, 3 * C, begin, end, kp.data(), vp.data());
      });
      at::parallel_for(0, (N + kBlockM - 1) / kBlockM, 1, [&](int64_t begin, int64_t end) {
        Scratch s(a);
        for (int64_t blk = begin; blk < end; ++blk) {
          attend_block(a, q, out_base + b * N * C + h * kDim, C, blk * kBlockM, kp.data(), vp.data(), s);
        }
      });
    }
  }
}

}  // namespace
#endif

at::Tensor global_attention_cpu(const at::Tensor& qkv, const at::Tensor& rel_h, const at::Tensor& rel_w,
                                int64_t num_heads, double scale) {
  at::Tensor out = at::empty({qkv.size(0), qkv.size(1), qkv.size(2), num_heads * 64}, qkv.options());
  if (out.numel() == 0) return out;
#ifdef MEMATTE_HAVE_AVX2_KERNEL
  MEMATTE_DISPATCH_FLOAT_HALF_BF16(qkv.scalar_type(), "global_attention_cpu",
                                   [&] { run_grid<scalar_t>(qkv, rel_h, rel_w, num_heads, scale, out); });
#else
  TORCH_CHECK(false, "mematte_ext.global_attention: this build has no AVX2 kernel");
#endif
  return out;
}

}  // namespace mematte
