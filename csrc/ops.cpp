// Schemas, argument checks and registration of the mematte_ext ops, plus the Python module
// stub that makes `import mematte_kernels._C` load them.
#include <Python.h>
#include <torch/library.h>

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

void check_dwconv_gelu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  check_activation("dwconv_gelu", "x", x);
  check_parameter("dwconv_gelu", "weight", weight, x);
  check_parameter("dwconv_gelu", "bias", bias, x);
  const int64_t C = x.size(3);
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == 1 && weight.size(2) == 5 && weight.size(3) == 5,
              "mematte_ext.dwconv_gelu: weight must be a depthwise 5x5 kernel of shape (C, 1, 5, 5), got shape ",
              weight.sizes());
  TORCH_CHECK(weight.size(0) == C, "mematte_ext.dwconv_gelu: weight has ", weight.size(0),
              " channels but x has C = ", C);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == C, "mematte_ext.dwconv_gelu: bias must have shape (C,) = (", C,
              ",), got shape ", bias.sizes());
}

void check_eca(const at::Tensor& z, const at::Tensor& weight, const std::optional<at::Tensor>& residual) {
  check_activation("eca", "z", z);
  check_parameter("eca", "weight", weight, z);
  TORCH_CHECK(weight.dim() == 3 && weight.size(0) == 1 && weight.size(1) == 1 && weight.size(2) % 2 == 1,
              "mematte_ext.eca: weight must be a Conv1d kernel of shape (1, 1, k) with k odd, got shape ",
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

}  // namespace
}  // namespace mematte

TORCH_LIBRARY(mematte_ext, m) {
  m.def("dwconv_gelu(Tensor x, Tensor weight, Tensor bias) -> Tensor");
  m.def("eca(Tensor z, Tensor weight, Tensor? residual=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(mematte_ext, CPU, m) {
  m.impl("dwconv_gelu", &mematte::checked_dwconv_gelu<&mematte::dwconv_gelu_cpu>);
  m.impl("eca", &mematte::checked_eca<&mematte::eca_cpu>);
}

#ifdef MEMATTE_WITH_CUDA
TORCH_LIBRARY_IMPL(mematte_ext, CUDA, m) {
  m.impl("dwconv_gelu", &mematte::checked_dwconv_gelu<&mematte::dwconv_gelu_cuda>);
  m.impl("eca", &mematte::checked_eca<&mematte::eca_cuda>);
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
  if (PyModule_AddObjectRef(module, "cuda_compiled", cuda_compiled) < 0 ||
      PyModule_AddObjectRef(module, "cuda_opted_out", cuda_opted_out) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
