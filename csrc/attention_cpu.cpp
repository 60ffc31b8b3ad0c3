// Varlen flash attention for bf16 on CPUs with AVX512-BF16 (head dim 64):
//
//   out[i] = softmax_j(scale * q[i] . k[j] + bias[i, j]) v[j]      over the keys j of i's sequence,
//
// with an optional decomposed relative-position bias for sequences that are H x W grids (the
// ViT's windows): bias[i, j] = q[i] . rel_h[row(i), row(j)] + q[i] . rel_w[col(i), col(j)],
// computed per query (2 x 16 dot products) and never materialised as an N x N matrix.
//
// packed (T, heads, 64) tensors with cu_seqlens, flash-attention's convention. Both products
// run on vdpbf16ps (bf16 pairs multiplied, accumulated in fp32); the logits, the online
// softmax and the output accumulators stay fp32; the probabilities are rounded to bf16 for
// the second product, as in every bf16 flash attention. PyTorch's CPU SDPA runs the same
// shapes at fp32 speed on these CPUs; this is the bf16 rate.
//
// Whole grids (ViTMatte's global attention, relpos_attention): every sequence is an H x W grid
// of any size, and each query has its own position terms, bias_h[i, 0:H] and bias_w[i, 0:W]
// (fp32, q . rel_h[row(i), r]), computed per query block from the gathered tables; key j's
// bias, bias_h[i, j / W] + bias_w[i, j % W], is gathered inside the key loop. H + W values per
// query of the block, never N, never the whole grid's.
//
// The same kernel runs the ViT's window attention straight from the (B, H, W, 3C) qkv
// projection (window_attention): each window is a sequence whose tokens are read where
// they lie in the image's grid; the padding that upstream appends as zero tokens is a key
// and value equal to the projection's bias, and its queries are not computed.
//
// Work: per (sequence, head), K and V are first re-laid out for the dot-product instruction
// (pairs of adjacent elements along the reduction axis share a 32-bit lane):
//   K: (key blocks of 16, d/2, 16 keys, 2)   so a 16-key row of logits is d/2 instructions;
//   V: (key pairs, d, 2)                       so a 64-channel output row is 4 registers.
// Then each task takes kBlockM queries of one (sequence, head) through all its keys in
// blocks of kBlockN: logits tile -> online softmax -> probabilities (bf16) -> output tile.
// Long sequences are packed once, shared by many tasks; short ones (windows) are packed by
// the task that attends them, into a buffer that stays in its core's cache.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_math.h"
#include "ltrm.h"

namespace mematte {

bool cpu_has_avx512_bf16() {
#ifdef MEMATTE_HAVE_AVX512BF16_KERNEL
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

#ifdef MEMATTE_HAVE_AVX512BF16_KERNEL
namespace {

constexpr int64_t kDim = 64;      // head dim
constexpr int64_t kPairs = kDim / 2;
constexpr int64_t kBlockM = 32;   // queries per task
constexpr int64_t kBlockN = 128;  // keys per softmax step
constexpr int64_t kLanes = 16;    // fp32 lanes of a register
constexpr int64_t kRowsQK = 8;    // query rows per logits micro-tile: 8 x 32 keys = 16 accumulators
constexpr int64_t kRowsPV = 4;    // query rows per output micro-tile: 4 x 64 channels = 16 accumulators

constexpr int64_t kShortSequence = 1024;  // packed per task below this length

// A sequence of tokens: a varlen segment, [start, start + length), or a window of an image's
// token grid, whose positions outside the grid are padding.
struct Sequence {
  int64_t start, length;
  int64_t image, window_row, window_col;  // windows only
};

struct AttentionArgs {
  const c10::BFloat16* q;  // (T, heads, 64), strides below; the head dim is contiguous
  const c10::BFloat16* k;
  const c10::BFloat16* v;
  int64_t stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh;
  c10::BFloat16* out;  // (T, heads, 64) contiguous
  int64_t heads;
  float scale_log2;  // scale * log2(e): the softmax runs in base 2
  const uint16_t* rel_h;  // packed like K: (H, 32, 16, 2), lane = key row; null without a bias
  const uint16_t* rel_w;  // (W, 32, 16, 2), lane = key column
  int64_t rel_cols;  // W of the H x W grid of a sequence with a position bias
  // Windows (window > 0): tokens are an (images, image_h, image_w) grid cut into window x
  // window sequences; padding positions are keys with pad_k / pad_v (heads, 64) and no query.
  int64_t window, image_h, image_w;
  const c10::BFloat16* pad_k;
  const c10::BFloat16* pad_v;
  // Whole grids: the gathered position tables transposed, (grid_h, 64, grid_h_pad) and
  // (grid_w, 64, grid_w_pad) fp32 times log2(e), zero past grid_h (grid_w); null otherwise.
  const float* grid_rel_h;
  const float* grid_rel_w;
  int64_t grid_h, grid_w, grid_h_pad, grid_w_pad;
};

constexpr int64_t kTermCols = 64;  // position terms are computed 64 columns (4 registers) at a time

// Floats of per-task scratch attend_block needs for a whole grid's position terms.
int64_t grid_terms_size(const AttentionArgs& a) { return a.grid_rel_h != nullptr ? kBlockM * (a.grid_h_pad + a.grid_w_pad) : 0; }

// The token row of position p of sequence s, or -1 for window padding.
inline int64_t token_row(const AttentionArgs& a, const Sequence& s, int64_t p) {
  if (a.window == 0) return s.start + p;
  const int64_t y = s.window_row * a.window + p / a.window, x = s.window_col * a.window + p % a.window;
  return y < a.image_h && x < a.image_w ? (s.image * a.image_h + y) * a.image_w + x : -1;
}

inline const c10::BFloat16* key_row(const AttentionArgs& a, const Sequence& s, int64_t p, int64_t head) {
  const int64_t row = token_row(a, s, p);
  return row >= 0 ? a.k + row * a.stride_kt + head * a.stride_kh : a.pad_k + head * kDim;
}

inline const c10::BFloat16* value_row(const AttentionArgs& a, const Sequence& s, int64_t p, int64_t head) {
  const int64_t row = token_row(a, s, p);
  return row >= 0 ? a.v + row * a.stride_vt + head * a.stride_vh : a.pad_v + head * kDim;
}

int64_t padded_length(int64_t length) { return (length + kBlockN - 1) / kBlockN * kBlockN; }

MEMATTE_AVX512BF16 inline __m512 exp2_nonpositive(__m512 y) {
  // 2^y = 2^n * 2^f, |f| <= 1/2, 2^f from a degree-5 minimax polynomial (relative error 8e-8).
  y = _mm512_max_ps(_mm512_set1_ps(-126.0f), y);  // max returns its second operand for NaN: keep it
  const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(y, n);
  __m512 p = _mm512_set1_ps(1.3276446843519807e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.675541892647743e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550713464617729e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022120237350464e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931469440460205e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000001192092896f));
  return _mm512_scalef_ps(p, n);
}

MEMATTE_AVX512BF16 inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

// Re-lay out one (sequence, head)'s keys and values, zero past the sequence's end.
// kp and vp hold padded_length(s.length) * 64 elements each.
MEMATTE_AVX512BF16 void pack_kv(const AttentionArgs& a, const Sequence& s, int64_t head, uint16_t* kp, uint16_t* vp) {
  const int64_t padded = padded_length(s.length);
  // Only the last block has padding keys; earlier ones are overwritten in full.
  const int64_t tail = s.length / kBlockN * kBlockN;
  std::memset(kp + tail * kDim, 0, (padded - tail) * kDim * sizeof(uint16_t));
  std::memset(vp + tail * kDim, 0, (padded - tail) * kDim * sizeof(uint16_t));
  // K: a key's 32 pairs go to 32 lanes, one per pair row of its 16-key block.
  for (int64_t j = 0; j < s.length; ++j) {
    const auto* key = reinterpret_cast<const uint32_t*>(key_row(a, s, j, head));
    uint32_t* lanes = reinterpret_cast<uint32_t*>(kp) + (j / kLanes) * kPairs * kLanes + j % kLanes;
    for (int64_t p = 0; p < kPairs; ++p) lanes[p * kLanes] = key[p];
  }
  // V: two keys' rows interleaved element by element, 16 channels per register.
  const __m512i low = _mm512_setr_epi32(0x00200000, 0x00210001, 0x00220002, 0x00230003, 0x00240004, 0x00250005,
                                        0x00260006, 0x00270007, 0x00280008, 0x00290009, 0x002a000a, 0x002b000b,
                                        0x002c000c, 0x002d000d, 0x002e000e, 0x002f000f);
  const __m512i high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
  for (int64_t j = 0; j < s.length; j += 2) {
    const c10::BFloat16* row0 = value_row(a, s, j, head);
    const c10::BFloat16* row1 = j + 1 < s.length ? value_row(a, s, j + 1, head) : nullptr;
    uint16_t* pair = vp + j * kDim;
    for (int64_t half = 0; half < 2; ++half) {  // channels 0..31, then 32..63
      const __m512i x0 = _mm512_loadu_si512(row0 + 32 * half);
      const __m512i x1 = row1 != nullptr ? _mm512_loadu_si512(row1 + 32 * half) : _mm512_setzero_si512();
      _mm512_storeu_si512(pair + 64 * half, _mm512_permutex2var_epi16(x0, low, x1));
      _mm512_storeu_si512(pair + 64 * half + 32, _mm512_permutex2var_epi16(x0, high, x1));
    }
  }
}

// logits[r, 0:32 * halves] = q[r] . k[key0 + 0:32 * halves] for kRowsQK rows, 32 keys at a time.
MEMATTE_AVX512BF16 inline void logits_tile(const uint16_t* q_rows, const uint16_t* k_block, int64_t halves,
                                           float* logits) {
  for (int64_t half = 0; half < halves; ++half) {
    const uint16_t* k0 = k_block + (2 * half) * kPairs * kLanes * 2;  // keys 32*half .. +15
    const uint16_t* k1 = k0 + kPairs * kLanes * 2;                      // the next 16
    __m512 acc[kRowsQK][2];
    for (int64_t r = 0; r < kRowsQK; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t p = 0; p < kPairs; ++p) {
      const __m512bh b0 = as_bh(_mm512_loadu_si512(k0 + p * kLanes * 2));
      const __m512bh b1 = as_bh(_mm512_loadu_si512(k1 + p * kLanes * 2));
      for (int64_t r = 0; r < kRowsQK; ++r) {
        int32_t pair;
        std::memcpy(&pair, q_rows + r * kDim + 2 * p, sizeof(pair));
        const __m512bh a = as_bh(_mm512_set1_epi32(pair));
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
      }
    }
    for (int64_t r = 0; r < kRowsQK; ++r) {
      _mm512_storeu_ps(logits + r * kBlockN + 32 * half, acc[r][0]);
      _mm512_storeu_ps(logits + r * kBlockN + 32 * half + 16, acc[r][1]);
    }
  }
}

// out[r, :] = out[r, :] * rescale[r] + probs[r, 0:2 * pairs] . v for kRowsPV rows.
MEMATTE_AVX512BF16 inline void output_tile(const uint16_t* probs, const uint16_t* v_block, int64_t pairs,
                                           const float* rescale, float* out) {
  __m512 acc[kRowsPV][4];
  for (int64_t r = 0; r < kRowsPV; ++r) {
    const __m512 s = _mm512_set1_ps(rescale[r]);
    for (int64_t t = 0; t < 4; ++t) acc[r][t] = _mm512_mul_ps(_mm512_loadu_ps(out + r * kDim + t * kLanes), s);
  }
  for (int64_t pair = 0; pair < pairs; ++pair) {
    __m512bh b[4];
    for (int64_t t = 0; t < 4; ++t) b[t] = as_bh(_mm512_loadu_si512(v_block + (pair * kDim + t * kLanes) * 2));
    for (int64_t r = 0; r < kRowsPV; ++r) {
      int32_t p;
      std::memcpy(&p, probs + r * kBlockN + 2 * pair, sizeof(p));
      const __m512bh a = as_bh(_mm512_set1_epi32(p));
      for (int64_t t = 0; t < 4; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], a, b[t]);
    }
  }
  for (int64_t r = 0; r < kRowsPV; ++r)
    for (int64_t t = 0; t < 4; ++t) _mm512_storeu_ps(out + r * kDim + t * kLanes, acc[r][t]);
}

// One query's position bias terms, q . rel[i, 0:16] for its grid row (col) i, times log2(e).
MEMATTE_AVX512BF16 inline __m512 rel_bias(const uint16_t* q_row, const uint16_t* rel_table) {
  __m512 even = _mm512_setzero_ps(), odd = _mm512_setzero_ps();  // two chains hide the latency
  for (int64_t p = 0; p < kPairs; p += 2) {
    int32_t pair[2];
    std::memcpy(pair, q_row + 2 * p, sizeof(pair));
    even = _mm512_dpbf16_ps(even, as_bh(_mm512_set1_epi32(pair[0])), as_bh(_mm512_loadu_si512(rel_table + p * kLanes * 2)));
    odd = _mm512_dpbf16_ps(odd, as_bh(_mm512_set1_epi32(pair[1])), as_bh(_mm512_loadu_si512(rel_table + (p + 1) * kLanes * 2)));
  }
  return _mm512_mul_ps(_mm512_add_ps(even, odd), _mm512_set1_ps(1.4426950408889634f));
}

// terms[0:cols_pad] = q . table[0:cols_pad] for one bf16 query row, table (64, cols_pad) fp32:
// a query's position terms along one grid axis, 4 registers at a time so the FMA chains overlap.
MEMATTE_AVX512BF16 inline void position_terms(const uint16_t* q_row, const float* table, int64_t cols_pad,
                                              float* terms) {
  for (int64_t x0 = 0; x0 < cols_pad; x0 += kTermCols) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t c = 0; c < kDim; ++c) {
      const uint32_t bits = static_cast<uint32_t>(q_row[c]) << 16;  // bf16 -> fp32, exact
      float qc;
      std::memcpy(&qc, &bits, sizeof(qc));
      const __m512 q = _mm512_set1_ps(qc);
      for (int64_t t = 0; t < 4; ++t)
        acc[t] = _mm512_fmadd_ps(q, _mm512_loadu_ps(table + c * cols_pad + x0 + t * kLanes), acc[t]);
    }
    for (int64_t t = 0; t < 4; ++t) _mm512_storeu_ps(terms + x0 + t * kLanes, acc[t]);
  }
}

// kBlockM queries of one (sequence, head) against all the sequence's keys, packed in kp, vp;
// grid_terms: grid_terms_size(a) floats of scratch.
MEMATTE_AVX512BF16 void attend_block(const AttentionArgs& a, const Sequence& s, int64_t head, int64_t m0,
                                     const uint16_t* kp, const uint16_t* vp, float* grid_terms) {
  alignas(64) uint16_t q_rows[kBlockM * kDim];   // the block's queries, zero past the end
  alignas(64) float logits[kBlockM * kBlockN];
  alignas(64) uint16_t probs[kBlockM * kBlockN];
  alignas(64) float out[kBlockM * kDim];
  alignas(64) float row_max[kBlockM], row_sum[kBlockM], rescale[kBlockM];

  // The last blocks of a sequence are short (a 196-token window's keys: 128 + 68): work on
  // the rows and keys that exist, rounded up to the micro-tiles.
  const int64_t rows = std::min(kBlockM, s.length - m0);
  const int64_t tile_rows = (rows + kRowsQK - 1) / kRowsQK * kRowsQK;
  int64_t out_rows[kBlockM];  // token rows to write, -1 for window padding
  std::memset(q_rows, 0, tile_rows * kDim * sizeof(uint16_t));
  for (int64_t r = 0; r < rows; ++r) {
    out_rows[r] = token_row(a, s, m0 + r);
    if (out_rows[r] < 0) continue;  // a padding query: its output is not wanted
    std::memcpy(q_rows + r * kDim, a.q + out_rows[r] * a.stride_qt + head * a.stride_qh, kDim * sizeof(uint16_t));
  }
  std::memset(out, 0, tile_rows * kDim * sizeof(float));
  for (int64_t r = 0; r < kBlockM; ++r) row_max[r] = -std::numeric_limits<float>::infinity(), row_sum[r] = 0.0f;

  // Each row's bias terms, one register per grid axis, indexed by the key's row / column.
  const bool biased = a.rel_h != nullptr;
  __m512 row_bias_h[kBlockM], row_bias_w[kBlockM];
  if (biased) {
    for (int64_t r = 0; r < tile_rows; ++r) {
      const int64_t i = std::min(m0 + r, s.length - 1);  // padding rows: any valid table
      row_bias_h[r] = rel_bias(q_rows + r * kDim, a.rel_h + (i / a.rel_cols) * kPairs * kLanes * 2);
      row_bias_w[r] = rel_bias(q_rows + r * kDim, a.rel_w + (i % a.rel_cols) * kPairs * kLanes * 2);
    }
  }

  // Whole grids: each row's position terms, in base 2 (padding rows: those of a zero query).
  const bool grid_biased = a.grid_rel_h != nullptr;
  const float* grid_rows_h[kBlockM];
  const float* grid_rows_w[kBlockM];
  if (grid_biased) {
    for (int64_t r = 0; r < tile_rows; ++r) {
      const int64_t i = m0 + std::min(r, rows - 1);  // the query's position in its grid
      float* terms_h = grid_terms + r * a.grid_h_pad;
      float* terms_w = grid_terms + kBlockM * a.grid_h_pad + r * a.grid_w_pad;
      position_terms(q_rows + r * kDim, a.grid_rel_h + (i / a.grid_w) * kDim * a.grid_h_pad, a.grid_h_pad, terms_h);
      position_terms(q_rows + r * kDim, a.grid_rel_w + (i % a.grid_w) * kDim * a.grid_w_pad, a.grid_w_pad, terms_w);
      grid_rows_h[r] = terms_h;
      grid_rows_w[r] = terms_w;
    }
  }

  const __m512 scale = _mm512_set1_ps(a.scale_log2);
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t n0 = 0; n0 < s.length; n0 += kBlockN) {
    const int64_t valid = std::min(kBlockN, s.length - n0);
    for (int64_t r = 0; r < tile_rows; r += kRowsQK) {
      logits_tile(q_rows + r * kDim, kp + n0 * kDim, (valid + 31) / 32, logits + r * kBlockN);
    }
    // Key j's grid row and column, as lane indices into the bias registers.
    __m512i key_h[kBlockN / kLanes], key_w[kBlockN / kLanes];
    if (biased) {
      for (int64_t t = 0; t < (valid + kLanes - 1) / kLanes; ++t) {
        const __m512i j = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(n0 + t * kLanes)),
                                           _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
        alignas(64) int32_t lanes[kLanes], h_idx[kLanes], w_idx[kLanes];
        _mm512_store_si512(lanes, j);
        for (int64_t l = 0; l < kLanes; ++l) h_idx[l] = lanes[l] / a.rel_cols % kLanes, w_idx[l] = lanes[l] % a.rel_cols;
        key_h[t] = _mm512_load_si512(h_idx);
        key_w[t] = _mm512_load_si512(w_idx);
      }
    }
    // Whole grids: key j's grid row and column, indices into each query's position terms
    // (0 past the sequence's end, a valid index whose value the mask drops).
    alignas(64) int32_t grid_key_h[kBlockN], grid_key_w[kBlockN];
    if (grid_biased) {
      for (int64_t j = 0; j < kBlockN; ++j) {
        const int64_t key = j < valid ? n0 + j : 0;
        grid_key_h[j] = static_cast<int32_t>(key / a.grid_w);
        grid_key_w[j] = static_cast<int32_t>(key % a.grid_w);
      }
    }
    // Online softmax, base 2: keys past the sequence's end get probability 0. First the
    // scaled (and biased) logits and the new row maxima, then the rescale factors of all rows
    // at once, then the probabilities.
    const int64_t vectors = (valid + kLanes - 1) / kLanes;
    alignas(64) float new_max[kBlockM];
    for (int64_t r = 0; r < tile_rows; ++r) {
      __m512 block_max = minus_inf;
      for (int64_t t = 0; t < vectors; ++t) {
        const int64_t live = std::min(valid - t * kLanes, kLanes);
        const __mmask16 mask = static_cast<__mmask16>((1u << live) - 1u);
        float* logit_ptr = logits + r * kBlockN + t * kLanes;
        const __m512 logit = _mm512_loadu_ps(logit_ptr);
        __m512 x;
        if (biased) {
          const __m512 bias = _mm512_add_ps(_mm512_permutexvar_ps(key_h[t], row_bias_h[r]),
                                            _mm512_permutexvar_ps(key_w[t], row_bias_w[r]));
          x = _mm512_mask_mov_ps(minus_inf, mask, _mm512_fmadd_ps(logit, scale, bias));
        } else if (grid_biased) {
          const __m512 bias_h = _mm512_i32gather_ps(_mm512_load_si512(grid_key_h + t * kLanes), grid_rows_h[r], 4);
          const __m512 bias_w = _mm512_i32gather_ps(_mm512_load_si512(grid_key_w + t * kLanes), grid_rows_w[r], 4);
          x = _mm512_mask_mov_ps(minus_inf, mask, _mm512_fmadd_ps(logit, scale, _mm512_add_ps(bias_h, bias_w)));
        } else {
          x = _mm512_mask_mul_ps(minus_inf, mask, logit, scale);
        }
        _mm512_storeu_ps(logit_ptr, x);
        block_max = _mm512_max_ps(block_max, x);
      }
      new_max[r] = std::max(row_max[r], _mm512_reduce_max_ps(block_max));
    }
    for (int64_t r = 0; r < tile_rows; r += kLanes) {  // first block: 2^-126, times a zero sum
      const __mmask16 live = static_cast<__mmask16>((1u << std::min(tile_rows - r, kLanes)) - 1u);
      const __m512 old_max = _mm512_maskz_loadu_ps(live, row_max + r), next = _mm512_maskz_loadu_ps(live, new_max + r);
      _mm512_mask_storeu_ps(rescale + r, live, exp2_nonpositive(_mm512_sub_ps(old_max, next)));
      _mm512_mask_storeu_ps(row_max + r, live, next);
    }
    for (int64_t r = 0; r < tile_rows; ++r) {
      const __m512 m = _mm512_set1_ps(row_max[r]);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t t = 0; t < vectors; ++t) {
        const int64_t live = std::min(valid - t * kLanes, kLanes);
        const __mmask16 mask = static_cast<__mmask16>((1u << live) - 1u);
        const __m512 x = _mm512_loadu_ps(logits + r * kBlockN + t * kLanes);
        const __m512 p = _mm512_maskz_mov_ps(mask, exp2_nonpositive(_mm512_sub_ps(x, m)));
        const __m256bh p_bf16 = _mm512_cvtneps_pbh(p);
        // Sum what the second product will use: the rounded probabilities.
        sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)p_bf16), 16)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(probs + r * kBlockN + t * kLanes), (__m256i)p_bf16);
      }
      row_sum[r] = row_sum[r] * rescale[r] + _mm512_reduce_add_ps(sum);
    }
    for (int64_t r = 0; r < tile_rows; r += kRowsPV) {
      output_tile(probs + r * kBlockN, vp + n0 * kDim, (valid + 1) / 2, rescale + r, out + r * kDim);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    if (out_rows[r] < 0) continue;
    const __m512 inv = _mm512_set1_ps(1.0f / row_sum[r]);
    c10::BFloat16* dst = a.out + (out_rows[r] * a.heads + head) * kDim;
    for (int64_t t = 0; t < kDim / kLanes; ++t) {
      const __m256bh o = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(out + r * kDim + t * kLanes), inv));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + t * kLanes), (__m256i)o);
    }
  }
}

// A position table (n, n, 64) re-laid out like K: (n, 32 pairs, 16 lanes, 2), lanes past n zero.
std::vector<uint16_t> pack_rel(const at::Tensor& rel) {
  const int64_t n = rel.size(0);
  std::vector<uint16_t> packed(n * kPairs * kLanes * 2, 0);
  const uint16_t* src = reinterpret_cast<const uint16_t*>(rel.const_data_ptr<c10::BFloat16>());
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j)
      for (int64_t c = 0; c < kDim; ++c) packed[((i * kPairs + c / 2) * kLanes + j) * 2 + c % 2] = src[(i * n + j) * kDim + c];
  return packed;
}

// Runs every (sequence, head) of seqs. Long sequences are packed once into shared buffers
// and split into (sequence, head, query block) tasks; short ones (windows) go one task per
// (sequence, head), packed into the task's own buffers, which stay in its core's cache.
void run_attention(const AttentionArgs& args, const std::vector<Sequence>& seqs, const at::TensorOptions& options) {
  const int64_t heads = args.heads;
  std::vector<Sequence> short_seqs, long_seqs;
  std::vector<int64_t> long_offsets;  // into the shared packed buffers, in tokens
  int64_t long_tokens = 0;
  for (const Sequence& s : seqs) {
    if (s.length == 0) continue;
    if (s.length <= kShortSequence) {
      short_seqs.push_back(s);
    } else {
      long_seqs.push_back(s);
      long_offsets.push_back(long_tokens);
      long_tokens += padded_length(s.length);
    }
  }

  const int64_t n_short = static_cast<int64_t>(short_seqs.size());
  at::parallel_for(0, n_short * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> kp(padded_length(kShortSequence) * kDim), vp(padded_length(kShortSequence) * kDim);
    std::vector<float> grid_terms(grid_terms_size(args));
    for (int64_t i = begin; i < end; ++i) {
      const Sequence& s = short_seqs[i / heads];
      pack_kv(args, s, i % heads, kp.data(), vp.data());
      for (int64_t m0 = 0; m0 < s.length; m0 += kBlockM)
        attend_block(args, s, i % heads, m0, kp.data(), vp.data(), grid_terms.data());
    }
  });

  const int64_t n_long = static_cast<int64_t>(long_seqs.size());
  if (n_long == 0) return;
  at::Tensor k_packed = at::empty({heads, long_tokens, kDim}, options);  // uninitialised: pack_kv writes all
  at::Tensor v_packed = at::empty({heads, long_tokens, kDim}, options);
  auto packed = [&](const at::Tensor& buffer, int64_t seq, int64_t head) {
    return reinterpret_cast<uint16_t*>(buffer.data_ptr<c10::BFloat16>()) + (head * long_tokens + long_offsets[seq]) * kDim;
  };
  at::parallel_for(0, n_long * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      pack_kv(args, long_seqs[i / heads], i % heads, packed(k_packed, i / heads, i % heads),
              packed(v_packed, i / heads, i % heads));
    }
  });
  std::vector<std::array<int64_t, 3>> tasks;
  for (int64_t i = 0; i < n_long; ++i)
    for (int64_t m0 = 0; m0 < long_seqs[i].length; m0 += kBlockM)
      for (int64_t h = 0; h < heads; ++h) tasks.push_back({i, h, m0});
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> grid_terms(grid_terms_size(args));
    for (int64_t t = begin; t < end; ++t) {
      const auto [seq, head, m0] = tasks[t];
      attend_block(args, long_seqs[seq], head, m0, packed(k_packed, seq, head), packed(v_packed, seq, head),
                   grid_terms.data());
    }
  });
}

}  // namespace
#endif

at::Tensor varlen_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& cu_seqlens, double scale, const std::optional<at::Tensor>& rel_h,
                                const std::optional<at::Tensor>& rel_w) {
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
#ifdef MEMATTE_HAVE_AVX512BF16_KERNEL
  const int32_t* cu = cu_seqlens.const_data_ptr<int32_t>();
  std::vector<Sequence> seqs;
  for (int64_t b = 0; b + 1 < cu_seqlens.size(0); ++b) seqs.push_back({cu[b], cu[b + 1] - cu[b], 0, 0, 0});
  std::vector<uint16_t> rel_h_packed, rel_w_packed;
  if (rel_h.has_value()) rel_h_packed = pack_rel(*rel_h), rel_w_packed = pack_rel(*rel_w);
  const AttentionArgs args{q.const_data_ptr<c10::BFloat16>(), k.const_data_ptr<c10::BFloat16>(),
                           v.const_data_ptr<c10::BFloat16>(), q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                           v.stride(0), v.stride(1), out.mutable_data_ptr<c10::BFloat16>(), q.size(1),
                           static_cast<float>(scale * 1.4426950408889634),
                           rel_h.has_value() ? rel_h_packed.data() : nullptr,
                           rel_w.has_value() ? rel_w_packed.data() : nullptr,
                           rel_w.has_value() ? rel_w->size(0) : 0,
                           0, 0, 0, nullptr, nullptr, nullptr, nullptr, 0, 0, 0, 0};
  run_attention(args, seqs, q.options());
#else
  TORCH_CHECK(false, "mematte_ext.varlen_attention: this build has no AVX512-BF16 kernel");
#endif
  return out;
}

at::Tensor window_attention_cpu(const at::Tensor& qkv, const at::Tensor& pad_qkv, const at::Tensor& rel_h,
                                const at::Tensor& rel_w, int64_t num_heads, double scale, int64_t window) {
  const int64_t B = qkv.size(0), H = qkv.size(1), W = qkv.size(2), C = qkv.size(3) / 3;
  at::Tensor out = at::empty({B, H, W, C}, qkv.options());
#ifdef MEMATTE_HAVE_AVX512BF16_KERNEL
  const int64_t rows = (H + window - 1) / window, cols = (W + window - 1) / window;
  std::vector<Sequence> seqs;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t wy = 0; wy < rows; ++wy)
      for (int64_t wx = 0; wx < cols; ++wx) seqs.push_back({0, window * window, b, wy, wx});
  const std::vector<uint16_t> rel_h_packed = pack_rel(rel_h), rel_w_packed = pack_rel(rel_w);
  const c10::BFloat16* q = qkv.const_data_ptr<c10::BFloat16>();
  const c10::BFloat16* pad = pad_qkv.const_data_ptr<c10::BFloat16>();
  const AttentionArgs args{q, q + C, q + 2 * C, 3 * C, kDim, 3 * C, kDim, 3 * C, kDim,
                           out.mutable_data_ptr<c10::BFloat16>(), num_heads,
                           static_cast<float>(scale * 1.4426950408889634), rel_h_packed.data(), rel_w_packed.data(),
                           window, window, H, W, pad + C, pad + 2 * C, nullptr, nullptr, 0, 0, 0, 0};
  run_attention(args, seqs, qkv.options());
#else
  TORCH_CHECK(false, "mematte_ext.window_attention: this build has no AVX512-BF16 kernel");
#endif
  return out;
}

at::Tensor relpos_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rel_h,
                                const at::Tensor& rel_w, double scale) {
  const int64_t B = q.size(0), N = q.size(1), heads = q.size(2);
  at::Tensor out = at::empty({B, N, heads, 64}, q.options());
#ifdef MEMATTE_HAVE_AVX512BF16_KERNEL
  // Each image is one sequence of the packed (B * N, heads, 64) tokens (q's batch stride is
  // N times its token stride).
  std::vector<Sequence> seqs;
  for (int64_t b = 0; b < B; ++b) seqs.push_back({b * N, N, 0, 0, 0});
  const int64_t H = rel_h.size(0), W = rel_w.size(0);
  const int64_t h_pad = (H + kTermCols - 1) / kTermCols * kTermCols, w_pad = (W + kTermCols - 1) / kTermCols * kTermCols;
  const std::vector<float> rel_h_t = transposed_rel_table(rel_h, h_pad), rel_w_t = transposed_rel_table(rel_w, w_pad);
  const AttentionArgs args{q.const_data_ptr<c10::BFloat16>(), k.const_data_ptr<c10::BFloat16>(),
                           v.const_data_ptr<c10::BFloat16>(), q.stride(1), q.stride(2), k.stride(1), k.stride(2),
                           v.stride(1), v.stride(2), out.mutable_data_ptr<c10::BFloat16>(), heads,
                           static_cast<float>(scale * 1.4426950408889634), nullptr, nullptr, 0,
                           0, 0, 0, nullptr, nullptr,
                           rel_h_t.data(), rel_w_t.data(), H, W, h_pad, w_pad};
  run_attention(args, seqs, q.options());
#else
  TORCH_CHECK(false, "mematte_ext.relpos_attention: this build has no AVX512-BF16 kernel");
#endif
  return out;
}

}  // namespace mematte
