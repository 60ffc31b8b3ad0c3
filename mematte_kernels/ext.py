"""The compiled ops, ``torch.ops.mematte_ext``, from :mod:`mematte_kernels._C`.

``dwconv_gelu``, ``eca`` and ``upsample_taps_relu_`` take the arguments of, and match, their
namesakes in :mod:`mematte_kernels.reference` on contiguous channels-last (B, H, W, C) tensors.
The LTRM ops' weights may be float32 even for float16/bfloat16 activations; they are read in
fp32. ``dwconv_gelu`` and ``eca`` are differentiable: their backward ops,
``dwconv_gelu_backward`` and ``eca_backward``, are compiled kernels too (gradients summed in
fp32, each gradient in its input's dtype). Every other op here is inference-only and raises an
error naming itself when an input requires grad outside ``torch.no_grad()``. This module
imports without the extension: then :func:`available` and :func:`has_kernel` are false for
every device.
"""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger("mematte_kernels")

try:
    from . import _C  # importing it registers torch.ops.mematte_ext
except ImportError as exc:
    _C = None
    log.warning("mematte_kernels: compiled LTRM ops (mematte_kernels._C) unavailable: %s", exc)

OPS = ("dwconv_gelu", "eca")
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def has_kernel(op: str, device: torch.device | str) -> bool:
    """Whether ``mematte_ext::op`` has a kernel for ``device``'s type in this build."""
    key = _DISPATCH_KEYS.get(torch.device(device).type)
    if _C is None or key is None or not hasattr(torch.ops.mematte_ext, op):  # an older build lacks newer ops
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"mematte_ext::{op}", key)


def cpu_bf16_kernels() -> bool:
    """Whether the AVX512-BF16 kernels (:func:`varlen_attention`, :func:`window_attention`,
    :func:`relpos_attention`, :func:`upsample_conv_relu_`) run here: built, and the CPU has
    the instructions."""
    return has_kernel("varlen_attention", "cpu") and bool(_C.cpu_bf16_kernels)


def cpu_avx2_kernels() -> bool:
    """Whether the AVX2 + FMA kernel (:func:`global_attention`) runs here: built, and the CPU
    has the instructions."""
    return has_kernel("global_attention", "cpu") and bool(getattr(_C, "cpu_avx2_kernels", False))


def available(device: torch.device | str) -> bool:
    """Whether both LTRM ops have a kernel for ``device``'s type in this build."""
    return all(has_kernel(op, device) for op in OPS)


def cuda_arch_list() -> str:
    """The TORCH_CUDA_ARCH_LIST the extension's CUDA code was built for ("" without it)."""
    return getattr(_C, "cuda_arch_list", "")


def launch_failure_message(op: str, device_name: str, capability: tuple[int, int], built_for: str, error) -> str:
    arch = "%d.%d" % capability
    return (
        f"mematte_ext::{op} failed on {device_name} (compute capability {arch}), and the extension's CUDA code "
        f"was built for TORCH_CUDA_ARCH_LIST={built_for or 'unknown'!r}: if that does not cover this GPU, rebuild "
        f"for it: TORCH_CUDA_ARCH_LIST={arch!r} pip install --no-build-isolation -e . ({error})"
    )


@contextlib.contextmanager
def _launch_failures_reported(op: str, tensor: torch.Tensor):
    """CUDA errors from ``op`` on ``tensor``'s GPU re-raised naming the GPU's architecture and
    those the extension was built for: a build without code for a GPU reports its ops
    available and fails only at launch ("no kernel image is available")."""
    try:
        yield
    except RuntimeError as error:
        if tensor.device.type != "cuda" or "CUDA error" not in str(error):
            raise
        device = tensor.device
        message = launch_failure_message(
            op, torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device), cuda_arch_list(), error
        )
        raise RuntimeError(message) from error


def dwconv_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Depthwise 5x5 conv (padding 2) + bias + exact GELU on (B, H, W, C), in one pass."""
    with _launch_failures_reported("dwconv_gelu", x):
        return torch.ops.mematte_ext.dwconv_gelu(x, weight, bias)


def eca(z: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``z + z * sigmoid(conv1d(mean_hw(z)))`` on (B, H, W, C), plus ``residual`` in the same pass."""
    with _launch_failures_reported("eca", z):
        return torch.ops.mematte_ext.eca(z, weight, residual)


def dwconv_gelu_backward(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients ``(grad_x, grad_weight, grad_bias)`` of :func:`dwconv_gelu` for
    ``grad_out`` (shaped and typed like x); the pre-activation is recomputed from x."""
    with _launch_failures_reported("dwconv_gelu_backward", x):
        return torch.ops.mematte_ext.dwconv_gelu_backward(grad_out, x, weight, bias)


def eca_backward(grad_out: torch.Tensor, z: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients ``(grad_z, grad_weight)`` of :func:`eca` for ``grad_out``; the residual's
    gradient is ``grad_out`` itself."""
    with _launch_failures_reported("eca_backward", z):
        return torch.ops.mematte_ext.eca_backward(grad_out, z, weight)


def upsample_taps_relu_(out: torch.Tensor, taps: torch.Tensor) -> None:
    """``out = relu(out + sum over the 3×3 taps of the shifted ×2 upsampled tap maps)``, in place:
    the conv of an upsampled map from its taps at low resolution. out (B, 2h, 2w, C), taps
    (B, h, w, 9C), same dtype."""
    torch.ops.mematte_ext.upsample_taps_relu_(out, taps)


def upsample_conv_relu_(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """``out = relu(out + conv3x3(upsample2x(x), weight))`` in place on bf16 channels-last
    tensors, out (B, 2h, 2w, C) and x (B, h, w, Cin), C a multiple of 16: the taps made from
    x on the fly, in fp32, instead of :func:`upsample_taps_relu_`'s precomputed ones."""
    torch.ops.mematte_ext.upsample_conv_relu_(out, x, weight)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float,
    rel_h: torch.Tensor | None = None,
    rel_w: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sequence attention over packed bf16 (T, heads, 64) tensors on AVX512-BF16 CPUs:
    :func:`mematte_kernels.reference.varlen_attention` at the bf16 dot-product rate. With the
    gathered position tables ``rel_h`` (H, H, 64) and ``rel_w`` (W, W, 64), every sequence is
    an H×W grid and the logits get :func:`mematte_kernels.reference.rel_pos_attention`'s
    decomposed bias."""
    return torch.ops.mematte_ext.varlen_attention(q, k, v, cu_seqlens, scale, rel_h, rel_w)


def window_attention(
    qkv: torch.Tensor,
    pad_qkv: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    num_heads: int,
    scale: float,
    window: int,
) -> torch.Tensor:
    """:func:`mematte_kernels.reference.window_attention` on AVX512-BF16 CPUs: bf16 qkv
    (B, H, W, 3C) contiguous with head dim 64, window <= 16 -> (B, H, W, C)."""
    return torch.ops.mematte_ext.window_attention(qkv, pad_qkv, rel_h, rel_w, num_heads, scale, window)


def relpos_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, scale: float
) -> torch.Tensor:
    """:func:`mematte_kernels.reference.rel_pos_attention` on AVX512-BF16 CPUs: bf16 q, k, v
    (B, N, heads, 64) (a batch stride of N token strides, as views of one qkv give) over H×W
    grids, the gathered tables rel_h (H, H, 64) and rel_w (W, W, 64) fp32 contiguous ->
    (B, N, heads, 64); no N×N matrix, each query block's position terms computed in the kernel."""
    return torch.ops.mematte_ext.relpos_attention(q, k, v, rel_h, rel_w, scale)


def global_attention(
    qkv: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, num_heads: int, scale: float
) -> torch.Tensor:
    """:func:`mematte_kernels.reference.global_attention` on CPUs with AVX2 + FMA, computed in
    fp32: qkv (B, H, W, 3C) contiguous fp32/bf16/fp16 with head dim 64, the gathered tables
    rel_h (H, H, 64) and rel_w (W, W, 64) fp32 contiguous -> (B, H, W, C) in qkv's dtype;
    flash-style, no N×N matrix and no per-query tables of the whole grid."""
    return torch.ops.mematte_ext.global_attention(qkv, rel_h, rel_w, num_heads, scale)


if _C is not None:
    # Shapes for FakeTensor / torch.compile: the LTRM ops return a tensor like their input;
    # upsample_taps_relu_ only writes its first argument.

    @torch.library.register_fake("mematte_ext::dwconv_gelu")
    def _dwconv_gelu_fake(x, weight, bias):
        return torch.empty_like(x)

    @torch.library.register_fake("mematte_ext::eca")
    def _eca_fake(z, weight, residual=None):
        return torch.empty_like(z)

    @torch.library.register_fake("mematte_ext::upsample_taps_relu_")
    def _upsample_taps_relu_fake(out, taps):
        return None

    @torch.library.register_fake("mematte_ext::varlen_attention")
    def _varlen_attention_fake(q, k, v, cu_seqlens, scale, rel_h=None, rel_w=None):
        return q.new_empty(q.shape)

    @torch.library.register_fake("mematte_ext::window_attention")
    def _window_attention_fake(qkv, pad_qkv, rel_h, rel_w, num_heads, scale, window):
        return qkv.new_empty((*qkv.shape[:-1], qkv.shape[-1] // 3))

    if hasattr(torch.ops.mematte_ext, "relpos_attention"):  # builds from before the op lack it

        @torch.library.register_fake("mematte_ext::relpos_attention")
        def _relpos_attention_fake(q, k, v, rel_h, rel_w, scale):
            return q.new_empty(q.shape)

    if hasattr(torch.ops.mematte_ext, "global_attention"):

        @torch.library.register_fake("mematte_ext::global_attention")
        def _global_attention_fake(qkv, rel_h, rel_w, num_heads, scale):
            return qkv.new_empty((*qkv.shape[:-1], qkv.shape[-1] // 3))

    @torch.library.register_fake("mematte_ext::upsample_conv_relu_")
    def _upsample_conv_relu_fake(out, x, weight):
        return None

    # A build from before the backward ops still runs inference, so it is a warning, not an
    # import error; a backward through it is an error naming the op, never a missing gradient.
    if all(hasattr(torch.ops.mematte_ext, op) for op in ("dwconv_gelu_backward", "eca_backward")):

        @torch.library.register_fake("mematte_ext::dwconv_gelu_backward")
        def _dwconv_gelu_backward_fake(grad_out, x, weight, bias):
            return torch.empty_like(x), weight.new_empty(weight.shape), bias.new_empty(bias.shape)

        @torch.library.register_fake("mematte_ext::eca_backward")
        def _eca_backward_fake(grad_out, z, weight):
            return torch.empty_like(z), weight.new_empty(weight.shape)

        # Autograd of the two LTRM ops. dwconv_gelu keeps only its inputs: the backward recomputes
        # the pre-activation (25 multiply-adds an element) instead of holding a (B, H, W, C) tensor
        # from forward to backward. Gradients may arrive non-contiguous (expanded, permuted); the
        # kernels take them contiguous.

        def _dwconv_gelu_setup_context(ctx, inputs, output):
            ctx.save_for_backward(*inputs)

        def _dwconv_gelu_grad(ctx, grad):
            x, weight, bias = ctx.saved_tensors
            return torch.ops.mematte_ext.dwconv_gelu_backward(grad.contiguous(), x, weight, bias)

        def _eca_setup_context(ctx, inputs, output):
            z, weight, residual = inputs
            ctx.save_for_backward(z, weight)
            ctx.has_residual = residual is not None

        def _eca_grad(ctx, grad):
            z, weight = ctx.saved_tensors
            grad = grad.contiguous()
            grad_z, grad_weight = torch.ops.mematte_ext.eca_backward(grad, z, weight)
            # out = ... + residual: its gradient is grad itself, passed on rather than copied.
            return grad_z, grad_weight, grad if ctx.has_residual else None

        torch.library.register_autograd(
            "mematte_ext::dwconv_gelu", _dwconv_gelu_grad, setup_context=_dwconv_gelu_setup_context
        )
        torch.library.register_autograd("mematte_ext::eca", _eca_grad, setup_context=_eca_setup_context)
    else:
        log.warning(
            "mematte_kernels: the compiled extension predates dwconv_gelu_backward and eca_backward; "
            "rebuild it (pip install --no-build-isolation -e .) to train through the compiled LTRM ops"
        )

        def _stale_build_grad(op: str):
            def backward(ctx, grad):
                raise RuntimeError(
                    f"mematte_ext.{op}: this build of mematte_kernels._C has no backward for it; rebuild it "
                    "(pip install --no-build-isolation -e .)"
                )

            return backward

        for _op in OPS:
            torch.library.register_autograd(f"mematte_ext::{_op}", _stale_build_grad(_op))
