"""Moving the routed tokens in and out of the packed (T, C) layout.

``gather_layernorm`` reads the selected rows of the (M, C) token matrix and LayerNorms them
on the way (the routed block's ``norm1(x[sel])``), so the unnormalised gathered copy is never
written. ``scatter_residual_`` writes ``residual[index] + rows`` back into ``out[index]`` in
one pass (the routed block's ``x + msa`` on the selected tokens).

One program handles BLOCK_T rows of the whole channel width (C <= a few thousand), so the
LayerNorm statistics come from registers: the mean, then the variance around it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_devices, check_float, check_ndim, check_shape, on_input_device

# Enough elements per program to keep the loads wide without spilling.
ELEMENTS_PER_PROGRAM = 4096


@triton.jit(do_not_specialize=["T"])  # the kept-token count changes with every image
def _gather_layernorm_kernel(
    x_ptr,
    index_ptr,
    weight_ptr,
    bias_ptr,
    out_ptr,
    T,
    C,
    eps,
    stride_xm,
    stride_xc,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,) packed rows
    offs_c = tl.arange(0, BLOCK_C)  # (BLOCK_C,) channels
    t_mask = offs_t < T
    c_mask = offs_c < C
    mask = t_mask[:, None] & c_mask[None, :]

    rows = tl.load(index_ptr + offs_t, mask=t_mask, other=0).to(tl.int64)  # (BLOCK_T,) rows of x
    x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_c[None, :] * stride_xc, mask=mask, other=0.0)
    x = x.to(tl.float32)  # (BLOCK_T, BLOCK_C)

    mean = tl.sum(x, axis=1) / C  # (BLOCK_T,)
    centered = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / C + eps)  # (BLOCK_T,)
    gamma = tl.load(weight_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)  # (BLOCK_C,)
    beta = tl.load(bias_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    y = centered * rstd[:, None] * gamma[None, :] + beta[None, :]  # (BLOCK_T, BLOCK_C)

    out_ptrs = out_ptr + offs_t[:, None].to(tl.int64) * C + offs_c[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["T"])  # the kept-token count changes with every image
def _scatter_residual_kernel(
    out_ptr,
    residual_ptr,
    rows_ptr,
    index_ptr,
    T,
    C,
    stride_om,
    stride_oc,
    stride_rm,
    stride_rc,
    stride_tm,
    stride_tc,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,) packed rows
    offs_c = tl.arange(0, BLOCK_C)  # (BLOCK_C,) channels
    mask = (offs_t < T)[:, None] & (offs_c < C)[None, :]

    dest = tl.load(index_ptr + offs_t, mask=offs_t < T, other=0).to(tl.int64)  # (BLOCK_T,) rows of out
    residual = tl.load(residual_ptr + dest[:, None] * stride_rm + offs_c[None, :] * stride_rc, mask=mask)
    update = tl.load(rows_ptr + offs_t[:, None].to(tl.int64) * stride_tm + offs_c[None, :] * stride_tc, mask=mask)
    # One fp32 add and one rounding, as torch computes a + b for every float dtype.
    total = residual.to(tl.float32) + update.to(tl.float32)  # (BLOCK_T, BLOCK_C)
    tl.store(
        out_ptr + dest[:, None] * stride_om + offs_c[None, :] * stride_oc, total.to(out_ptr.dtype.element_ty), mask=mask
    )


def _row_tile(C: int) -> dict:
    block_c = triton.next_power_of_2(C)
    return dict(
        BLOCK_T=max(1, ELEMENTS_PER_PROGRAM // block_c),
        BLOCK_C=block_c,
        num_warps=8 if block_c >= 4096 else 4,
    )


def _check_index(op: str, index: torch.Tensor) -> None:
    check_ndim(op, "index", index, 1, "(T,)")
    if index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: index must be int64 (or int32), got {index.dtype}")


def _check_gather_inputs(x, index, weight, bias) -> None:
    op = "gather_layernorm"
    check_ndim(op, "x", x, 2, "(M, C)")
    check_float(op, "x", x)
    _check_index(op, index)
    for name, t in (("weight", weight), ("bias", bias)):
        check_shape(op, name, t, (x.shape[1],))
        check_float(op, name, t)
    check_devices(op, x=x, index=index, weight=weight, bias=bias)


@on_input_device
def launch_gather_layernorm(
    x: torch.Tensor,
    index: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    *,
    out: torch.Tensor,
) -> None:
    """LayerNorm rows ``index`` of ``x`` into ``out`` (T, C), contiguous, x's dtype.
    ``index`` values must lie in [0, M); they are not checked (that would need a host sync)."""
    _check_gather_inputs(x, index, weight, bias)
    T, C = index.shape[0], x.shape[1]
    check_shape("gather_layernorm", "out", out, (T, C))
    if out.dtype != x.dtype or not out.is_contiguous() or out.device != x.device:
        raise ValueError(f"gather_layernorm: out must be a contiguous {x.dtype} tensor on {x.device}")
    if T == 0 or C == 0:
        return
    tile = _row_tile(C)
    _gather_layernorm_kernel[(triton.cdiv(T, tile["BLOCK_T"]),)](
        x,
        index,
        weight.contiguous(),
        bias.contiguous(),
        out,
        T,
        C,
        eps,
        x.stride(0),
        x.stride(1),
        **tile,
    )


def _check_scatter_inputs(out, residual, rows, index) -> None:
    op = "scatter_residual_"
    check_ndim(op, "out", out, 2, "(M, C)")
    check_float(op, "out", out)
    _check_index(op, index)
    check_shape(op, "residual", residual, tuple(out.shape))
    check_shape(op, "rows", rows, (index.shape[0], out.shape[1]))
    check_float(op, "residual", residual, out.dtype)
    check_float(op, "rows", rows, out.dtype)
    check_devices(op, out=out, residual=residual, rows=rows, index=index)


@torch.library.custom_op("mematte::gather_layernorm", mutates_args=())
def _gather_layernorm_op(
    x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    out = x.new_empty((index.numel(), x.shape[-1]))
    launch_gather_layernorm(x, index, weight, bias, eps, out=out)
    return out


@_gather_layernorm_op.register_fake
def _(x, index, weight, bias, eps):
    _check_gather_inputs(x, index, weight, bias)
    return x.new_empty((index.shape[0], x.shape[1]))


@on_input_device
def launch_scatter_residual_(
    out: torch.Tensor, residual: torch.Tensor, rows: torch.Tensor, index: torch.Tensor
) -> None:
    """``out[index] = residual[index] + rows`` in place. ``index`` values must lie in [0, M)
    and not repeat; they are not checked (that would need a host sync)."""
    _check_scatter_inputs(out, residual, rows, index)
    T, C = rows.shape
    if T == 0 or C == 0:
        return
    tile = _row_tile(C)
    _scatter_residual_kernel[(triton.cdiv(T, tile["BLOCK_T"]),)](
        out,
        residual,
        rows,
        index,
        T,
        C,
        out.stride(0),
        out.stride(1),
        residual.stride(0),
        residual.stride(1),
        rows.stride(0),
        rows.stride(1),
        **tile,
    )


@torch.library.custom_op("mematte::scatter_residual_", mutates_args=("out",))
def _scatter_residual_op(out: torch.Tensor, residual: torch.Tensor, rows: torch.Tensor, index: torch.Tensor) -> None:
    launch_scatter_residual_(out, residual, rows, index)


@_scatter_residual_op.register_fake
def _(out, residual, rows, index):
    _check_scatter_inputs(out, residual, rows, index)


def gather_layernorm(
    x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Rows ``index`` of ``x`` (M, C), each LayerNorm-ed: (T, C) in x's dtype, as
    :func:`mematte_kernels.reference.gather_layernorm`. Statistics are fp32."""
    return torch.ops.mematte.gather_layernorm(x, index, weight, bias, eps)


def scatter_residual_(out: torch.Tensor, residual: torch.Tensor, rows: torch.Tensor, index: torch.Tensor) -> None:
    """In place: ``out[index] = residual[index] + rows``, as
    :func:`mematte_kernels.reference.scatter_residual_`; the other rows of ``out`` are not
    touched. ``index`` must not repeat a row (``token_index`` never does); ``out`` may be
    ``residual`` itself."""
    torch.ops.mematte.scatter_residual_(out, residual, rows, index)
