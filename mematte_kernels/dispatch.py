"""The one place where an implementation is chosen for each op.

A backend is a table of ops (:class:`OpTable`). The model asks :func:`resolve` once per
forward for the tensors' device and calls the table; it never checks what is installed.

Backends:
  ``reference``  plain PyTorch (:mod:`mematte_kernels.reference`), the oracle.
  ``triton``     Triton kernels for the routed path (router, gather/scatter, varlen
                 attention) and the policy attention of training; LTRM ops from the
                 compiled extension when it has them for the device. Runs on CPU tensors
                 under ``TRITON_INTERPRET=1``.
  ``cuda``       the GPU fast path: Triton routed path + CUDA LTRM ops.
  ``cpu``        the CPU fast path: fused PyTorch routed path + C++ LTRM ops; where an op
                 has several CPU implementations, the one measured fastest on this CPU
                 (:mod:`mematte_kernels.selection`; ``MEMATTE_CPU_KERNELS`` forces one).
  ``auto``       ``cuda`` for CUDA tensors, ``cpu`` otherwise.

``MEMATTE_BACKEND`` overrides whatever the caller asked for.

Training (``resolve(..., training=True)``) keeps the backend's ops that have a backward and
swaps every other op for its differentiable reference, so a gradient never silently stops at
an inference-only kernel.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch

from . import cpu_choices, ext, native, reference, selection

log = logging.getLogger("mematte_kernels")

BACKENDS = ("auto", "reference", "triton", "cuda", "cpu")
ENV_VAR = "MEMATTE_BACKEND"


@dataclass(frozen=True)
class OpTable:
    name: str
    router_scores: Callable
    cap_tokens: Callable
    token_index: Callable
    gather_layernorm: Callable
    scatter_residual_: Callable
    varlen_attention: Callable
    policy_attention: Callable
    dwconv_gelu: Callable
    eca: Callable
    window_attention: Callable
    global_attention: Callable
    channels_first_layer_norm: Callable
    upsample_conv_relu_: Callable
    conv2d: Callable
    patch_embed: Callable
    linear: Callable
    linear_gelu: Callable


REFERENCE = OpTable(
    name="reference",
    router_scores=reference.router_scores,
    cap_tokens=reference.cap_tokens,
    token_index=reference.token_index,
    gather_layernorm=reference.gather_layernorm,
    scatter_residual_=reference.scatter_residual_,
    varlen_attention=reference.varlen_attention,
    policy_attention=reference.policy_attention,
    dwconv_gelu=reference.dwconv_gelu,
    eca=reference.eca,
    window_attention=reference.window_attention,
    global_attention=reference.global_attention,
    channels_first_layer_norm=reference.channels_first_layer_norm,
    upsample_conv_relu_=reference.upsample_conv_relu_,
    conv2d=reference.conv2d,
    patch_embed=reference.patch_embed,
    linear=reference.linear,
    linear_gelu=reference.linear_gelu,
)


# Fast ops made of differentiable PyTorch ops whose gradients match the references' to fp32
# rounding in the model: a training table keeps them, as it keeps the references. (The
# fused channels-first LayerNorm is not one: in the model the gradients upstream of the
# ResBottlenecks drift 2e-3 from fp64 with it, 3e-2 on a router's bias, where the
# reference's stay at 5e-5; followed by a copy to NCHW it does not drift, and on its own
# it matches to 1e-7, so the cause lies in the backward of its channels-last output.)
# The CPU policy attention has its own backward, tested against the fp64 reference as the
# kernels are; PyTorch's fused attention differentiates the CPU varlen attention.
DIFFERENTIABLE = frozenset({native.router_scores, native.policy_attention, native.varlen_attention})
_REFERENCE_OPS = frozenset(getattr(REFERENCE, f.name) for f in fields(OpTable) if f.name != "name")
# Compiled ops with an autograd formula: kept where the build has their backward kernels.
_EXT_OPS = {ext.dwconv_gelu: "dwconv_gelu", ext.eca: "eca"}
# Triton ops registered with their backward.
TRITON_DIFFERENTIABLE = ("policy_attention", "varlen_attention")


def has_backward(op: Callable, device: torch.device | str) -> bool:
    """Whether gradients flow through ``op`` (an implementation held by some table) for
    ``device``'s tensors."""
    if op in DIFFERENTIABLE or op in _REFERENCE_OPS:
        return True
    if op in _EXT_OPS:
        return ext.has_kernel(f"{_EXT_OPS[op]}_backward", device)
    if getattr(op, "__module__", "").startswith(f"{__package__}.triton"):
        from . import triton as triton_ops

        return any(op is getattr(triton_ops, name) for name in TRITON_DIFFERENTIABLE)
    return False


def requested_backend(backend: str = "auto") -> str:
    """The backend in force: ``MEMATTE_BACKEND`` if set, else ``backend``."""
    name = os.environ.get(ENV_VAR, "").strip().lower() or backend
    if name not in BACKENDS:
        source = ENV_VAR if os.environ.get(ENV_VAR, "").strip() else "backend"
        raise ValueError(f"unknown {source} {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


_logged: set[tuple[str, str]] = set()


def resolve(backend: str, device: torch.device | str, training: bool = False) -> OpTable:
    """The op table for ``backend`` on ``device`` (after ``MEMATTE_BACKEND``); with
    ``training``, every op without a backward replaced by its reference."""
    device = torch.device(device)
    name = requested_backend(backend)
    table = _build(name, device)
    if training:
        table = _trainable(table, device)
    key = (table.name, device.type)
    if key not in _logged:
        _logged.add(key)
        log.info("mematte_kernels: backend %r on %s (asked for %r)", table.name, device.type, name)
    return table


def _build(name: str, device: torch.device) -> OpTable:
    forced = name != "auto"
    if name == "auto":
        name = "cuda" if device.type == "cuda" else "cpu"
    if name == "reference":
        return REFERENCE
    if name == "cpu":
        # The cpu backend also runs on CUDA tensors when forced; oneDNN and the AVX512-BF16
        # kernels take CPU tensors only.
        ops = dict(
            router_scores=native.router_scores,
            varlen_attention=native.varlen_attention,
            policy_attention=native.policy_attention,
        )
        if device.type == "cpu":
            # Where an op has several CPU implementations, the fastest on this CPU, measured.
            choices = cpu_choices.selected()
            selection.check_forced(choices)
            ops.update({field: op for field, op in choices.items() if field not in FUSED_CPU_CHOICES})
        return _with_ltrm("cpu", device, **ops)
    # "triton" and "cuda": the Triton routed path. Whether it can take CPU tensors was fixed
    # when the kernels were decorated, so ask the kernels' module, not the environment now.
    from . import triton as triton_ops
    from .triton._common import INTERPRET

    if device.type != "cuda" and not INTERPRET:
        raise ValueError(
            f"backend {name!r} runs Triton kernels, which need CUDA tensors (got {device.type}); "
            f"use 'cpu' or 'auto', or set TRITON_INTERPRET=1 before import to interpret them on the CPU"
        )
    routed = dict(
        router_scores=triton_ops.router_scores,
        gather_layernorm=triton_ops.gather_layernorm,
        scatter_residual_=triton_ops.scatter_residual_,
        varlen_attention=triton_ops.varlen_attention,
        global_attention=triton_ops.global_attention,
        policy_attention=triton_ops.policy_attention,
    )
    if name == "cuda" and forced and not ext.available(device):
        raise ValueError(
            f"backend 'cuda' needs the compiled extension's LTRM ops for {device.type} tensors, and this "
            f"build has none; reinstall with nvcc available, or use 'triton' or 'auto'"
        )
    return _with_ltrm(name, device, **routed)


def _trainable(table: OpTable, device: torch.device) -> OpTable:
    """``table`` with each op that has no backward swapped for its reference."""
    ops = {f.name: getattr(table, f.name) for f in fields(OpTable) if f.name != "name"}
    # A selected op trains with its differentiable candidate where it names one.
    swapped = {
        name: getattr(op, "trainable", None) or getattr(REFERENCE, name)
        for name, op in ops.items()
        if not has_backward(op, device)
    }
    fast = [name for name, op in ops.items() if name not in swapped and op is not getattr(REFERENCE, name)]
    return replace(table, name=f"{table.name}, training (fast: {', '.join(fast) or 'none'})", **swapped)


_warned: set[str] = set()


def _missing_ltrm_reason(device: torch.device) -> str:
    """Why the extension has no LTRM kernels for ``device``, and what to do about it."""
    if ext._C is None:
        return "the compiled extension mematte_kernels._C is not built; install with nvcc available"
    if device.type == "cuda" and not ext._C.cuda_compiled:
        how = "MEMATTE_NO_CUDA=1" if ext._C.cuda_opted_out else "torch without CUDA, or nvcc not found"
        return f"mematte_kernels._C was built without CUDA code ({how}); reinstall with nvcc available"
    return f"mematte_kernels._C has no {device.type} kernels for them"


# Fast ops every non-reference backend runs on CPU tensors (the Triton backend under the
# interpreter included): on the CPU, the ones measured fastest.
FUSED_CPU_CHOICES = ("window_attention", "global_attention", "upsample_conv_relu_")


def _with_ltrm(name: str, device: torch.device, **ops) -> OpTable:
    """A table on the reference, with ``ops`` swapped in, fused window attention, and the
    compiled ops when the extension has them for ``device``."""
    if ext.available(device):
        ops.update(dwconv_gelu=ext.dwconv_gelu, eca=ext.eca)
    else:
        name = f"{name} (LTRM ops: reference, the extension has none for {device.type})"
        if device.type == "cuda" and name not in _warned:
            # On a GPU this costs real speed, and nothing else would say so.
            _warned.add(name)
            log.warning(
                "mematte_kernels: backend %r runs the LTRM ops (dwconv_gelu, eca) as PyTorch "
                "reference code on the GPU: %s",
                name.split(" ")[0],
                _missing_ltrm_reason(device),
            )
    if device.type == "cpu":
        fused = {field: cpu_choices.selected()[field] for field in FUSED_CPU_CHOICES}
    else:
        fused = dict(
            window_attention=native.window_attention,
            global_attention=native.global_attention,
            upsample_conv_relu_=native.upsample_conv_relu_,
        )
    if not ext.has_kernel("upsample_taps_relu_", device):
        del fused["upsample_conv_relu_"]
    return replace(REFERENCE, name=name, channels_first_layer_norm=native.channels_first_layer_norm, **{**fused, **ops})
