// Schemas, argument checks and registration of the mematte_ext ops, plus the Python module
// stub that makes `import mematte_kernels._C` load them.
#include <ATen/core/grad_mode.h>
#include <Python.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "ltrm.h"

namespace mematte {
namespace {

bool is_supported_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
}

void check_activation(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4, "mematte_ext.", op, ": ", name,
              " must be a 4-D channels-last (B, H, W, C) tensor, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "mematte_ext.", op, ": ", name,
              " must be contiguous in (B, H, W, C) order, got strides ", t.strides(),
              " (from NCHW use .permute(0, 2, 3, 1).contiguous())");
  TORCH_CHECK(is_supported_dtype(t.scalar_type()), "mematte_ext.", op, ": ", name,
              " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

void check_parameter(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input) {
  TORCH_CHECK(t.device() == input.device(), "mematte_ext.", op, ": ", name, " must be on the input's device (",
              input.device(), "), got ", t.device());
  TORCH_CHECK(is_supported_dtype(t.scalar_type()), "mematte_ext.", op, ": ", name,
              " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

// The incoming gradient of a backward op: exactly like the forward's input `name`.
void check_grad_out(const char* op, const at::Tensor& grad_out, const char* name, const at::Tensor& input) {
  check_activation(op, "grad_out", grad_out);
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "mematte_ext.", op, ": grad_out must have ", name, "'s shape ",
              input.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), "mematte_ext.", op, ": grad_out must have ", name,
              "'s dtype (", input.scalar_type(), "), got ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.device() == input.device(), "mematte_ext.", op, ": grad_out must be on ", name,
              "'s device (", input.device(), "), got ", grad_out.device());
}

void check_dwconv_gelu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                       const char* op = "dwconv_gelu") {
  check_activation(op, "x", x);
  check_parameter(op, "weight", weight, x);
  check_parameter(op, "bias", bias, x);
  const int64_t C = x.size(3);
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == 1 && weight.size(2) == 5 && weight.size(3) == 5,
              "mematte_ext.", op, ": weight must be a depthwise 5x5 kernel of shape (C, 1, 5, 5), got shape ",
              weight.sizes());
  TORCH_CHECK(weight.size(0) == C, "mematte_ext.", op, ": weight has ", weight.size(0), " channels but x has C = ",
              C);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == C, "mematte_ext.", op, ": bias must have shape (C,) = (", C,
              ",), got shape ", bias.sizes());
}

void check_eca(const at::Tensor& z, const at::Tensor& weight, const std::optional<at::Tensor>& residual,
               const char* op = "eca") {
  check_activation(op, "z", z);
  check_parameter(op, "weight", weight, z);
  TORCH_CHECK(weight.dim() == 3 && weight.size(0) == 1 && weight.size(1) == 1 && weight.size(2) % 2 == 1,
              "mematte_ext.", op, ": weight must be a Conv1d kernel of shape (1, 1, k) with k odd, got shape ",
              weight.sizes());
  if (!residual.has_value()) return;
  TORCH_CHECK(residual->sizes() == z.sizes(), "mematte_ext.eca: residual must have z's shape ", z.sizes(),
              ", got ", residual->sizes());
  TORCH_CHECK(residual->device() == z.device(), "mematte_ext.eca: residual must be on z's device (", z.device(),
              "), got ", residual->device());
  TORCH_CHECK(residual->scalar_type() == z.scalar_type(), "mematte_ext.eca: residual must have z's dtype (",
              z.scalar_type(), "), got ", residual->scalar_type());
  TORCH_CHECK(residual->is_contiguous(), "mematte_ext.eca: residual must be contiguous, got strides ",
              residual->strides());
}

void check_upsample_taps_relu(const at::Tensor& out, const at::Tensor& taps) {
  check_activation("upsample_taps_relu_", "out", out);
  check_activation("upsample_taps_relu_", "taps", taps);
  TORCH_CHECK(taps.device() == out.device(), "mematte_ext.upsample_taps_relu_: taps must be on out's device (",
              out.device(), "), got ", taps.device());
  TORCH_CHECK(taps.scalar_type() == out.scalar_type(), "mematte_ext.upsample_taps_relu_: taps must have out's dtype (",
              out.scalar_type(), "), got ", taps.scalar_type());
  TORCH_CHECK(taps.size(0) == out.size(0) && out.size(1) == 2 * taps.size(1) && out.size(2) == 2 * taps.size(2) &&
                  taps.size(3) == 9 * out.size(3),
              "mematte_ext.upsample_taps_relu_: for out of shape (B, H, W, C) = ", out.sizes(),
              " taps must have shape (B, H/2, W/2, 9C), got ", taps.sizes());
}

void check_varlen_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& cu_seqlens, const std::optional<at::Tensor>& rel_h,
                            const std::optional<at::Tensor>& rel_w) {
  TORCH_CHECK(cpu_has_avx512_bf16(), "mematte_ext.varlen_attention: needs a CPU with AVX512-BF16; this one has none");
  for (const auto& [name, t] : {std::pair{"q", q}, std::pair{"k", k}, std::pair{"v", v}}) {
    TORCH_CHECK(t.dim() == 3 && t.size(2) == 64, "mematte_ext.varlen_attention: ", name,
                " must be packed (T, heads, 64), got shape ", t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kBFloat16, "mematte_ext.varlen_attention: ", name,
                " must be bfloat16, got ", t.scalar_type());
    TORCH_CHECK(t.stride(2) == 1, "mematte_ext.varlen_attention: ", name,
                " must have a contiguous head dim, got strides ", t.strides());
    TORCH_CHECK(t.sizes() == q.sizes(), "mematte_ext.varlen_attention: ", name, " has shape ", t.sizes(),
                " but q has ", q.sizes());
    TORCH_CHECK(t.device() == q.device(), "mematte_ext.varlen_attention: ", name, " must be on q's device");
  }
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1 && cu_seqlens.scalar_type() == at::kInt &&
                  cu_seqlens.is_contiguous() && cu_seqlens.device().is_cpu(),
              "mematte_ext.varlen_attention: cu_seqlens must be a contiguous 1-D int32 CPU tensor (B + 1,), got ",
              cu_seqlens.scalar_type(), " of shape ", cu_seqlens.sizes());
  const int32_t* cu = cu_seqlens.const_data_ptr<int32_t>();
  const int64_t n = cu_seqlens.size(0);
  TORCH_CHECK(cu[0] == 0 && cu[n - 1] == q.size(0), "mematte_ext.varlen_attention: cu_seqlens must run from 0 to T = ",
              q.size(0), ", got ", cu[0], " .. ", cu[n - 1]);
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK(cu[i] >= cu[i - 1], "mematte_ext.varlen_attention: cu_seqlens must be non-decreasing, got ", cu[i - 1],
                " then ", cu[i]);
  }
  TORCH_CHECK(rel_h.has_value() == rel_w.has_value(),
              "mematte_ext.varlen_attention: rel_h and rel_w come together (the two axes of one position bias)");
  if (!rel_h.has_value()) return;
  for (const auto& [name, t] : {std::pair{"rel_h", *rel_h}, std::pair{"rel_w", *rel_w}}) {
    TORCH_CHECK(t.dim() == 3 && t.size(0) == t.size(1) && t.size(0) >= 1 && t.size(0) <= 16 && t.size(2) == 64,
                "mematte_ext.varlen_attention: ", name, " must be a gathered position table (n, n, 64) with n <= 16, got shape ",
                t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.is_contiguous() && t.device() == q.device(),
                "mematte_ext.varlen_attention: ", name, " must be a contiguous bfloat16 tensor on q's device");
  }
  const int64_t grid = rel_h->size(0) * rel_w->size(0);
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK(cu[i] - cu[i - 1] == grid || cu[i] == cu[i - 1],
                "mematte_ext.varlen_attention: with a position bias every sequence must be the ", rel_h->size(0), "x",
                rel_w->size(0), " grid of ", grid, " tokens, got one of ", cu[i] - cu[i - 1]);
  }
}

at::Tensor checked_varlen_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& cu_seqlens, double scale, const std::optional<at::Tensor>& rel_h,
                                    const std::optional<at::Tensor>& rel_w) {
  check_varlen_attention(q, k, v, cu_seqlens, rel_h, rel_w);
  return varlen_attention_cpu(q, k, v, cu_seqlens, scale, rel_h, rel_w);
}

at::Tensor checked_relpos_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& rel_h, const at::Tensor& rel_w, double scale) {
  TORCH_CHECK(cpu_has_avx512_bf16(), "mematte_ext.relpos_attention: needs a CPU with AVX512-BF16; this one has none");
  for (const auto& [name, t] : {std::pair{"q", q}, std::pair{"k", k}, std::pair{"v", v}}) {
    TORCH_CHECK(t.dim() == 4 && t.size(3) == 64, "mematte_ext.relpos_attention: ", name,
                " must be (B, N, heads, 64), got shape ", t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kBFloat16, "mematte_ext.relpos_attention: ", name, " must be bfloat16, got ",
                t.scalar_type());
    TORCH_CHECK(t.sizes() == q.sizes(), "mematte_ext.relpos_attention: ", name, " has shape ", t.sizes(),
                " but q has ", q.sizes());
    TORCH_CHECK(t.device() == q.device(), "mematte_ext.relpos_attention: ", name, " must be on q's device");
    TORCH_CHECK(t.stride(3) == 1 && (t.size(0) <= 1 || t.stride(0) == t.size(1) * t.stride(1)),
                "mematte_ext.relpos_attention: ", name,
                " must have a contiguous head dim and a batch stride of N token strides, got strides ", t.strides());
  }
  for (const auto& [name, t] : {std::pair{"rel_h", rel_h}, std::pair{"rel_w", rel_w}}) {
    TORCH_CHECK(t.dim() == 3 && t.size(0) >= 1 && t.size(1) == t.size(0) && t.size(2) == 64,
                "mematte_ext.relpos_attention: ", name, " must be a gathered table (n, n, 64), got shape ", t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.device() == q.device(),
                "mematte_ext.relpos_attention: ", name, " must be a contiguous float32 tensor on q's device");
  }
  TORCH_CHECK(rel_h.size(0) * rel_w.size(0) == q.size(1), "mematte_ext.relpos_attention: the grid is ", rel_h.size(0),
              "x", rel_w.size(0), " (from rel_h, rel_w) but q holds ", q.size(1), " tokens per image");
  return relpos_attention_cpu(q, k, v, rel_h, rel_w, scale);
}

at::Tensor checked_window_attention(const at::Tensor& qkv, const at::Tensor& pad_qkv, const at::Tensor& rel_h,
                                    const at::Tensor& rel_w, int64_t num_heads, double scale, int64_t window) {
  TORCH_CHECK(cpu_has_avx512_bf16(), "mematte_ext.window_attention: needs a CPU with AVX512-BF16; this one has none");
  TORCH_CHECK(window >= 1 && window <= 16, "mematte_ext.window_attention: window must be 1..16, got ", window);
  TORCH_CHECK(num_heads >= 1, "mematte_ext.window_attention: num_heads must be positive, got ", num_heads);
  TORCH_CHECK(qkv.dim() == 4 && qkv.size(3) == 3 * 64 * num_heads,
              "mematte_ext.window_attention: qkv must be (B, H, W, 3C) with C = num_heads * 64 = ", 64 * num_heads,
              ", got shape ", qkv.sizes());
  TORCH_CHECK(qkv.scalar_type() == at::kBFloat16 && qkv.is_contiguous(),
              "mematte_ext.window_attention: qkv must be a contiguous bfloat16 tensor, got ", qkv.scalar_type(),
              " with strides ", qkv.strides());
  TORCH_CHECK(pad_qkv.dim() == 1 && pad_qkv.size(0) == qkv.size(3) && pad_qkv.scalar_type() == at::kBFloat16 &&
                  pad_qkv.is_contiguous() && pad_qkv.device() == qkv.device(),
              "mematte_ext.window_attention: pad_qkv must be a contiguous bfloat16 (3C,) = (", qkv.size(3),
              ",) tensor on qkv's device, got ", pad_qkv.scalar_type(), " of shape ", pad_qkv.sizes());
  for (const auto& [name, t] : {std::pair{"rel_h", rel_h}, std::pair{"rel_w", rel_w}}) {
    TORCH_CHECK(t.dim() == 3 && t.size(0) == window && t.size(1) == window && t.size(2) == 64,
                "mematte_ext.window_attention: ", name, " must be the gathered table (window, window, 64) = (", window,
                ", ", window, ", 64), got shape ", t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.is_contiguous() && t.device() == qkv.device(),
                "mematte_ext.window_attention: ", name, " must be a contiguous bfloat16 tensor on qkv's device");
  }
  return window_attention_cpu(qkv, pad_qkv, rel_h, rel_w, num_heads, scale, window);
}

template <at::Tensor (*kernel)(const at::Tensor&, const at::Tensor&, const at::Tensor&)>
at::Tensor checked_dwconv_gelu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  check_dwconv_gelu(x, weight, bias);
  return kernel(x, weight, bias);
}

template <at::Tensor (*kernel)(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>
at::Tensor checked_eca(const at::Tensor& z, const at::Tensor& weight, const std::optional<at::Tensor>& residual) {
  check_eca(z, weight, residual);
  return kernel(z, weight, residual);
}

template <std::tuple<at::Tensor, at::Tensor, at::Tensor> (*kernel)(const at::Tensor&, const at::Tensor&,
                                                                   const at::Tensor&, const at::Tensor&)>
std::tuple<at::Tensor, at::Tensor, at::Tensor> checked_dwconv_gelu_backward(const at::Tensor& grad_out,
                                                                           const at::Tensor& x,
                                                                           const at::Tensor& weight,
                                                                           const at::Tensor& bias) {
  check_dwconv_gelu(x, weight, bias, "dwconv_gelu_backward");
  check_grad_out("dwconv_gelu_backward", grad_out, "x", x);
  return kernel(grad_out, x, weight, bias);
}

template <std::tuple<at::Tensor, at::Tensor> (*kernel)(const at::Tensor&, const at::Tensor&, const at::Tensor&)>
std::tuple<at::Tensor, at::Tensor> checked_eca_backward(const at::Tensor& grad_out, const at::Tensor& z,
                                                        const at::Tensor& weight) {
  check_eca(z, weight, std::nullopt, "eca_backward");
  check_grad_out("eca_backward", grad_out, "z", z);
  return kernel(grad_out, z, weight);
}

// Autograd kernel of the ops that have no backward: an input that needs a gradient is an error
// that names the op and the argument, raised before anything runs, rather than a graph that
// silently stops at the op. Without such inputs (or under no_grad) the op runs as usual.
void no_backward(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  std::string name = op.schema().name();  // "mematte_ext::op", spelled like the other messages
  name.replace(name.find("::"), 2, ".");
  const auto inputs = torch::jit::last(*stack, arguments.size());
  std::vector<at::Tensor> mutated;
  for (size_t i = 0; i < arguments.size(); ++i) {
    if (!inputs[i].isTensor()) continue;
    const at::Tensor& t = inputs[i].toTensor();
    if (!t.defined()) continue;
    TORCH_CHECK(!(at::GradMode::is_enabled() && t.requires_grad()), name,
                " has no backward, but its argument ", arguments[i].name(),
                " requires grad: call it under torch.no_grad(), or use an op with autograd when training");
    if (arguments[i].alias_info() != nullptr && arguments[i].alias_info()->isWrite()) mutated.push_back(t);
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  // What autograd does for every in-place op: a later backward that saved these sees the change.
  for (const at::Tensor& t : mutated) torch::autograd::impl::bump_version(t);
}

void checked_upsample_conv_relu(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(cpu_has_avx512_bf16(), "mematte_ext.upsample_conv_relu_: needs a CPU with AVX512-BF16; this one has none");
  check_activation("upsample_conv_relu_", "out", out);
  check_activation("upsample_conv_relu_", "x", x);
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && x.scalar_type() == at::kBFloat16,
              "mematte_ext.upsample_conv_relu_: out and x must be bfloat16, got ", out.scalar_type(), " and ",
              x.scalar_type());
  TORCH_CHECK(x.device() == out.device(), "mematte_ext.upsample_conv_relu_: x must be on out's device");
  TORCH_CHECK(x.size(0) == out.size(0) && out.size(1) == 2 * x.size(1) && out.size(2) == 2 * x.size(2),
              "mematte_ext.upsample_conv_relu_: for x of shape (B, h, w, Cin) = ", x.sizes(),
              " out must have shape (B, 2h, 2w, C), got ", out.sizes());
  TORCH_CHECK(out.size(3) % 16 == 0 && x.size(3) % 2 == 0,
              "mematte_ext.upsample_conv_relu_: needs C a multiple of 16 and Cin even, got C = ", out.size(3),
              ", Cin = ", x.size(3));
  check_parameter("upsample_conv_relu_", "weight", weight, x);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == out.size(3) && weight.size(1) == x.size(3) &&
                  weight.size(2) == 3 && weight.size(3) == 3,
              "mematte_ext.upsample_conv_relu_: weight must have shape (C, Cin, 3, 3) = (", out.size(3), ", ",
              x.size(3), ", 3, 3), got ", weight.sizes());
  upsample_conv_relu_cpu(out, x, weight);
}

template <void (*kernel)(at::Tensor&, const at::Tensor&)>
void checked_upsample_taps_relu(at::Tensor& out, const at::Tensor& taps) {
  check_upsample_taps_relu(out, taps);
  kernel(out, taps);
}
at::Tensor checked_global_attention(const at::Tensor& qkv, const at::Tensor& rel_h, const at::Tensor& rel_w,
                                    int64_t num_heads, double scale) {
  TORCH_CHECK(cpu_has_avx2_fma(), "mematte_ext.global_attention: needs a CPU with AVX2 and FMA; this one has none");
  TORCH_CHECK(num_heads >= 1, "mematte_ext.global_attention: num_heads must be positive, got ", num_heads);
  TORCH_CHECK(qkv.dim() == 4 && qkv.size(3) == 3 * 64 * num_heads,
              "mematte_ext.global_attention: qkv must be (B, H, W, 3C) with C = num_heads * 64 = ", 64 * num_heads,
              ", got shape ", qkv.sizes());
  TORCH_CHECK(is_supported_dtype(qkv.scalar_type()) && qkv.is_contiguous(),
              "mematte_ext.global_attention: qkv must be a contiguous float32, float16 or bfloat16 tensor, got ",
              qkv.scalar_type(), " with strides ", qkv.strides());
  for (const auto& [name, t, n] : {std::tuple{"rel_h", rel_h, qkv.size(1)}, std::tuple{"rel_w", rel_w, qkv.size(2)}}) {
    TORCH_CHECK(t.dim() == 3 && t.size(0) == n && t.size(1) == n && t.size(2) == 64,
                "mematte_ext.global_attention: ", name, " must be the gathered table (", n, ", ", n,
                ", 64) of the grid, got shape ", t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.device() == qkv.device(),
                "mematte_ext.global_attention: ", name, " must be a contiguous float32 tensor on qkv's device");
  }
  return global_attention_cpu(qkv, rel_h, rel_w, num_heads, scale);
}

}  // namespace
}  // namespace mematte

TORCH_LIBRARY(mematte_ext, m) {
  m.def("dwconv_gelu(Tensor x, Tensor weight, Tensor bias) -> Tensor");
  m.def("eca(Tensor z, Tensor weight, Tensor? residual=None) -> Tensor");
  m.def("dwconv_gelu_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor bias) -> (Tensor, Tensor, Tensor)");
  m.def("eca_backward(Tensor grad_out, Tensor z, Tensor weight) -> (Tensor, Tensor)");
  m.def("upsample_taps_relu_(Tensor(a!) out, Tensor taps) -> ()");
  m.def("upsample_conv_relu_(Tensor(a!) out, Tensor x, Tensor weight) -> ()");
  m.def(
      "varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, float scale, Tensor? rel_h=None, "
      "Tensor? rel_w=None) -> Tensor");
  m.def(
      "window_attention(Tensor qkv, Tensor pad_qkv, Tensor rel_h, Tensor rel_w, int num_heads, float scale, "
      "int window) -> Tensor");
  m.def("relpos_attention(Tensor q, Tensor k, Tensor v, Tensor rel_h, Tensor rel_w, float scale) -> Tensor");
  m.def("global_attention(Tensor qkv, Tensor rel_h, Tensor rel_w, int num_heads, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(mematte_ext, CPU, m) {
  m.impl("dwconv_gelu", &mematte::checked_dwconv_gelu<&mematte::dwconv_gelu_cpu>);
  m.impl("eca", &mematte::checked_eca<&mematte::eca_cpu>);
  m.impl("dwconv_gelu_backward", &mematte::checked_dwconv_gelu_backward<&mematte::dwconv_gelu_backward_cpu>);
  m.impl("eca_backward", &mematte::checked_eca_backward<&mematte::eca_backward_cpu>);
  m.impl("upsample_taps_relu_", &mematte::checked_upsample_taps_relu<&mematte::upsample_taps_relu_cpu>);
  m.impl("upsample_conv_relu_", &mematte::checked_upsample_conv_relu);
  m.impl("varlen_attention", &mematte::checked_varlen_attention);
  m.impl("window_attention", &mematte::checked_window_attention);
  m.impl("relpos_attention", &mematte::checked_relpos_attention);
  m.impl("global_attention", &mematte::checked_global_attention);
}

// dwconv_gelu and eca get their autograd formulas in mematte_kernels/ext.py; every other op
// refuses gradients.
TORCH_LIBRARY_IMPL(mematte_ext, Autograd, m) {
  for (const char* op : {"dwconv_gelu_backward", "eca_backward", "upsample_taps_relu_", "upsample_conv_relu_",
                         "varlen_attention", "window_attention", "relpos_attention", "global_attention"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&mematte::no_backward>());
  }
}

#ifdef MEMATTE_WITH_CUDA
TORCH_LIBRARY_IMPL(mematte_ext, CUDA, m) {
  m.impl("dwconv_gelu", &mematte::checked_dwconv_gelu<&mematte::dwconv_gelu_cuda>);
  m.impl("eca", &mematte::checked_eca<&mematte::eca_cuda>);
  m.impl("dwconv_gelu_backward", &mematte::checked_dwconv_gelu_backward<&mematte::dwconv_gelu_backward_cuda>);
  m.impl("eca_backward", &mematte::checked_eca_backward<&mematte::eca_backward_cuda>);
}
#endif

// Importing the module runs the registrations above. Its attributes say how it was built.
PyMODINIT_FUNC PyInit__C() {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "mematte_ext ops (torch.ops.mematte_ext)", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef MEMATTE_WITH_CUDA
  PyObject* cuda_compiled = Py_True;
#else
  PyObject* cuda_compiled = Py_False;
#endif
#ifdef MEMATTE_CUDA_OPTED_OUT
  PyObject* cuda_opted_out = Py_True;
#else
  PyObject* cuda_opted_out = Py_False;
#endif
#ifdef MEMATTE_CUDA_ARCH_LIST
  const char* cuda_arch_list = MEMATTE_CUDA_ARCH_LIST;  // TORCH_CUDA_ARCH_LIST of the build
#else
  const char* cuda_arch_list = "";
#endif
  PyObject* cpu_bf16_kernels = mematte::cpu_has_avx512_bf16() ? Py_True : Py_False;
  PyObject* cpu_avx2_kernels = mematte::cpu_has_avx2_fma() ? Py_True : Py_False;
  if (PyModule_AddObjectRef(module, "cuda_compiled", cuda_compiled) < 0 ||
      PyModule_AddObjectRef(module, "cuda_opted_out", cuda_opted_out) < 0 ||
      PyModule_AddStringConstant(module, "cuda_arch_list", cuda_arch_list) < 0 ||
      PyModule_AddObjectRef(module, "cpu_bf16_kernels", cpu_bf16_kernels) < 0 ||
      PyModule_AddObjectRef(module, "cpu_avx2_kernels", cpu_avx2_kernels) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
