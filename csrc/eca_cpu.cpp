// CPU twin of eca.cu: per-image channel sums in fixed row chunks (the result does not depend
// on the thread count), a tiny gate computation, then one pass that applies the gate and
// adds the residual. The backward has the same shape: per-chunk sums of z and grad_out * z,
// the gate's gradient per image, then one pass for the input gradient.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "cpu_math.h"
#include "ltrm.h"

namespace mematte {
namespace {

// Rows summed by one task. Partial sums are combined in a fixed order afterwards.
constexpr int64_t kRowsPerChunk = 256;
// Rows per task of the apply pass: enough work to amortise scheduling.
constexpr int64_t kApplyGrain = 64;

template <typename scalar_t>
MEMATTE_INLINE void sum_rows_impl(const scalar_t* __restrict z, int64_t rows, int64_t C, float* __restrict sums) {
  for (int64_t c = 0; c < C; ++c) sums[c] = 0.0f;
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* __restrict row = z + r * C;
    for (int64_t c = 0; c < C; ++c) sums[c] += cpu::to_float(row[c]);
  }
}

// out = z + z * gate (+ residual), computed in fp32 and rounded once to the output dtype.
template <typename scalar_t>
MEMATTE_INLINE void apply_gate_impl(const scalar_t* __restrict z, const scalar_t* __restrict residual,
                                    const float* __restrict gate, int64_t rows, int64_t C, scalar_t* __restrict out) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* __restrict z_row = z + r * C;
    scalar_t* __restrict out_row = out + r * C;
    if (residual != nullptr) {
      const scalar_t* __restrict res_row = residual + r * C;
      for (int64_t c = 0; c < C; ++c) {
        const float v = cpu::to_float(z_row[c]);
        out_row[c] = cpu::from_float<scalar_t>(v + v * gate[c] + cpu::to_float(res_row[c]));
      }
    } else {
      for (int64_t c = 0; c < C; ++c) {
        const float v = cpu::to_float(z_row[c]);
        out_row[c] = cpu::from_float<scalar_t>(v + v * gate[c]);
      }
    }
  }
}

// sums_z[c] = sum_r z[r, c] and sums_gz[c] = sum_r grad[r, c] * z[r, c], in fp32.
template <typename scalar_t>
MEMATTE_INLINE void sum_grad_rows_impl(const scalar_t* __restrict z, const scalar_t* __restrict grad, int64_t rows,
                                       int64_t C, float* __restrict sums_z, float* __restrict sums_gz) {
  for (int64_t c = 0; c < C; ++c) sums_z[c] = sums_gz[c] = 0.0f;
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* __restrict z_row = z + r * C;
    const scalar_t* __restrict grad_row = grad + r * C;
    for (int64_t c = 0; c < C; ++c) {
      const float v = cpu::to_float(z_row[c]);
      sums_z[c] += v;
      sums_gz[c] += cpu::to_float(grad_row[c]) * v;
    }
  }
}

// grad_z = grad * scale + shift: scale = 1 + gate, shift the gradient through the channel mean.
template <typename scalar_t>
MEMATTE_INLINE void apply_grad_impl(const scalar_t* __restrict grad, const float* __restrict scale,
                                    const float* __restrict shift, int64_t rows, int64_t C,
                                    scalar_t* __restrict grad_z) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* __restrict grad_row = grad + r * C;
    scalar_t* __restrict out_row = grad_z + r * C;
    for (int64_t c = 0; c < C; ++c) {
      out_row[c] = cpu::from_float<scalar_t>(cpu::to_float(grad_row[c]) * scale[c] + shift[c]);
    }
  }
}

// One non-template overload per dtype: target_clones needs a plain function to clone.
#define MEMATTE_ECA_KERNELS(scalar_t)                                                                   \
  MEMATTE_CPU_CLONES void sum_rows(const scalar_t* z, int64_t rows, int64_t C, float* sums) {           \
    sum_rows_impl(z, rows, C, sums);                                                                    \
  }                                                                                                     \
  MEMATTE_CPU_CLONES void apply_gate(const scalar_t* z, const scalar_t* residual, const float* gate,    \
                                     int64_t rows, int64_t C, scalar_t* out) {                          \
    apply_gate_impl(z, residual, gate, rows, C, out);                                                   \
  }                                                                                                     \
  MEMATTE_CPU_CLONES void sum_grad_rows(const scalar_t* z, const scalar_t* grad, int64_t rows, int64_t C, \
                                        float* sums_z, float* sums_gz) {                                \
    sum_grad_rows_impl(z, grad, rows, C, sums_z, sums_gz);                                              \
  }                                                                                                     \
  MEMATTE_CPU_CLONES void apply_grad(const scalar_t* grad, const float* scale, const float* shift,      \
                                     int64_t rows, int64_t C, scalar_t* grad_z) {                       \
    apply_grad_impl(grad, scale, shift, rows, C, grad_z);                                               \
  }
MEMATTE_ECA_KERNELS(float)
MEMATTE_ECA_KERNELS(c10::Half)
MEMATTE_ECA_KERNELS(c10::BFloat16)
#undef MEMATTE_ECA_KERNELS

// gate[b, c] = sigmoid(sum_t taps[t] * mean[b, c + t - pad]), zero outside [0, C).
void compute_gate(const float* chunk_sums, int64_t B, int64_t chunks, int64_t C, int64_t HW,
                  const float* taps, int64_t k, float* gate) {
  std::vector<float> mean(C);
  const int64_t pad = (k - 1) / 2;
  for (int64_t b = 0; b < B; ++b) {
    std::fill(mean.begin(), mean.end(), 0.0f);
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const float* sums = chunk_sums + (b * chunks + chunk) * C;
      for (int64_t c = 0; c < C; ++c) mean[c] += sums[c];
    }
    for (int64_t c = 0; c < C; ++c) mean[c] /= static_cast<float>(HW);
    for (int64_t c = 0; c < C; ++c) {
      float logit = 0.0f;
      for (int64_t t = std::max<int64_t>(0, pad - c); t < std::min<int64_t>(k, C + pad - c); ++t) {
        logit += taps[t] * mean[c + t - pad];
      }
      gate[b * C + c] = 1.0f / (1.0f + std::exp(-logit));
    }
  }
}

// The gate's backward per image, from the chunk sums of z and grad * z: with mean m, logit
// l = conv1d(m), gate s = sigmoid(l) and d_l = (sum_hw grad * z) * s * (1 - s),
//   scale[b, c] = 1 + s[c], shift[b, c] = (sum_t taps[t] * d_l[c - t + pad]) / HW,
//   grad_taps[t] = sum_b sum_c d_l[c] * m[c + t - pad],
// everything outside [0, C) being zero. Images and channels are added in a fixed order.
void gate_backward(const float* chunk_sums_z, const float* chunk_sums_gz, int64_t B, int64_t chunks, int64_t C,
                   int64_t HW, const float* taps, int64_t k, float* scale, float* shift, float* grad_taps) {
  std::vector<float> mean(C), dlogit(C);
  const int64_t pad = (k - 1) / 2;
  std::fill(grad_taps, grad_taps + k, 0.0f);
  for (int64_t b = 0; b < B; ++b) {
    std::fill(mean.begin(), mean.end(), 0.0f);
    std::fill(dlogit.begin(), dlogit.end(), 0.0f);
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const float* sums_z = chunk_sums_z + (b * chunks + chunk) * C;
      const float* sums_gz = chunk_sums_gz + (b * chunks + chunk) * C;
      for (int64_t c = 0; c < C; ++c) {
        mean[c] += sums_z[c];
        dlogit[c] += sums_gz[c];  // d gate, for now
      }
    }
    for (int64_t c = 0; c < C; ++c) mean[c] /= static_cast<float>(HW);
    for (int64_t c = 0; c < C; ++c) {
      float logit = 0.0f;
      for (int64_t t = std::max<int64_t>(0, pad - c); t < std::min<int64_t>(k, C + pad - c); ++t) {
        logit += taps[t] * mean[c + t - pad];
      }
      const float gate = 1.0f / (1.0f + std::exp(-logit));
      scale[b * C + c] = 1.0f + gate;
      dlogit[c] *= gate * (1.0f - gate);
    }
    for (int64_t c = 0; c < C; ++c) {
      // mean[c] feeds logit[c - t + pad] through tap t.
      float dmean = 0.0f;
      for (int64_t t = std::max<int64_t>(0, c + pad - (C - 1)); t < std::min<int64_t>(k, c + pad + 1); ++t) {
        dmean += taps[t] * dlogit[c - t + pad];
      }
      shift[b * C + c] = dmean / static_cast<float>(HW);
    }
    for (int64_t t = 0; t < k; ++t) {
      float sum = 0.0f;
      for (int64_t c = std::max<int64_t>(0, pad - t); c < std::min<int64_t>(C, C + pad - t); ++c) {
        sum += dlogit[c] * mean[c + t - pad];
      }
      grad_taps[t] += sum;
    }
  }
}

}  // namespace

at::Tensor eca_cpu(const at::Tensor& z, const at::Tensor& weight, const std::optional<at::Tensor>& residual) {
  at::Tensor out = at::empty_like(z);
  if (z.numel() == 0) return out;
  const int64_t B = z.size(0), HW = z.size(1) * z.size(2), C = z.size(3);
  const int64_t chunks = (HW + kRowsPerChunk - 1) / kRowsPerChunk;
  const at::Tensor taps = weight.reshape({-1}).to(at::kFloat).contiguous();
  const at::TensorOptions fp32 = z.options().dtype(at::kFloat);
  at::Tensor chunk_sums = at::empty({B, chunks, C}, fp32);
  at::Tensor gate = at::empty({B, C}, fp32);
  MEMATTE_DISPATCH_FLOAT_HALF_BF16(z.scalar_type(), "eca_cpu", [&] {
    const scalar_t* z_data = z.const_data_ptr<scalar_t>();
    float* sums_data = chunk_sums.mutable_data_ptr<float>();
    at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / chunks, first_row = (task % chunks) * kRowsPerChunk;
        const int64_t rows = std::min(kRowsPerChunk, HW - first_row);
        sum_rows(z_data + (b * HW + first_row) * C, rows, C, sums_data + task * C);
      }
    });

    compute_gate(sums_data, B, chunks, C, HW, taps.const_data_ptr<float>(), taps.numel(),
                 gate.mutable_data_ptr<float>());

    const scalar_t* res_data = residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr;
    const float* gate_data = gate.const_data_ptr<float>();
    scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
    // Tasks never straddle two images, so each sees one gate vector.
    const int64_t row_blocks_per_image = (HW + kApplyGrain - 1) / kApplyGrain;
    at::parallel_for(0, B * row_blocks_per_image, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / row_blocks_per_image, first_row = (task % row_blocks_per_image) * kApplyGrain;
        const int64_t offset = (b * HW + first_row) * C;
        apply_gate(z_data + offset, res_data ? res_data + offset : nullptr, gate_data + b * C,
                   std::min(kApplyGrain, HW - first_row), C, out_data + offset);
      }
    });
  });
  return out;
}

// grad_residual is grad_out itself; the caller passes it on rather than copying it here.
std::tuple<at::Tensor, at::Tensor> eca_backward_cpu(const at::Tensor& grad_out, const at::Tensor& z,
                                                    const at::Tensor& weight) {
  at::Tensor grad_z = at::empty_like(z);
  const int64_t B = z.size(0), HW = z.size(1) * z.size(2), C = z.size(3);
  if (z.numel() == 0) return {grad_z, at::zeros(weight.sizes(), weight.options())};
  const int64_t chunks = (HW + kRowsPerChunk - 1) / kRowsPerChunk;
  const at::Tensor taps = weight.reshape({-1}).to(at::kFloat).contiguous();
  const at::TensorOptions fp32 = z.options().dtype(at::kFloat);
  at::Tensor chunk_sums = at::empty({2, B, chunks, C}, fp32);  // of z, of grad_out * z
  at::Tensor scale = at::empty({B, C}, fp32);
  at::Tensor shift = at::empty({B, C}, fp32);
  at::Tensor grad_taps = at::empty({taps.numel()}, fp32);
  MEMATTE_DISPATCH_FLOAT_HALF_BF16(z.scalar_type(), "eca_backward_cpu", [&] {
    const scalar_t* z_data = z.const_data_ptr<scalar_t>();
    const scalar_t* grad_data = grad_out.const_data_ptr<scalar_t>();
    float* sums_z = chunk_sums.mutable_data_ptr<float>();
    float* sums_gz = sums_z + B * chunks * C;
    at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / chunks, first_row = (task % chunks) * kRowsPerChunk;
        const int64_t rows = std::min(kRowsPerChunk, HW - first_row);
        const int64_t offset = (b * HW + first_row) * C;
        sum_grad_rows(z_data + offset, grad_data + offset, rows, C, sums_z + task * C, sums_gz + task * C);
      }
    });

    gate_backward(sums_z, sums_gz, B, chunks, C, HW, taps.const_data_ptr<float>(), taps.numel(),
                  scale.mutable_data_ptr<float>(), shift.mutable_data_ptr<float>(),
                  grad_taps.mutable_data_ptr<float>());

    scalar_t* grad_z_data = grad_z.mutable_data_ptr<scalar_t>();
    const float* scale_data = scale.const_data_ptr<float>();
    const float* shift_data = shift.const_data_ptr<float>();
    const int64_t row_blocks_per_image = (HW + kApplyGrain - 1) / kApplyGrain;
    at::parallel_for(0, B * row_blocks_per_image, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / row_blocks_per_image, first_row = (task % row_blocks_per_image) * kApplyGrain;
        const int64_t offset = (b * HW + first_row) * C;
        apply_grad(grad_data + offset, scale_data + b * C, shift_data + b * C, std::min(kApplyGrain, HW - first_row),
                   C, grad_z_data + offset);
      }
    });
  });
  return {grad_z, grad_taps.view(weight.sizes()).to(weight.scalar_type())};
}

}  // namespace mematte
