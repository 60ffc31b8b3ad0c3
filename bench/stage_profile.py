"""Where one FastMEMatte forward spends its time on this CPU, stage by stage:

    python -m bench.profile --size 3840x2160 --dtype bfloat16 [--variant vit_b] [--backend cpu] [--json out.json]

The model and input are the benchmarks' (:mod:`harness`: seeded synthetic weights, routers
calibrated to route 25 % of the tokens, the token cap of the default model), so the
profile is of the forward ``pytest bench`` times. After a warm-up forward at 256², one
forward at the requested size runs with a clock around

- every op of the op table the model resolves (``dispatch.resolve`` is wrapped for the
  duration, so each table entry is timed with whatever implementation the backend chose,
  or measured fastest on this CPU in the warm-up); a ``conv2d`` goes to the ResBottleneck
  or decoder stage by its weight;
- the calls the model makes to torch outside the table: ``conv2d`` (the upstream decoder
  the reference backend runs) and ``layer_norm``, seen through a ``TorchFunctionMode``.

Time goes to the outermost timed call only: the torch calls inside a table op are part of
that op. What no clock saw (input checks, preprocessing, padding, the position-embedding
resize, residual adds, activations outside the table, tiling) is "other", so the stages
sum to the forward's wall time. The clocks' own cost lands in "other" too.

FLOP: a linear layer 2·M·K·N; a convolution 2·Cout·(Cin/groups)·kh·kw·Hout·Wout·B;
attention 4·n²·d·heads per sequence (window attention: per window, padded windows
included); ``upsample_conv_relu_`` as the 3×3 convolution it stands for on the upsampled
map; the router as its four linear layers on every token. The floor is the total FLOP at
the best GEMM rate this CPU reaches (measured in the requested dtype and in fp32).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import tempfile
import time
from collections import defaultdict
from dataclasses import fields, replace
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from mematte.backbone import VARIANTS, ResBottleneck
from mematte.decoder import FusionBlock
from mematte.io import write_atomic
from mematte.model import DEFAULT_MAX_TOKENS
from mematte_kernels import dispatch

import harness
import report
from worker import load_model

ATTENTION = "routed global attention"
WINDOW = "window attention"
ROUTER = "router scoring"
TOKENS = "token gather/scatter, index, cap"
GEMM = "GEMMs (qkv, proj, MLP, LTRM fc1/fc2)"
LTRM = "LTRM dwconv+GELU, ECA"
RESIDUAL = "ResBottleneck convs"
PATCH = "patch embedding"
FUSION = "decoder fusion upsample-conv"
DECODER = "decoder small-channel convs"
NORM = "LayerNorms"
OTHER = "other"
STAGES = (ATTENTION, WINDOW, ROUTER, TOKENS, GEMM, LTRM, RESIDUAL, PATCH, FUSION, DECODER, NORM, OTHER)
NOTES = {
    ATTENTION: "varlen_attention",
    TOKENS: "token_index, cap_tokens, gather_layernorm, scatter_residual_",
    GEMM: "linear, linear_gelu",
    FUSION: "upsample_conv_relu_ (reference: the fusion blocks' conv)",
    DECODER: "ConvStream, detail and head convs",
    NORM: "block norms, channels_first_layer_norm",
    OTHER: "checks, preprocessing, padding, pos-embed resize, adds, activations, tiling",
}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
WARMUP = harness.Size(256, 256)


# ------------------------------------------------------------------------------ FLOP


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _linear_flop(x, weight, bias=None) -> int:
    return 2 * _rows(x) * weight.numel()


def _router_flop(x, norm_weight, norm_bias, in_weight, in_bias, w0, b0, w1, b1, w2, b2, eps=None) -> int:
    return 2 * _rows(x) * (in_weight.numel() + w0.numel() + w1.numel() + w2.numel())


def _varlen_flop(q, k, v, cu_seqlens, max_seqlen, scale=None) -> int:
    bounds = cu_seqlens.tolist()
    heads, d = q.shape[1:]
    return sum(4 * (end - start) ** 2 * d * heads for start, end in zip(bounds[:-1], bounds[1:]))


def _policy_flop(q, k, v, policy, scale=None, eps=None) -> int:
    B, N, heads, d = q.shape
    return B * 4 * N * N * d * heads


def _window_flop(qkv, pad_qkv, rel_h, rel_w, num_heads, scale, window) -> int:
    B, H, W, C3 = qkv.shape
    windows = B * math.ceil(H / window) * math.ceil(W / window)
    return windows * 4 * (window * window) ** 2 * (C3 // 3)


def _global_flop(qkv, rel_h, rel_w, num_heads, scale) -> int:
    B, H, W, C3 = qkv.shape
    return B * 4 * (H * W) ** 2 * (C3 // 3)


def _dwconv_flop(x, weight, bias) -> int:
    return 2 * weight.numel() * _rows(x)  # weight (C, 1, k, k): per output pixel C·k·k taps


def _eca_flop(z, weight, residual=None) -> int:
    B, _, _, C = z.shape
    return 2 * weight.numel() * C * B  # the Conv1d over the pooled channels


def _upsample_conv_flop(out, x, weight) -> int:
    B, _, H, W = out.shape
    return 2 * weight.numel() * B * H * W


def _patch_embed_flop(x, weight, bias) -> int:
    B, _, H, W = x.shape
    p = weight.shape[-1]
    return 2 * weight.numel() * B * (H // p) * (W // p)


def _conv2d_flop(out: torch.Tensor, weight: torch.Tensor) -> int:
    B, _, H, W = out.shape
    return 2 * weight.numel() * B * H * W


# Each op-table field: its stage, and its FLOP from the call's arguments (None: memory-bound).
OP_STAGES = {
    "router_scores": (ROUTER, _router_flop),
    "cap_tokens": (TOKENS, None),
    "token_index": (TOKENS, None),
    "gather_layernorm": (TOKENS, None),
    "scatter_residual_": (TOKENS, None),
    "varlen_attention": (ATTENTION, _varlen_flop),
    "policy_attention": (ATTENTION, _policy_flop),
    "global_attention": (ATTENTION, _global_flop),
    "window_attention": (WINDOW, _window_flop),
    "dwconv_gelu": (LTRM, _dwconv_flop),
    "eca": (LTRM, _eca_flop),
    "channels_first_layer_norm": (NORM, None),
    "upsample_conv_relu_": (FUSION, _upsample_conv_flop),
    "patch_embed": (PATCH, _patch_embed_flop),
    "linear": (GEMM, _linear_flop),
    "linear_gelu": (GEMM, _linear_flop),
    # The stage of a conv2d call follows from its weight (see timed_table).
    "conv2d": (DECODER, lambda x, weight, *rest: _conv2d_flop(_conv_out(x, weight, *rest), weight)),
}


def _conv_out(x, weight, bias=None, stride=1, padding=0) -> torch.Tensor:
    """A meta tensor of the conv's output shape, for its FLOP count."""
    B, _, H, W = x.shape
    kh, kw = weight.shape[-2:]
    return torch.empty(
        (B, weight.shape[0], (H + 2 * padding - kh) // stride + 1, (W + 2 * padding - kw) // stride + 1), device="meta"
    )


# ----------------------------------------------------------------------------- clocks


class StageClock:
    """Seconds, FLOP and calls per stage. Only the outermost timed call runs a clock: a call
    made while another is timed is part of that one, so nothing is counted twice."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.flop: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self.busy = False

    def call(self, stage: str, fn, args: tuple, kwargs: dict, flop=None):
        if self.busy:
            return fn(*args, **kwargs)
        self.busy = True
        start = time.perf_counter()
        try:
            out = fn(*args, **kwargs)
        finally:
            self.seconds[stage] += time.perf_counter() - start
            self.busy = False
        self.calls[stage] += 1
        if flop is not None:
            self.flop[stage] += flop(args, kwargs, out)
        return out


class TimedOp:
    """An op-table entry with a clock around it."""

    def __init__(self, clock: StageClock, stage, op, flop):
        self.clock, self.stage, self.op = clock, stage, op
        self.flop = None if flop is None else (lambda args, kwargs, out: flop(*args, **kwargs))

    def __call__(self, *args, **kwargs):
        stage = self.stage(args) if callable(self.stage) else self.stage
        return self.clock.call(stage, self.op, args, kwargs, self.flop)

    def __repr__(self) -> str:
        return f"TimedOp({self.stage!r}, {implementation(self.op)})"


def timed_table(
    table: dispatch.OpTable, clock: StageClock, conv_stages: dict[int, str] | None = None
) -> dispatch.OpTable:
    """``table`` with every op timed (an op no stage names is its own stage); a conv2d in
    the stage ``conv_stages`` gives its weight, the decoder's by default."""
    conv_stages = conv_stages or {}
    ops = {}
    for field in fields(table):
        op = getattr(table, field.name)
        if field.name == "name":
            continue
        op = op.op if isinstance(op, TimedOp) else op
        stage, flop = OP_STAGES.get(field.name, (field.name, None))
        if field.name == "conv2d":
            stage = lambda args, default=stage: conv_stages.get(id(args[1]), default)  # noqa: E731
        ops[field.name] = TimedOp(clock, stage, op, flop)
    return replace(table, **ops)


class TorchCalls(TorchFunctionMode):
    """Times the model's own ``conv2d`` and ``layer_norm`` calls (those outside the op
    table); ``conv_stages`` maps a conv weight's id to its stage, the decoder's by default."""

    def __init__(self, clock: StageClock, conv_stages: dict[int, str]):
        super().__init__()
        self.clock, self.conv_stages = clock, conv_stages

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.clock.busy:
            return func(*args, **kwargs)
        if func is torch.conv2d:
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            stage = self.conv_stages.get(id(weight), DECODER)
            return self.clock.call(stage, func, args, kwargs, lambda a, k, out: _conv2d_flop(out, weight))
        if func is F.layer_norm or func is torch.layer_norm:
            return self.clock.call(NORM, func, args, kwargs)
        return func(*args, **kwargs)


def conv_stages(model: torch.nn.Module) -> dict[int, str]:
    """The stage of each convolution weight the model calls torch with directly."""
    stages = {}
    for module in model.modules():
        stage = RESIDUAL if isinstance(module, ResBottleneck) else FUSION if isinstance(module, FusionBlock) else None
        if stage:
            stages.update({id(m.weight): stage for m in module.modules() if isinstance(m, torch.nn.Conv2d)})
    return stages


@contextlib.contextmanager
def instrumented(model: torch.nn.Module, clock: StageClock):
    """While open, the op tables the model resolves are timed on ``clock``, and so are its
    own conv2d and layer_norm calls."""
    resolve = dispatch.resolve
    stages = conv_stages(model)
    # The model runs the upstream decoder when handed the reference table itself.
    reference = timed_table(dispatch.REFERENCE, clock, stages)

    def timed_resolve(*args, **kwargs):
        table = resolve(*args, **kwargs)
        return table if table is reference else timed_table(table, clock, stages)

    with (
        mock.patch.object(dispatch, "resolve", timed_resolve),
        mock.patch.object(dispatch, "REFERENCE", reference),
        TorchCalls(clock, stages),
    ):
        yield


def implementation(op) -> str:
    """The qualified name of a function, or the repr of a callable object."""
    if inspect.isfunction(op) or inspect.isbuiltin(op) or inspect.ismethod(op):
        return f"{op.__module__}.{op.__qualname__}"
    return repr(op)


# ------------------------------------------------------------------------ GEMM ceiling


def gemm_rate(dtype: torch.dtype, budget_s: float, linear, k: int = 1536, n: int = 1536, max_m: int = 8192) -> dict:
    """The best rate of an (M, k) x (k, n) product in ``dtype``, by ``torch.mm`` or by the op
    table's ``linear`` (which may reach other kernels: oneDNN's bf16 GEMM runs where
    torch.mm's does not): both probed on 64 rows, then the faster one with M up to ``max_m``
    rows, as many as let one product take about a fifth of ``budget_s``, best of at least
    three runs."""
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(n, k, generator=g).to(dtype), torch.zeros(n, dtype=dtype)
    candidates = {
        "torch.mm": lambda a: torch.mm(a, weight.T),
        implementation(linear): lambda a: linear(a, weight, bias),
    }

    def once(product, m: int) -> float:
        a = torch.randn(m, k, generator=g).to(dtype)
        start = time.perf_counter()
        product(a)
        return time.perf_counter() - start

    probe = 64
    probes = {}
    for name, product in candidates.items():
        once(product, probe)
        probes[name] = once(product, probe)
    name = min(probes, key=probes.get)
    m = max(probe, min(max_m, int(budget_s / 5 / max(probes[name], 1e-9) * probe) // 64 * 64))
    runs, best, spent = 0, math.inf, 0.0
    while runs < 3 or (spent < budget_s and runs < 10):
        seconds = once(candidates[name], m)
        best, spent, runs = min(best, seconds), spent + seconds, runs + 1
    return {"dtype": str(dtype).removeprefix("torch."), "implementation": name, "shape": [m, k, n], "runs": runs,
            "gflops": 2 * m * k * n / best / 1e9}  # fmt: skip


# ---------------------------------------------------------------------------- profile


def profile(
    size: harness.Size,
    dtype: torch.dtype = torch.bfloat16,
    variant: str = "vit_s",
    backend: str = "auto",
    warmup: harness.Size | None = WARMUP,
    gemm_budget_s: float = 1.5,
) -> dict:
    """Profile one forward of the benchmarks' FastMEMatte at ``size``: the stage table, the
    machine, the implementations and the floor (see the module's docstring)."""
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="mematte-profile-") as directory:
        data = harness.BenchData(Path(directory), device)
        weights = data.weights_path(variant, size, harness.ROUTED_FRACTION)
        model = load_model(weights, device, dtype, backend, DEFAULT_MAX_TOKENS)
        image, trimap = data.inputs(size)
    with torch.inference_mode():
        if warmup is not None:
            warm_image, warm_trimap = harness.bench_inputs(warmup)
            model({"image": warm_image, "trimap": warm_trimap})
        clock = StageClock()
        with instrumented(model, clock):
            start = time.perf_counter()
            _, _, decisions = model({"image": image, "trimap": trimap})
            wall = time.perf_counter() - start
    table = dispatch.resolve(backend, device)

    timed = sum(clock.seconds.values())
    stages = []
    for stage in STAGES + tuple(s for s in clock.seconds if s not in STAGES):
        seconds = wall - timed if stage == OTHER else clock.seconds.get(stage, 0.0)
        flop = clock.flop.get(stage, 0)
        stages.append({
            "stage": stage, "note": NOTES.get(stage, ""), "seconds": seconds, "share": 100 * seconds / wall,
            "flop": flop, "gflop": flop / 1e9, "gflops": flop / seconds / 1e9 if flop and seconds > 0 else None,
            "calls": None if stage == OTHER else clock.calls.get(stage, 0),
        })  # fmt: skip
    total_flop = sum(clock.flop.values())

    ceilings = [gemm_rate(dtype, gemm_budget_s / 2, table.linear)]
    if dtype != torch.float32:
        ceilings.append(gemm_rate(torch.float32, gemm_budget_s / 2, table.linear))
    best = max(ceilings, key=lambda c: c["gflops"])
    flags = report.cpu_flags()
    C, heads = VARIANTS[variant]
    return {
        "machine": {
            "cpu": report.cpu_model(),
            "isa": {flag: flag in flags for flag in ISA_FLAGS},
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "model": {
            "variant": variant,
            "embed_dim": C,
            "heads": heads,
            "size": size.id,
            "dtype": str(dtype).removeprefix("torch."),
            "backend": table.name,
            "asked_backend": backend,
            "grid": list(size.grid),
            "tokens": size.tokens,
            "max_tokens": DEFAULT_MAX_TOKENS,
            "routed_tokens": [int(d.sum()) for d in decisions],
        },  # fmt: skip
        "implementations": {f.name: implementation(getattr(table, f.name)) for f in fields(table) if f.name != "name"},
        "stages": stages,
        "total": {"seconds": wall, "flop": total_flop, "gflop": total_flop / 1e9, "gflops": total_flop / wall / 1e9},
        "gemm_ceilings": ceilings,
        "floor": {"seconds": total_flop / 1e9 / best["gflops"], "gflops": best["gflops"], "dtype": best["dtype"]},
    }


def format_profile(result: dict) -> str:
    """The profile as text: machine, model, implementations, the stage table and the floor."""
    machine, model, total, floor = result["machine"], result["model"], result["total"], result["floor"]
    isa = ", ".join(f"{flag} {'yes' if has else 'no'}" for flag, has in machine["isa"].items())
    lines = [
        f"CPU: {machine['cpu']} ({isa})",
        f"torch {machine['torch']}, {machine['threads']} threads",
        f"FastMEMatte {model['variant']} {model['size']} {model['dtype']}, backend {model['backend']!r} "
        f"(asked {model['asked_backend']!r}); {model['tokens']} tokens, routed per router: "
        f"{', '.join(map(str, model['routed_tokens']))} (cap {model['max_tokens']})",
        "",
        "op implementations:",
        *(f"  {name:<26} {impl}" for name, impl in result["implementations"].items()),
        "",
    ]
    width = max(len(s["stage"]) for s in result["stages"])
    header = f"{'stage':<{width}}  {'time (s)':>9}  {'share':>7}  {'GFLOP':>9}  {'GFLOP/s':>8}  {'calls':>6}  note"
    lines += [header, "-" * len(header)]
    for s in result["stages"]:
        rate = f"{s['gflops']:8.1f}" if s["gflops"] is not None else f"{'-':>8}"
        gflop = f"{s['gflop']:9.2f}" if s["gflop"] else f"{'-':>9}"
        lines.append(f"{s['stage']:<{width}}  {s['seconds']:9.3f}  {s['share']:6.1f}%  {gflop}  {rate}  "
                     f"{'-' if s['calls'] is None else s['calls']:>6}  {s['note']}")  # fmt: skip
    lines += [
        "-" * len(header),
        f"{'total':<{width}}  {total['seconds']:9.3f}  {100:6.1f}%  {total['gflop']:9.2f}  {total['gflops']:8.1f}",
        f"{'floor':<{width}}  {floor['seconds']:9.3f}  (total FLOP at {floor['gflops']:.1f} GFLOP/s, the best "
        f"{floor['dtype']} GEMM rate; the forward takes {total['seconds'] / floor['seconds']:.1f}x the floor)",
        "GEMM ceilings (best of runs): " + "; ".join(
            f"{c['dtype']} {c['gflops']:.1f} GFLOP/s ({c['implementation']}, {'x'.join(map(str, c['shape']))}, "
            f"{c['runs']} runs)"
            for c in result["gemm_ceilings"]
        ),
    ]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile",
        description="Time one FastMEMatte forward on this CPU per stage (time, share, FLOP, GFLOP/s) "
        "and compare the total with the floor the CPU's best GEMM rate allows.",
    )
    parser.add_argument(
        "--size",
        type=harness.Size.parse,
        default=harness.Size(3840, 2160),
        help="W x H, e.g. 3840x2160, or one number for a square (default 3840x2160)",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="compute dtype (default bfloat16)")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="vit_s", help="default vit_s")
    parser.add_argument(
        "--backend",
        choices=dispatch.BACKENDS,
        default="auto",
        help=f"op table (default auto; {dispatch.ENV_VAR} overrides, as for the model)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the profile to PATH as JSON")
    args = parser.parse_args(argv)
    result = profile(args.size, DTYPES[args.dtype], args.variant, args.backend)
    print(format_profile(result))
    if args.json:
        text = (json.dumps(result, indent=2) + "\n").encode()
        write_atomic(args.json, lambda f: f.write(text))
    return result
