// The mematte_ext ops on channels-last (B, H, W, C) tensors, one entry point per device:
// MEMatte's LTRM ops and the decoder's upsample-conv epilogue.
// Arguments are validated in ops.cpp before these are called.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

// The dtypes the ops accept; instantiating only these keeps the build short.
#define MEMATTE_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)        \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace mematte {

// A gathered position table (n, n, 64) fp32 laid out for the CPU attention kernels, which
// compute each query's position terms along a grid axis as 64 rows of n_pad multiply-adds:
// (n, 64, n_pad) times log2(e) (their softmax runs in base 2), zero past n.
inline std::vector<float> transposed_rel_table(const at::Tensor& rel, int64_t n_pad) {
  const int64_t n = rel.size(0);
  std::vector<float> t(n * 64 * n_pad, 0.0f);
  const float* src = rel.const_data_ptr<float>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j)
      for (int64_t c = 0; c < 64; ++c) t[(i * 64 + c) * n_pad + j] = src[(i * n + j) * 64 + c] * 1.4426950408889634f;
  return t;
}

// Depthwise 5x5 conv, padding 2, + bias + exact GELU.
// x (B, H, W, C) contiguous; weight (C, 1, 5, 5); bias (C).
at::Tensor dwconv_gelu_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias);
// Its gradients (grad_x, grad_weight, grad_bias) from grad_out, shaped and typed like x, weight
// and bias; summed in fp32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_gelu_backward_cpu(const at::Tensor& grad_out,
                                                                       const at::Tensor& x,
                                                                       const at::Tensor& weight,
                                                                       const at::Tensor& bias);

// z + z * sigmoid(conv1d_k(mean_hw(z))) [+ residual].
// z (B, H, W, C) contiguous; weight (1, 1, k), k odd; residual like z.
at::Tensor eca_cpu(const at::Tensor& z, const at::Tensor& weight, const std::optional<at::Tensor>& residual);
// Its gradients (grad_z, grad_weight) from grad_out; the residual's gradient is grad_out itself.
std::tuple<at::Tensor, at::Tensor> eca_backward_cpu(const at::Tensor& grad_out, const at::Tensor& z,
                                                    const at::Tensor& weight);

// out = relu(out + conv3x3(upsample2x(x), W)), in place, from taps = W_k . x per 3x3 tap k.
// out (B, 2h, 2w, C) contiguous; taps (B, h, w, 9C) contiguous, tap-major: (ky * 3 + kx) * C + c.
void upsample_taps_relu_cpu(at::Tensor& out, const at::Tensor& taps);

// The same from x itself on CPUs with AVX512-BF16: out (B, 2h, 2w, C) and x (B, h, w, Cin)
// bf16 contiguous, C a multiple of 16, Cin even; weight (C, Cin, 3, 3).
void upsample_conv_relu_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight);

// Varlen attention, bf16, head dim 64, on CPUs with AVX512-BF16 (cpu_has_avx512_bf16()).
// q, k, v (T, heads, 64) with a contiguous last dim; cu_seqlens (B + 1,) int32; optional
// decomposed position bias for H x W grids: the gathered tables rel_h (H, H, 64) and rel_w
// (W, W, 64), bf16, H, W <= 16; every sequence is then an H x W grid. Returns (T, heads, 64).
bool cpu_has_avx512_bf16();
at::Tensor varlen_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& cu_seqlens, double scale, const std::optional<at::Tensor>& rel_h,
                                const std::optional<at::Tensor>& rel_w);

// Window attention with decomposed relative position on a token grid: qkv (B, H, W, 3C) bf16
// contiguous, C = heads * 64, cut into window x window windows (window <= 16); positions past
// the grid hold pad_qkv (3C) (the projection of upstream's zero padding). Returns (B, H, W, C).
at::Tensor window_attention_cpu(const at::Tensor& qkv, const at::Tensor& pad_qkv, const at::Tensor& rel_h,
                                const at::Tensor& rel_w, int64_t num_heads, double scale, int64_t window);

// Attention over whole H x W token grids with decomposed relative position (ViTMatte's global
// attention), bf16, head dim 64, on CPUs with AVX512-BF16: q, k, v (B, N = H * W, heads, 64)
// with a contiguous last dim and a batch stride of N token strides; rel_h (H, H, 64) and
// rel_w (W, W, 64) the gathered tables, fp32 contiguous. logit[i, j] = scale q[i].k[j] +
// q[i].rel_h[row(i), row(j)] + q[i].rel_w[col(i), col(j)]. Returns (B, N, heads, 64).
at::Tensor relpos_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rel_h,
                                const at::Tensor& rel_w, double scale);

// ViTMatte's global attention on CPUs with AVX2 + FMA (cpu_has_avx2_fma()), computed in fp32
// for fp32, bf16 and fp16: qkv (B, H, W, 3C) contiguous, C = num_heads * 64; rel_h (H, H, 64)
// and rel_w (W, W, 64) the gathered tables, fp32 contiguous. Every token attends to all the
// tokens of its image with the decomposed position bias q[i].rel_h[row(i), row(j)] +
// q[i].rel_w[col(i), col(j)]. Returns (B, H, W, C) in qkv's dtype.
bool cpu_has_avx2_fma();
at::Tensor global_attention_cpu(const at::Tensor& qkv, const at::Tensor& rel_h, const at::Tensor& rel_w,
                                int64_t num_heads, double scale);

#ifdef MEMATTE_WITH_CUDA
at::Tensor dwconv_gelu_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias);
at::Tensor eca_cuda(const at::Tensor& z, const at::Tensor& weight, const std::optional<at::Tensor>& residual);
std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_gelu_backward_cuda(const at::Tensor& grad_out,
                                                                        const at::Tensor& x,
                                                                        const at::Tensor& weight,
                                                                        const at::Tensor& bias);
std::tuple<at::Tensor, at::Tensor> eca_backward_cuda(const at::Tensor& grad_out, const at::Tensor& z,
                                                     const at::Tensor& weight);
#endif

}  // namespace mematte
