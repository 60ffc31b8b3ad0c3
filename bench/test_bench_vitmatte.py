"""FastViTMatte, image + trimap -> alpha, one image: the fast path (backend "auto") in each
precision against the published computation (reference backend, fp32), at 1024², 2048² and
3840x2160; and ViTMatte's global attention op alone (every token of the grid attends to all
of them with decomposed relative position), fast against reference, at the same grids.

Time and peak memory come from the same run: on CPU, cases from 2048² on run once in a fresh
process that reports both (its peak RSS) and the alpha; smaller ones are timed in process and
measured for memory in a fresh process. Fast cases are checked against the fp32 reference's
alpha of their size where it ran. Cases whose estimated
peak does not fit the memory available now are skipped (the reference at 2048² needs ~20 GB
and at 3840x2160 ~80 GB: its global blocks build N×N logits).

    pytest bench/test_bench_vitmatte.py                       1024², 2048², 3840x2160
    pytest bench/test_bench_vitmatte.py --bench-sizes 3840x2160
    pytest bench/test_bench_vitmatte.py --benchmark-disable   smoke: 256² (ops 512²), checked
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import pytest
import torch

from mematte import FastViTMatte
from mematte.backbone import VARIANTS, rel_pos_table
from mematte_kernels import dispatch, reference

import harness

WEIGHTS_SEED = harness.WEIGHTS_SEED
DEFAULT_SIZES = (harness.Size(1024, 1024), harness.Size(2048, 2048), harness.Size(3840, 2160))


@dataclass(frozen=True)
class ViTMatteCase:
    variant: str
    size: harness.Size
    dtype: torch.dtype
    impl: str  # "fast" | "reference"
    model: str = "vitmatte"  # what the worker builds
    max_tokens: None = None

    @property
    def backend(self) -> str:
        return "reference" if self.impl == "reference" else "auto"

    @property
    def group(self) -> str:
        return f"vitmatte {self.variant} {self.size.id}"

    @property
    def id(self) -> str:
        return f"vitmatte-{self.variant}-{self.size.id}-{harness.DTYPE_NAMES[self.dtype]}-{self.impl}"


def model_sizes(settings) -> tuple[harness.Size, ...]:
    return settings.sizes or ((harness.Size(256, 256),) if settings.smoke else DEFAULT_SIZES)


def op_sizes(settings) -> tuple[harness.Size, ...]:
    return settings.sizes or ((harness.Size(512, 512),) if settings.smoke else DEFAULT_SIZES)


def model_cases(settings) -> list[ViTMatteCase]:
    cases = []
    for variant in settings.variants:
        for size in model_sizes(settings):
            cases.append(ViTMatteCase(variant, size, torch.float32, "reference"))
            cases += [ViTMatteCase(variant, size, dtype, "fast") for dtype in settings.dtypes]
    return cases


def op_cases(settings) -> list[ViTMatteCase]:
    return [
        ViTMatteCase(variant, size, dtype, impl)
        for variant in settings.variants
        for size in op_sizes(settings)
        for dtype in settings.dtypes
        for impl in ("reference", "fast")
    ]


def pytest_generate_tests(metafunc):
    settings = metafunc.config.stash[harness.SETTINGS]
    for name, make in (("vitmatte_case", model_cases), ("global_attention_case", op_cases)):
        if name in metafunc.fixturenames:
            cases = make(settings)
            metafunc.parametrize(name, cases, ids=[c.id for c in cases])


# --------------------------------------------------------------------------- memory


def quadratic_bytes(case: ViTMatteCase) -> int:
    """The reference's global attention at its peak: three (heads, N, N) copies (logits, the
    position terms, their sum; measured at 2048² on CPU: 20.7 GB peak RSS, 6.4 GB a copy)."""
    heads = VARIANTS[case.variant][1]
    return 3 * heads * case.size.tokens**2 * case.dtype.itemsize


def model_peak_bytes(case: ViTMatteCase) -> int:
    """An estimate of a forward's peak, to skip what cannot fit (see harness.model_peak_bytes):
    weights and token activations throughout, plus the largest of the stages' own
    temporaries: window logits, global attention (quadratic for the reference; per-query
    tables and one chunk for the fast path), full-resolution planes of the decoder."""
    C, heads = VARIANTS[case.variant]
    e = case.dtype.itemsize
    h, w = case.size.grid
    N = h * w
    params = sum(math.prod(s) for s in harness.synth.shapes(f"vitmatte_{case.variant}").values())
    attention = quadratic_bytes(case) if case.impl == "reference" else 2 * N * heads * (h + w) * e + (256 << 20)
    windows = -(-h // 14) * -(-w // 14)
    stage = max(3 * windows * heads * 196**2 * 4, attention, 24 * (16 * h) * (16 * w) * 4)
    return int(0.7e9 + params * (4 + e) + 16 * N * C * e + stage)


def unavailable(case: ViTMatteCase, device: torch.device, peak: int) -> str | None:
    if case.impl == "reference" and dispatch.requested_backend("reference") != "reference":
        return f"{dispatch.ENV_VAR} overrides the reference backend; unset it to compare"
    try:
        table = dispatch.resolve(case.backend, device)
    except Exception as e:
        return f"backend {case.backend!r} unavailable on {device.type}: {e}"
    if case.impl == "fast" and table.global_attention is reference.global_attention:
        return f"'auto' runs the reference global attention on {device.type}: no fast path to compare"
    return harness.fits(peak, device)


def weights_path(data, variant: str):
    path = data.directory / f"weights-vitmatte-{variant}.pt"
    if not path.exists():
        torch.save(harness.synth.weights(f"vitmatte_{variant}", seed=WEIGHTS_SEED), path)
    return path


def load(case: ViTMatteCase, data, device) -> FastViTMatte:
    return FastViTMatte.from_checkpoint(
        weights_path(data, case.variant), map_location=device, backend=case.backend, dtype=case.dtype
    )


# ---------------------------------------------------------------------------- model


def test_vitmatte(vitmatte_case, settings, data, record, request):
    case, device = vitmatte_case, settings.device
    reason = unavailable(case, device, model_peak_bytes(case))
    if reason:
        pytest.skip(reason)
    common = dict(
        kind="model", group=case.group, case=case.id, impl=case.impl, variant=case.variant, size=case.size.id,
        tokens=case.size.tokens, dtype=harness.DTYPE_NAMES[case.dtype], megapixels=case.size.pixels / 1e6,
    )  # fmt: skip
    if not settings.in_process(case.size):
        # One run in a fresh process gives the latency, the peak RSS and the alpha.
        alpha_path = data.directory / f"alpha-{case.id}.pt"
        result = _worker(case, data, alpha_path=alpha_path)
        alpha = torch.load(alpha_path)["alpha"]
        alpha_path.unlink()
        record(**common, backend=result["backend"], time_s=result["latency_s"], rounds=1,
               timer="one run in a fresh process", peak_mem_bytes=result["peak_rss_bytes"],
               loaded_rss_bytes=result["loaded_rss_bytes"], mem_kind="peak RSS of a fresh process",
               alpha_mean_abs_error=_against_reference(case, data, alpha))  # fmt: skip
        return

    model = load(case, data, device)
    image, trimap = data.inputs(case.size)
    forward = torch.inference_mode()(lambda: model({"image": image, "trimap": trimap}))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with harness.skip_on_oom():
        outputs, first_s = harness.run_once(forward, device)
    error = _against_reference(case, data, outputs["phas"].float().cpu())
    with harness.skip_on_oom():
        timing = harness.measure(request, settings, forward, first_s, target_s=6.0, rounds=(2, 5), group=case.group,
                                 extra={"impl": case.impl, "dtype": common["dtype"]})  # fmt: skip
    if device.type == "cuda":
        memory = {"peak_mem_bytes": torch.cuda.max_memory_allocated(device), "mem_kind": "CUDA max allocated"}
    else:
        result = _worker(case, data)
        memory = {"peak_mem_bytes": result["peak_rss_bytes"], "loaded_rss_bytes": result["loaded_rss_bytes"],
                  "mem_kind": "peak RSS of a fresh process"}  # fmt: skip
    record(**common, backend=dispatch.resolve(case.backend, device).name, time_s=timing.median_s,
           min_s=timing.min_s, mean_s=timing.mean_s, rounds=timing.rounds, timer=timing.timer, **memory,
           alpha_mean_abs_error=error)  # fmt: skip


def _against_reference(case, data, alpha: torch.Tensor) -> float | None:
    """A reference case's alpha kept for the fast cases of its size; a fast case's mean
    |alpha - reference fp32| (checked), where the reference ran in this session."""
    key = ("vitmatte", case.variant, case.size)
    if case.impl == "reference":
        data.reference_alpha[key] = alpha
        return None
    if key not in data.reference_alpha:
        return None
    error = float((alpha - data.reference_alpha[key]).abs().mean())
    tolerance = harness.ALPHA_ATOL[case.dtype]
    assert error <= tolerance, f"{case.id}: mean |alpha - reference fp32| = {error:.2e} > {tolerance:.0e}"
    return error


def _worker(case, data, alpha_path=None) -> dict:
    try:
        return harness.run_worker(
            case, weights_path(data, case.variant), data.inputs_path(case.size), alpha_path=alpha_path
        )
    except MemoryError as e:
        pytest.skip(str(e))


# ------------------------------------------------------------------------ the op


def op_inputs(case: ViTMatteCase, device: torch.device):
    """qkv (1, h, w, 3C) and the tables of block 2 resized and gathered for the grid."""
    C, heads = VARIANTS[case.variant]
    h, w = case.size.grid
    g = torch.Generator().manual_seed(zlib.crc32(f"global_attention {case.group}".encode()))
    qkv = torch.randn(1, h, w, 3 * C, generator=g).to(device, case.dtype)
    weights = harness.synth.weights(f"vitmatte_{case.variant}", seed=WEIGHTS_SEED)
    rel_h = rel_pos_table(h, h, weights["backbone.blocks.2.attn.rel_pos_h"]).to(device, case.dtype)
    rel_w = rel_pos_table(w, w, weights["backbone.blocks.2.attn.rel_pos_w"]).to(device, case.dtype)
    return qkv, rel_h, rel_w, heads, (C // heads) ** -0.5


def test_global_attention(global_attention_case, settings, data, record, request):
    case, device = global_attention_case, settings.device
    C, heads = VARIANTS[case.variant]
    h, w = case.size.grid
    N = h * w
    peak = 8 * N * C * case.dtype.itemsize + (quadratic_bytes(case) if case.impl == "reference" else 256 << 20)
    reason = unavailable(case, device, int(peak + 0.5e9))
    if reason:
        pytest.skip(reason)
    fn = reference.global_attention if case.impl == "reference" else dispatch.resolve("auto", device).global_attention
    with harness.skip_on_oom():
        args = op_inputs(case, device)
        out, first_s = harness.run_once(lambda: fn(*args), device)
    error = None
    key = ("global_attention", case.group, case.dtype)
    if case.impl == "reference":
        data.reference_outputs[key] = out
    elif key in data.reference_outputs:
        error = harness.relative_error(out, data.reference_outputs.pop(key))
        assert error <= harness.OP_RTOL[case.dtype], f"{case.id}: relative error {error:.2e} vs reference"
    del out
    dtype = harness.DTYPE_NAMES[case.dtype]
    with harness.skip_on_oom():
        timing = harness.measure(
            request,
            settings,
            lambda: fn(*args),
            first_s,
            target_s=2.0,
            rounds=(1, 20),
            group=f"global_attention {case.group} {dtype}",
            extra={"impl": case.impl, "dtype": dtype},
        )
    record(
        kind="op", group=f"global_attention {case.group} {dtype}", case=f"global_attention-{case.id}", impl=case.impl,
        backend=dispatch.resolve(case.backend, device).name, op="global_attention", variant=case.variant,
        size=case.size.id, tokens=N, dtype=dtype, time_s=timing.median_s, min_s=timing.min_s,
        mean_s=timing.mean_s, rounds=timing.rounds, timer=timing.timer,
        # q·k and p·v, plus the per-query position tables
        flops=4 * N * N * C + 2 * N * (h + w) * C, rel_error=error,
    )  # fmt: skip
