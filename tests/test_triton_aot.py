"""Ahead-of-time compilation of the Triton kernels without a GPU, for the consumer cards
sm_75 (RTX 2080 Ti, the paper's GPU), sm_86 (RTX 30x0) and sm_89 (RTX 40x0) and the
data-centre ones sm_80 (A100) and sm_90 (H100); the attention kernels at head dims 64
(MEMatte's) and 128 (the largest they take, whose tiles hold the most; 32 and 80 hold no
more). Turing has no bf16.

Every kernel with one fixed config is compiled for each card and must fit its shared memory
per block. Every config of every autotuned kernel is compiled at head dim 64 for sm_80 and
sm_90; on the other cards, and at head dim 128, its configs are compiled smallest first until
one fits, as the autotuner drops a config the card cannot launch (Triton raises
OutOfResources for it) and needs only one left. The dots must take the intended path:
tensor-core MMA for fp16/bf16, exact fp32 FMA (no TF32 MMA) for fp32; on Turing FMA for
every dtype, as this Triton emits MMA from sm_80 on only. At head dim 64 on sm_80 and sm_90
the first config of each autotuned kernel must not spill registers to local memory.

The compiling runs in a subprocess, which runs this file as a script, one compiling process
per core: the test session sets TRITON_INTERPRET=1 without a GPU, and kernels decorated
under it are interpreter wrappers that cannot be compiled.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Shared memory one block may use (opt-in maximum): Turing 64 KiB, GA10x and AD10x 99 KiB,
# A100 163 KiB, H100 227 KiB.
SHARED_MEMORY_LIMIT = {75: 65536, 86: 101376, 89: 101376, 80: 166912, 90: 232448}
DTYPES = ("fp32", "bf16", "fp16")
ARCH_DTYPES = {arch: tuple(d for d in DTYPES if not (arch < 80 and d == "bf16")) for arch in SHARED_MEMORY_LIMIT}
HEAD_DIMS = (64, 128)
# Where every config of the autotuned kernels is compiled.
SWEEP_ARCHS, SWEEP_HEAD_DIM = (80, 90), 64
# Local memory per thread that holds a spilled scalar or two, not a tile.
SCALAR_SPILL_BYTES = 8
# MEMatte's widths: ViT-S and ViT-B. They set the router head's padded C/4 and the row tiles.
WIDTHS = (384, 768)

# Each kernel's runtime arguments as MEMatte's launches pass them, with what the JIT would
# specialise on, since that sets the loads' vector width and the pipelining (and so the
# shared memory): "act" is a pointer of the dtype under test; "i32/16" an integer that is a
# multiple of 16 (C = 384 or 768 and the strides built from it); an int value an argument
# the JIT turns into that constant (unit strides).
ACT = "act"
I32_16 = "i32/16"
SIGNATURES = {
    # The model's routers: fp32 parameters ("*fp32") on tokens of the dtype under test, whose
    # two wide layers get their weights in that dtype.
    "_router_hidden_kernel": dict(
        x_ptr=ACT,
        norm_weight_ptr="*fp32",
        norm_bias_ptr="*fp32",
        in_weight_ptr=ACT,
        in_bias_ptr="*fp32",
        local_ptr=ACT,
        partial_ptr="*fp32",
        N="i32",
        C=I32_16,
        eps="fp32",
        stride_xb=I32_16,
        stride_xn=I32_16,
        stride_xc=1,
    ),
    "_router_fold_kernel": dict(
        partial_ptr="*fp32",
        out0_weight_ptr="*fp32",
        out0_bias_ptr="*fp32",
        folded_bias_ptr="*fp32",
        N="i32",
        C=I32_16,
        num_tiles="i32",
    ),
    "_router_head_kernel": dict(
        local_ptr=ACT,
        folded_bias_ptr="*fp32",
        out0_weight_ptr=ACT,
        out1_weight_ptr="*fp32",
        out1_bias_ptr="*fp32",
        out2_weight_ptr="*fp32",
        out2_bias_ptr="*fp32",
        scores_ptr="*fp32",
        keep_ptr="*i1",
        N="i32",
        C=I32_16,
    ),
    "_gather_layernorm_kernel": dict(
        x_ptr=ACT,
        index_ptr="*i64",
        weight_ptr=ACT,
        bias_ptr=ACT,
        out_ptr=ACT,
        T="i32",
        C=I32_16,
        eps="fp32",
        stride_xm=I32_16,
        stride_xc=1,
    ),
    "_scatter_residual_kernel": dict(
        out_ptr=ACT,
        residual_ptr=ACT,
        rows_ptr=ACT,
        index_ptr="*i64",
        T="i32",
        C=I32_16,
        stride_om=I32_16,
        stride_oc=1,
        stride_rm=I32_16,
        stride_rc=1,
        stride_tm=I32_16,
        stride_tc=1,
    ),
    # Varlen attention writes out, or (the backward's statistics pass) the log-sum-exp alone.
    "_varlen_attention_kernel": dict(
        q_ptr=ACT,
        k_ptr=ACT,
        v_ptr=ACT,
        out_ptr=ACT,
        lse_ptr="*fp32",
        cu_seqlens_ptr="*i32",
        num_tokens="i32",
        num_heads="i32",
        qk_scale="fp32",
        seqlen_bucket="i32",
        stride_qt=I32_16,
        stride_qh=I32_16,
        stride_kt=I32_16,
        stride_kh=I32_16,
        stride_vt=I32_16,
        stride_vh=I32_16,
        stride_ot=I32_16,
        stride_oh=I32_16,
    ),
    # ViTMatte's global attention: the position tables' strides follow the grid (any integer).
    "_relpos_attention_kernel": dict(
        q_ptr=ACT,
        k_ptr=ACT,
        v_ptr=ACT,
        bias_h_ptr=ACT,
        bias_w_ptr=ACT,
        out_ptr=ACT,
        num_queries="i32",
        N="i32",
        grid_w="i32",
        num_heads="i32",
        qk_scale="fp32",
        seqlen_bucket="i32",
        stride_qb=I32_16,
        stride_qn=I32_16,
        stride_qh=I32_16,
        stride_kb=I32_16,
        stride_kn=I32_16,
        stride_kh=I32_16,
        stride_vb=I32_16,
        stride_vn=I32_16,
        stride_vh=I32_16,
        stride_hb="i32",
        stride_hn="i32",
        stride_hh="i32",
        stride_wb="i32",
        stride_wn="i32",
        stride_wh="i32",
        stride_ob=I32_16,
        stride_on=I32_16,
        stride_oh=I32_16,
    ),
}
# Policy attention: q, k, v (B, N, heads, 64) views of the qkv projection, policy (B, N).
_POLICY_QKV_STRIDES = {f"stride_{t}{d}": I32_16 for t in "qkv" for d in "bnh"}
SIGNATURES.update(
    {
        "_policy_attention_fwd_kernel": dict(
            q_ptr=ACT,
            k_ptr=ACT,
            v_ptr=ACT,
            policy_ptr=ACT,
            vsum_ptr="*fp32",
            out_ptr=ACT,
            out_fp32_ptr="*fp32",
            row_max_ptr="*fp32",
            row_argmax_ptr="*i32",
            denom_ptr="*fp32",
            N="i32",
            seqlen_bucket="i32",
            num_heads="i32",
            qk_scale="fp32",
            eps="fp32",
            **_POLICY_QKV_STRIDES,
            stride_ob=I32_16,
            stride_on=I32_16,
            stride_oh=I32_16,
            stride_pb="i32",
            stride_pn=1,
        ),
        "_policy_attention_bwd_preprocess_kernel": dict(
            out_ptr="*fp32",
            dout_ptr=ACT,
            vsum_ptr="*fp32",
            denom_ptr="*fp32",
            delta_ptr="*fp32",
            dmax_ptr="*fp32",
            N="i32",
            num_heads="i32",
            eps="fp32",
            stride_ob=I32_16,
            stride_on=I32_16,
            stride_oh=I32_16,
            stride_db=I32_16,
            stride_dn=I32_16,
            stride_dh=I32_16,
        ),
    }
)
# The backward kernels of both: the policy's launch; varlen's passes None for the policy's
# tensors and None for cu_seqlens under a policy (BACKWARD_CASES).
_BACKWARD = dict(
    q_ptr=ACT,
    k_ptr=ACT,
    v_ptr=ACT,
    dout_ptr=ACT,
    cu_seqlens_ptr="*i32",
    row_stat_ptr="*fp32",
    delta_ptr="*fp32",
    policy_ptr=ACT,
    denom_ptr="*fp32",
    row_argmax_ptr="*i32",
    dmax_ptr="*fp32",
    num_tokens="i32",
    num_heads="i32",
    qk_scale="fp32",
    scale="fp32",
    seqlen_bucket="i32",
    **{f"stride_{t}{d}": I32_16 for t in "qkvd" for d in "bnh"},
    stride_pb="i32",
    stride_pn=1,
    stride_sb="i32",
    stride_sh="i32",
)
SIGNATURES.update(
    {
        "_attention_bwd_dkdv_kernel": dict(
            **_BACKWARD,
            dk_ptr=ACT,
            dv_ptr=ACT,
            dpolicy_ptr="*fp32",
            eps="fp32",
            **{f"stride_{t}{d}": I32_16 for t in ("dk", "dv") for d in "bnh"},
        ),
        "_attention_bwd_dq_kernel": dict(**_BACKWARD, dq_ptr=ACT, **{f"stride_dq{d}": I32_16 for d in "bnh"}),
    }
)
POLICY_ONLY = ("policy_ptr", "denom_ptr", "row_argmax_ptr", "dmax_ptr", "dpolicy_ptr")
BACKWARD_CASES = {"varlen": dict.fromkeys(POLICY_ONLY), "policy": dict(cu_seqlens_ptr=None)}
BACKWARD_KERNELS = ("_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel")
# What is compiled: a kernel, or a kernel with some of its tensors left out (a [case]).
AUTOTUNED = (
    "_varlen_attention_kernel",
    "_varlen_attention_kernel[statistics]",
    "_relpos_attention_kernel",
    "_policy_attention_fwd_kernel",
    *(f"{kernel}[{case}]" for kernel in BACKWARD_KERNELS for case in BACKWARD_CASES),
)
# Kernels whose tl.dot decides between tensor cores and FMA.
DOT_KERNELS = {"_router_hidden_kernel", "_router_head_kernel", *AUTOTUNED}


def head_tiles(head_dim):
    from mematte_kernels.triton._common import head_block

    return {"HEAD_DIM": head_dim, "BLOCK_D": head_block(head_dim)}


def tuned(name, kernel, direction, torch_dtype, **constexprs):
    """A variant per config of an autotuned kernel's list for ``torch_dtype``."""
    import torch

    from mematte_kernels.triton._attention import CONFIGS

    configs = CONFIGS[direction]["fp32" if torch_dtype == torch.float32 else "tensor_core"]
    assert all(config in kernel.configs for config in configs)
    return [
        (name, kernel.fn, {**config.kwargs, **constexprs}, config.num_warps, config.num_stages, rank)
        for rank, config in enumerate(configs)
    ]


def attention_variants(torch_dtype, head_dim):
    """Every config of the attention kernels at ``head_dim``: (name, kernel, constexprs,
    num_warps, num_stages, rank in the config list); a tensor left out is a None constexpr."""
    import torch

    # The package exports functions of these modules' names.
    pa = importlib.import_module("mematte_kernels.triton.policy_attention")
    relpos = importlib.import_module("mematte_kernels.triton.relpos_attention")
    va = importlib.import_module("mematte_kernels.triton.varlen_attention")
    backward = importlib.import_module("mematte_kernels.triton.attention_backward")

    tiles = head_tiles(head_dim)
    name = "_varlen_attention_kernel"
    forward, statistics = dict(lse_ptr=None, STATS_ONLY=False), dict(out_ptr=None, STATS_ONLY=True)
    variants = tuned(name, va._varlen_attention_kernel, "forward", torch_dtype, **forward, **tiles)
    variants += tuned(f"{name}[statistics]", va._varlen_attention_kernel, "forward", torch_dtype, **statistics, **tiles)
    variants += tuned("_relpos_attention_kernel", relpos._relpos_attention_kernel, "forward", torch_dtype, **tiles)
    # The forward also writes its output in fp32 for fp16/bf16 inputs.
    fp32_copy = {"out_fp32_ptr": None} if torch_dtype == torch.float32 else {}
    variants += tuned(
        "_policy_attention_fwd_kernel", pa._policy_attention_fwd_kernel, "forward", torch_dtype, **fp32_copy, **tiles
    )
    variants.append(
        (
            "_policy_attention_bwd_preprocess_kernel",
            pa._policy_attention_bwd_preprocess_kernel,
            {**tiles, "BLOCK_M": pa.PREPROCESS_BLOCK_M},
            4,
            3,
            None,
        )
    )
    for kernel_name in BACKWARD_KERNELS:
        kernel = getattr(backward, kernel_name)
        for case, left_out in BACKWARD_CASES.items():
            left_out = {arg: None for arg in left_out if arg in kernel.arg_names}
            variants += tuned(f"{kernel_name}[{case}]", kernel, "backward", torch_dtype, **left_out, **tiles)
    return variants


def launch_variants(dtype):
    """(name, kernel, constexprs, num_warps, num_stages, rank) for every config the wrappers
    launch on ``dtype`` inputs of MEMatte's widths and the head dims of HEAD_DIMS. Runs in the
    compiling subprocess."""
    import torch

    from mematte_kernels.triton import gather_scatter, router

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]

    def split(tile):
        return {k: v for k, v in tile.items() if k != "num_warps"}, tile["num_warps"]

    hidden, hidden_warps = split(router.hidden_tile(torch_dtype))
    fold, fold_warps = split(router.FOLD_TILE)
    head, head_warps = split(router.HEAD_TILE)

    def fixed(kernel, constexprs, num_warps):
        return (kernel.__name__, kernel, constexprs, num_warps, 3, None)

    variants = [
        fixed(router._router_hidden_kernel, hidden, hidden_warps),
        fixed(router._router_fold_kernel, fold, fold_warps),
    ]
    for C in WIDTHS:
        variants.append(fixed(router._router_head_kernel, {**head, "QUARTER_PAD": router.quarter_pad(C)}, head_warps))
        rows, rows_warps = split(gather_scatter._row_tile(C))
        variants += [
            fixed(gather_scatter._gather_layernorm_kernel, rows, rows_warps),
            fixed(gather_scatter._scatter_residual_kernel, rows, rows_warps),
        ]
    for head_dim in HEAD_DIMS:
        variants += attention_variants(torch_dtype, head_dim)
    return variants


def ast_source(kernel, dtype, constexprs):
    import triton

    runtime_args = SIGNATURES[kernel.__name__]
    assert set(runtime_args) | set(constexprs) == set(kernel.arg_names), f"{kernel.__name__}: signature out of date"
    signature, constants, attrs = {}, dict(constexprs), {}
    for position, name in enumerate(kernel.arg_names):
        kind = runtime_args.get(name)
        if name in constexprs or kind is None or isinstance(kind, int):
            signature[name] = "constexpr"
            constants.setdefault(name, kind)
        else:
            signature[name] = f"*{dtype}" if kind == ACT else kind.removesuffix("/16")
            # Pointers: torch allocations (and MEMatte's q/k/v views) are 16-byte aligned.
            if kind == I32_16 or signature[name].startswith("*"):
                attrs[(position,)] = [["tt.divisibility", 16]]
    return triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)


def shared_memory_estimate(constexprs, num_stages):
    """Orders an autotuned kernel's configs smallest first: the pipelined key/value tiles."""
    return constexprs.get("BLOCK_M", 0) + constexprs.get("BLOCK_N", 0) * num_stages


def compile_plan() -> list[tuple[str, list[int], int, bool]]:
    """Units of work: (dtype, indices into launch_variants(dtype), arch, stop at the first
    config that fits)."""
    plan = []
    for dtype in DTYPES:
        groups = {}
        for index, (name, _, constexprs, _, num_stages, rank) in enumerate(launch_variants(dtype)):
            autotuned = rank is not None
            for arch, dtypes in ARCH_DTYPES.items():
                if dtype not in dtypes:
                    continue
                if not autotuned or (arch in SWEEP_ARCHS and constexprs["HEAD_DIM"] == SWEEP_HEAD_DIM):
                    plan.append((dtype, [index], arch, False))
                else:
                    key = (name, constexprs["HEAD_DIM"], arch)
                    groups.setdefault(key, []).append((shared_memory_estimate(constexprs, num_stages), index))
        plan += [(dtype, [index for _, index in sorted(group)], arch, True) for (*_, arch), group in groups.items()]
    return plan


@functools.cache
def cached_variants(dtype):
    return launch_variants(dtype)


def compile_unit(unit) -> list[dict]:
    """Compile a unit's variants in order for its arch; one record each."""
    import triton
    from triton.backends.compiler import GPUTarget

    dtype, indices, arch, first_fit = unit
    records = []
    for index in indices:
        name, kernel, constexprs, num_warps, num_stages, rank = cached_variants(dtype)[index]
        compiled = triton.compile(
            ast_source(kernel, dtype, constexprs),
            target=GPUTarget("cuda", arch, 32),
            options=dict(num_warps=num_warps, num_stages=num_stages),
        )
        records.append(
            dict(
                kernel=name,
                dtype=dtype,
                arch=arch,
                shared=compiled.metadata.shared,
                head_dim=constexprs.get("HEAD_DIM"),
                autotuned=rank is not None,
                rank=rank,
                config=f"{constexprs} warps={num_warps} stages={num_stages}",
                mma="mma" in compiled.asm["ptx"],
                # Read where the spill test looks: the sweep's first configs.
                local_bytes=local_memory(compiled.asm["cubin"]) if rank == 0 and arch in SWEEP_ARCHS else None,
            )
        )
        if first_fit and compiled.metadata.shared <= SHARED_MEMORY_LIMIT[arch]:
            break
    return records


def local_memory(cubin: bytes) -> int:
    """Bytes of per-thread local memory (the stack ptxas spills registers to) of a kernel, as
    cuobjdump reports its resource usage."""
    import re
    import tempfile

    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        usage = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "--dump-resource-usage", file.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    return int(re.search(r"STACK:(\d+)", usage).group(1))


def compile_all() -> list[dict]:
    """Compile the plan's units, one process per core this process may use (at most 4: each
    holds torch and Triton)."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=min(len(os.sched_getaffinity(0)), 4)) as pool:
        return [record for records in pool.map(compile_unit, compile_plan()) for record in records]


def _find_ptxas() -> str | None:
    """Triton's own choice (TRITON_PTXAS_PATH, else the one it ships), else a CUDA toolkit's."""
    from triton import knobs

    try:
        return knobs.nvidia.ptxas.path
    except RuntimeError:
        for path in ("/usr/local/cuda/bin/ptxas", shutil.which("ptxas")):
            if path and os.access(path, os.X_OK):
                return path
        return None


@pytest.fixture(scope="module")
def compiled():
    ptxas = _find_ptxas()
    if ptxas is None:
        pytest.skip("no ptxas: neither Triton's bundled one nor a CUDA toolkit's")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_PTXAS_PATH=ptxas, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"AOT compilation failed:\n{result.stderr[-6000:]}"
    return json.loads(result.stdout)


def test_every_config_compiles(compiled):
    # Per dtype and target: router 2 + 2 head widths, gather/scatter 2 per width and policy
    # attention's preprocess per head dim; on the sweep's targets at its head dim, every
    # config of the autotuned kernels: four forwards (varlen, its statistics pass, relpos,
    # policy) and the two backward kernels for varlen and for policy attention.
    from mematte_kernels.triton._attention import CONFIGS

    def autotuned_count(dtype):
        kind = "fp32" if dtype == "fp32" else "tensor_core"
        return 4 * len(CONFIGS["forward"][kind]) + 4 * len(CONFIGS["backward"][kind])

    swept = [
        r for r in compiled if not r["autotuned"] or (r["arch"] in SWEEP_ARCHS and r["head_dim"] == SWEEP_HEAD_DIM)
    ]
    expected = sum(
        2 + 3 * len(WIDTHS) + len(HEAD_DIMS) + (autotuned_count(dtype) if arch in SWEEP_ARCHS else 0)
        for arch, dtypes in ARCH_DTYPES.items()
        for dtype in dtypes
    )
    assert len(swept) == expected
    assert len({(r["kernel"], r["dtype"], r["arch"], r["config"]) for r in swept}) == expected
    assert {(r["arch"], r["dtype"]) for r in compiled} == {(a, d) for a, ds in ARCH_DTYPES.items() for d in ds}


@pytest.mark.parametrize("arch", [pytest.param(arch, id=f"sm{arch}") for arch in SHARED_MEMORY_LIMIT])
def test_fixed_configs_fit_shared_memory(compiled, arch):
    over = [r for r in compiled if r["arch"] == arch and not r["autotuned"] and r["shared"] > SHARED_MEMORY_LIMIT[arch]]
    assert not over, f"over {SHARED_MEMORY_LIMIT[arch]} bytes of shared memory: {over}"


@pytest.mark.parametrize("arch", [pytest.param(arch, id=f"sm{arch}") for arch in SHARED_MEMORY_LIMIT])
def test_every_autotuned_kernel_has_a_config_that_fits(compiled, arch):
    lists = {}
    for r in compiled:
        if r["arch"] == arch and r["autotuned"]:
            lists.setdefault((r["kernel"], r["dtype"], r["head_dim"]), []).append(r["shared"])
    assert set(lists) == {
        (kernel, dtype, head_dim) for kernel in AUTOTUNED for dtype in ARCH_DTYPES[arch] for head_dim in HEAD_DIMS
    }
    none_fit = {key: shared for key, shared in lists.items() if min(shared) > SHARED_MEMORY_LIMIT[arch]}
    assert not none_fit, f"no config within {SHARED_MEMORY_LIMIT[arch]} bytes of shared memory: {none_fit}"


@pytest.mark.parametrize("arch", [pytest.param(arch, id=f"sm{arch}") for arch in SWEEP_ARCHS])
def test_first_configs_keep_their_tiles_in_registers(compiled, arch):
    # At MEMatte's head dim, the first config of every autotuned kernel (the one
    # MEMATTE_TRITON_AUTOTUNE=0 runs) keeps its tiles in registers. A spilled tile costs
    # hundreds of bytes of local memory per thread; ptxas parks a scalar or two there in
    # some configs (4 bytes in _attention_bwd_dkdv_kernel[varlen] fp32 on sm_80), which costs
    # nothing.
    first = [r for r in compiled if r["arch"] == arch and r["rank"] == 0 and r["head_dim"] == SWEEP_HEAD_DIM]
    assert {(r["kernel"], r["dtype"]) for r in first} == {(k, d) for k in AUTOTUNED for d in ARCH_DTYPES[arch]}
    spilled = {(r["kernel"], r["dtype"]): r["local_bytes"] for r in first if r["local_bytes"] > SCALAR_SPILL_BYTES}
    assert not spilled, f"first configs spill (bytes of local memory per thread): {spilled}"


def test_dots_take_the_intended_path(compiled):
    for record in compiled:
        if record["kernel"] in DOT_KERNELS:
            tensor_cores = record["dtype"] != "fp32" and record["arch"] >= 80
            assert record["mma"] == tensor_cores, record


if __name__ == "__main__":
    json.dump(compile_all(), sys.stdout)
