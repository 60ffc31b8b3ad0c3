// The LTRM ops of MEMatte on channels-last (B, H, W, C) tensors, one entry point per device.
// Arguments are validated in ops.cpp before these are called.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <optional>

// The dtypes the ops accept; instantiating only these keeps the build short.
#define MEMATTE_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)        \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace mematte {

// Depthwise 5x5 conv, padding 2, + bias + exact GELU.
// x (B, H, W, C) contiguous; weight (C, 1, 5, 5); bias (C).
at::Tensor dwconv_gelu_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias);

// z + z * sigmoid(conv1d_k(mean_hw(z))) [+ residual].
// z (B, H, W, C) contiguous; weight (1, 1, k), k odd; residual like z.
at::Tensor eca_cpu(const at::Tensor& z, const at::Tensor& weight, const std::optional<at::Tensor>& residual);

#ifdef MEMATTE_WITH_CUDA
at::Tensor dwconv_gelu_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias);
at::Tensor eca_cuda(const at::Tensor& z, const at::Tensor& weight, const std::optional<at::Tensor>& residual);
#endif

}  // namespace mematte
