"""Shared pieces of the benchmark suite: cases, inputs, router calibration, timing, memory.

The suite compares the fast path (``dispatch.resolve("auto", device)``) with the published
computation (:mod:`mematte_kernels.reference`, the ``reference`` backend) on seeded
synthetic weights whose routers are calibrated to route a chosen fraction of the tokens.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mematte import FastMEMatte
from mematte.backbone import PATCH, VARIANTS
from mematte.model import DEFAULT_MAX_TOKENS, PAD_MULTIPLE, padded_size
from mematte_kernels import dispatch, reference

from worker import DTYPES

ROOT = Path(__file__).resolve().parents[1]


def _load_synth():
    # The seeded generator of the golden outputs; imported by path so there is one copy.
    spec = importlib.util.spec_from_file_location("synth", ROOT / "tests" / "data" / "golden" / "synth.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


synth = _load_synth()

SETTINGS = pytest.StashKey["Settings"]()  # set by conftest, read when cases are generated
WEIGHTS_SEED = 1234
INPUT_SEED = 7
ROUTED_FRACTION = 0.25  # BATR's training target: what a trained MEMatte routes on average
OP_FRACTIONS = (0.10, 0.25, 0.50)
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# Relative error (Frobenius) allowed between fast and reference op outputs, and mean
# absolute alpha error of the fast model against the fp32 reference model. bf16 on random
# weights lands near 4e-3 mean alpha error; a broken kernel is off by 1e-1 or more.
OP_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
ALPHA_ATOL = {torch.float32: 2e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}


# ------------------------------------------------------------------------------ sizes


@dataclass(frozen=True)
class Size:
    width: int
    height: int

    @classmethod
    def parse(cls, text: str) -> Size:
        """``"1024"`` (square) or ``"3840x2160"`` (width x height)."""
        w, _, h = text.strip().lower().partition("x")
        return cls(int(w), int(h or w))

    @property
    def id(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid (h, w) after the published padding: +32 px per side, unless both
        sides already are multiples of 32."""
        H, W = self.height, self.width
        if H % PAD_MULTIPLE or W % PAD_MULTIPLE:
            H, W = padded_size(H), padded_size(W)
        return H // PATCH, W // PATCH

    @property
    def tokens(self) -> int:
        h, w = self.grid
        return h * w


# ------------------------------------------------------------------------------ cases


@dataclass(frozen=True)
class OpCase:
    op: str  # a key of OPS
    variant: str
    size: Size
    fraction: float | None  # routed share of the tokens; None for the router, which sees all
    dtype: torch.dtype
    impl: str  # "fast" | "reference"

    @property
    def dim_heads(self) -> tuple[int, int]:
        return VARIANTS[self.variant]

    @property
    def routed(self) -> int:
        return self.size.tokens if self.fraction is None else round(self.fraction * self.size.tokens)

    @property
    def group(self) -> str:
        share = "" if self.fraction is None else f" {self.fraction:.0%}"
        return f"{self.op} {self.variant} {self.size.id}{share} {DTYPE_NAMES[self.dtype]}"

    @property
    def id(self) -> str:
        share = [] if self.fraction is None else [f"{self.fraction * 100:.0f}pct"]
        return "-".join([self.op, self.variant, self.size.id, *share, DTYPE_NAMES[self.dtype], self.impl])


@dataclass(frozen=True)
class ModelCase:
    variant: str
    size: Size
    dtype: torch.dtype
    impl: str  # "fast" | "reference" | "all_global" (ViTMatte-style: every token global) | "fast@<commit>"

    @property
    def baseline(self) -> str | None:
        """The (abbreviated) commit whose code a ``fast@<commit>`` case runs, else None."""
        return self.impl.partition("@")[2] or None

    @property
    def backend(self) -> str:
        return "reference" if self.impl == "reference" else "auto"

    @property
    def fraction(self) -> float:
        return 1.0 if self.impl == "all_global" else ROUTED_FRACTION

    @property
    def max_tokens(self) -> int | None:
        return None if self.impl == "all_global" else DEFAULT_MAX_TOKENS

    @property
    def group(self) -> str:
        return f"model {self.variant} {self.size.id}"

    @property
    def id(self) -> str:
        return f"{self.variant}-{self.size.id}-{DTYPE_NAMES[self.dtype]}-{self.impl}"


@dataclass(frozen=True)
class Settings:
    """What one ``pytest bench`` run covers, from its command line."""

    device: torch.device
    smoke: bool  # --benchmark-disable: smallest sizes, one run per case, outputs checked
    full: bool  # --bench-full: ViT-B and 8K too
    sizes: tuple[Size, ...] = ()  # --bench-sizes: replaces the default sizes
    baseline: str | None = None  # --bench-baseline: the full commit whose fast path runs beside this one
    train_iters: int = 6  # --bench-train-iters: iterations per train-step case

    @property
    def variants(self) -> tuple[str, ...]:
        return ("vit_s", "vit_b") if self.full else ("vit_s",)

    @property
    def dtypes(self) -> tuple[torch.dtype, ...]:
        # CPUs have no fast fp16 matmul; GPUs run all three.
        extra = (torch.float16,) if self.device.type == "cuda" else ()
        return (torch.float32, torch.bfloat16, *extra)

    @property
    def model_sizes(self) -> tuple[Size, ...]:
        if self.sizes:
            return self.sizes
        if self.smoke:
            return (Size(256, 256),)
        full = (Size(7680, 4320),) if self.full else ()
        return (Size(512, 512), Size(1024, 1024), Size(2048, 2048), Size(3840, 2160), *full)

    @property
    def op_sizes(self) -> tuple[Size, ...]:
        if self.sizes:
            return self.sizes
        if self.smoke:
            return (Size(512, 512),)  # 1024 tokens
        return (Size(1024, 1024), Size(2048, 2048), Size(3840, 2160))

    def in_process(self, size: Size) -> bool:
        """Large CPU cases run once in a fresh process, which also gives their peak RSS."""
        return self.device.type == "cuda" or size.pixels < 2048 * 2048


def op_cases(settings: Settings) -> list[OpCase]:
    return [
        OpCase(op, variant, size, fraction, dtype, impl)
        for op in OPS
        for variant in settings.variants
        for size in settings.op_sizes
        for fraction in ((None,) if op == "router" else OP_FRACTIONS)
        for dtype in ((torch.float32,) if op == "router" else settings.dtypes)
        for impl in ("reference", "fast")  # reference first: the fast case reuses its output
    ]


def model_cases(settings: Settings) -> list[ModelCase]:
    cases = []
    for variant in settings.variants:
        for size in settings.model_sizes:
            # The published computation runs in fp32; every fast precision is compared to it.
            cases.append(ModelCase(variant, size, torch.float32, "reference"))
            for dtype in settings.dtypes:
                cases.append(ModelCase(variant, size, dtype, "fast"))
                if settings.baseline:  # right after the fast case, so both see the machine alike
                    cases.append(ModelCase(variant, size, dtype, f"fast@{settings.baseline[:7]}"))
            # What routing saves, in the precision the fast path is used in. A baseline, not
            # a check (route_all is tested in test_calibration), so not in smoke runs.
            if not settings.smoke:
                cases.append(ModelCase(variant, size, torch.bfloat16, "all_global"))
    return cases


# ------------------------------------------------------------------------------- ops


def _attention_flops(case: OpCase) -> int:
    dim, heads = case.dim_heads
    return 4 * case.routed**2 * (dim // heads) * heads


def _router_flops(case: OpCase) -> int:
    C = case.dim_heads[0]
    return 2 * case.routed * (C * C + C * C // 2 + C // 2 * C // 4 + C // 4 * 2)


@dataclass(frozen=True)
class Op:
    function: str  # the OpTable field and reference function
    flops: object = None  # case -> flops, for compute-bound ops
    bytes: object = None  # case -> bytes read + written once, for memory-bound ops


OPS = {
    "router": Op("router_scores", flops=_router_flops),
    "gather_layernorm": Op(
        "gather_layernorm", bytes=lambda c: 2 * c.routed * c.dim_heads[0] * c.dtype.itemsize + 8 * c.routed
    ),
    "scatter_residual": Op(
        "scatter_residual_", bytes=lambda c: 3 * c.routed * c.dim_heads[0] * c.dtype.itemsize + 8 * c.routed
    ),
    "attention": Op("varlen_attention", flops=_attention_flops),
}


def fast_table(device: torch.device) -> dispatch.OpTable:
    """What the model runs on ``device`` with ``backend="auto"``; raises when unavailable."""
    return dispatch.resolve("auto", device)


def op_function(case: OpCase, device: torch.device):
    """``(callable, backend name)`` benchmarked for ``case``, or ``(None, why not)``."""
    name = OPS[case.op].function
    if case.impl == "reference":
        return getattr(reference, name), "reference"
    try:
        table = fast_table(device)
    except Exception as e:  # a backend still being wired raises at resolve
        return None, f"backend 'auto' unavailable on {device.type}: {e}"
    fn = getattr(table, name)
    if fn is getattr(reference, name):
        return None, f"'auto' on {device.type} resolves {name} to the reference ('{table.name}' table)"
    return fn, table.name


def op_inputs(case: OpCase, weights: dict, device: torch.device) -> dict:
    """Seeded inputs for one op call; the same for fast and reference."""
    g = torch.Generator().manual_seed(zlib.crc32(case.group.encode()))
    C, heads = case.dim_heads
    N, T = case.size.tokens, case.routed

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, case.dtype)

    def param(key):
        return weights[f"backbone.{key}"].to(device, case.dtype)

    keep = torch.zeros(1, N, dtype=torch.bool)
    keep[0, torch.randperm(N, generator=g)[:T]] = True
    index, cu_seqlens, max_seqlen = reference.token_index(keep.to(device))
    if case.op == "router":
        names = ["in_conv.0", "in_conv.1", "out_conv.0", "out_conv.2", "out_conv.4"]
        params = [param(f"routers.0.{n}.{p}") for n in names for p in ("weight", "bias")]
        return {"args": (randn(1, N, C), *params, 1e-5)}
    if case.op == "gather_layernorm":
        return {"args": (randn(N, C), index, param("blocks.2.norm1.weight"), param("blocks.2.norm1.bias"), 1e-6)}
    if case.op == "scatter_residual":
        return {"args": (randn(N, C), randn(N, C), randn(T, C), index), "result": 0}  # in place on arg 0
    d = C // heads
    return {"args": (randn(T, heads, d), randn(T, heads, d), randn(T, heads, d), cu_seqlens, max_seqlen, d**-0.5)}


def op_output(inputs: dict, returned):
    """The tensor to compare: what the op returned, or the argument it updates in place."""
    if "result" in inputs:
        return inputs["args"][inputs["result"]]
    return returned[0] if isinstance(returned, tuple) else returned  # router: (scores, keep)


def op_peak_bytes(case: OpCase) -> int:
    """What one call holds at its peak, for the larger of fast and reference: the inputs
    plus, for the reference attention, its n x n logits and their softmax."""
    C, heads = case.dim_heads
    e = case.dtype.itemsize
    inputs = 4 * case.size.tokens * C * e
    if case.op == "attention":
        return inputs + 2 * heads * case.routed**2 * e
    return inputs


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, b = actual.double(), expected.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# --------------------------------------------------------------------- model and data


def base_weights(variant: str) -> dict:
    return synth.weights(f"mematte_{variant}", seed=WEIGHTS_SEED)


def bench_inputs(size: Size) -> tuple[torch.Tensor, torch.Tensor]:
    return synth.inputs(size.height, size.width, seed=INPUT_SEED)


def route_all(model: FastMEMatte) -> None:
    """Send every token to global attention on any input: a margin shift no token overcomes."""
    with torch.no_grad():
        for router in model.backbone.routers:
            router.out_conv[4].bias[0] += 1e4


def route(model: FastMEMatte, image: torch.Tensor, trimap: torch.Tensor) -> list[torch.Tensor]:
    """The routing decisions of the backbone alone (no decoder): 4 x (B, h, w, 1) bool."""
    with torch.inference_mode():
        x = model.preprocess(image, trimap)
        return model.backbone(x, dispatch.resolve(model.backend, x.device), model.max_tokens)[2]


def calibrate_routers(model: FastMEMatte, image: torch.Tensor, trimap: torch.Tensor, fraction: float) -> list[float]:
    """Shift each router's last bias so that ``fraction`` of the tokens of this input go to
    global attention; returns the fraction each router reached.

    A token's margin ``score0 - score1`` is ``logit0 - logit1``, so adding d to
    ``out_conv.4.bias[0]`` shifts every margin by d: d is set half-way between the k-th and
    (k+1)-th largest margins. What router i sees depends on the routing of the blocks before
    it, so the routers are calibrated in order, each just before it runs, in one pass.
    """
    reached = []

    def calibrate(router, args):
        scores, _ = router.forward(*args)  # forward() skips this hook
        margin = (scores[..., 0] - scores[..., 1]).flatten().sort(descending=True).values
        k = min(max(round(fraction * margin.numel()), 1), margin.numel() - 1)
        router.out_conv[4].bias[0] -= (margin[k - 1] + margin[k]) / 2
        reached.append(k / margin.numel())

    hooks = [router.register_forward_pre_hook(calibrate) for router in model.backbone.routers]
    try:
        route(model, image, trimap)
    finally:
        for hook in hooks:
            hook.remove()
    return reached


def routed_ratios(decisions) -> list[float]:
    return [float(d.float().mean()) for d in decisions]


class BenchData:
    """Inputs and calibrated weights, made once per session and kept on disk so that a
    fresh process can load exactly what the in-process runs use."""

    def __init__(self, directory: Path, device: torch.device):
        self.directory = directory
        self.device = device
        self._weights: dict[str, dict] = {}
        self._paths: dict[tuple, Path] = {}
        # Reference results handed to the fast cases compared with them.
        self.reference_outputs: dict[str, torch.Tensor] = {}  # op group -> output
        self.reference_alpha: dict[tuple, torch.Tensor] = {}  # (variant, size) -> fp32 alpha
        self.reference_decisions: dict[tuple, list] = {}  # (variant, size) -> routing decisions

    def weights(self, variant: str) -> dict:
        if variant not in self._weights:
            self._weights[variant] = base_weights(variant)
        return self._weights[variant]

    def inputs_path(self, size: Size) -> Path:
        key = ("inputs", size)
        if key not in self._paths:
            image, trimap = bench_inputs(size)
            self._paths[key] = self._save({"image": image, "trimap": trimap}, f"inputs-{size.id}.pt")
        return self._paths[key]

    def inputs(self, size: Size) -> tuple[torch.Tensor, torch.Tensor]:
        data = torch.load(self.inputs_path(size), mmap=True)
        return data["image"].to(self.device), data["trimap"].to(self.device)

    def weights_path(self, variant: str, size: Size, fraction: float) -> Path:
        """A checkpoint whose routers send ``fraction`` of this size's benchmark input to
        global attention (1.0: all tokens, on any input); the same file for every
        implementation compared. Calibrated on the fast path, in fp32."""
        key = (variant, None if fraction >= 1 else size, fraction)
        if key not in self._paths:
            backend = "auto"
            try:
                dispatch.resolve(backend, self.device)
            except Exception:
                backend = "reference"
            model = FastMEMatte(variant, backend=backend).to(self.device)
            model.load_state_dict(self.weights(variant))
            if fraction >= 1:
                route_all(model)
            else:
                calibrate_routers(model, *self.inputs(size), fraction)
            name = f"weights-{variant}-{'all' if fraction >= 1 else size.id}-{fraction:g}.pt"
            self._paths[key] = self._save(model.state_dict(), name)
        return self._paths[key]

    def _save(self, obj, name: str) -> Path:
        path = self.directory / name
        torch.save({k: v.detach().cpu() for k, v in obj.items()}, path)
        return path


def model_unavailable(case: ModelCase, device: torch.device) -> str | None:
    """Why ``case`` cannot run here, or None."""
    if case.impl == "reference" and dispatch.requested_backend("reference") != "reference":
        return f"{dispatch.ENV_VAR} overrides the reference backend; unset it to compare"
    try:
        table = dispatch.resolve(case.backend, device)
    except Exception as e:  # a backend still being wired raises at resolve
        return f"backend {case.backend!r} unavailable on {device.type}: {e}"
    if (case.impl == "fast" or case.baseline) and table.name == "reference":
        return f"'auto' resolves to the reference tables on {device.type}: no fast path to compare"
    if case.baseline and device.type != "cpu":
        return "an older commit runs only through its worker, which runs the model on the CPU"
    return fits(model_peak_bytes(case, table.varlen_attention is reference.varlen_attention), device)


def model_peak_bytes(case: ModelCase, quadratic_attention: bool) -> int:
    """A generous estimate of a forward's peak memory, to skip what cannot fit: weights
    (checkpoint + model), token activations, window-attention logits, the routed
    attention (n x n logits and softmax per head for the reference, linear in n for
    fused attention), and full-resolution input/output planes."""
    C, heads = VARIANTS[case.variant]
    e = case.dtype.itemsize
    params = sum(math.prod(shape) for shape in synth.shapes(f"mematte_{case.variant}").values())
    h, w = case.size.grid
    N = h * w
    routed = N if case.max_tokens is None else min(round(case.fraction * N), case.max_tokens)
    windows = -(-h // 14) * -(-w // 14)
    attention = 2 * heads * routed**2 * e if quadratic_attention else 8 * routed * C * e
    return int(
        0.7e9  # interpreter and torch (about 0.5 GB of RSS), allocator slack
        + params * (4 + e)
        + 16 * N * C * e
        + 3 * windows * heads * 196**2 * 4
        + attention
        + 24 * (16 * h) * (16 * w) * 4
    )


# --------------------------------------------------------------------------- machine


def available_memory(device: torch.device) -> int:
    """Bytes this process could still allocate on ``device``."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


# How an allocation failure reads (CPU allocator, Python, CUDA caching allocator).
ALLOCATION_FAILURES = ("DefaultCPUAllocator", "MemoryError", "out of memory")


@contextlib.contextmanager
def skip_on_oom():
    """Report an allocation failure that the estimates did not foresee as a skip."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not any(m in str(e) for m in ALLOCATION_FAILURES):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        pytest.skip(f"out of memory: {str(e).splitlines()[0]}")


def fits(need: int, device: torch.device) -> str | None:
    """None when ``need`` bytes fit in 90 % of what is available, else why not."""
    free = available_memory(device)
    if need <= 0.9 * free:
        return None
    return f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB available on {device.type}"


# ---------------------------------------------------------------------------- timing


@dataclass
class Timing:
    median_s: float
    min_s: float
    mean_s: float
    rounds: int
    timer: str


def measure(request, settings: Settings, fn, first_s: float, *, target_s: float, rounds: tuple[int, int],
            group: str, extra: dict) -> Timing:  # fmt: skip
    """Time ``fn`` (already run once, in ``first_s``): CUDA events on GPU, pytest-benchmark
    on CPU, the first run alone in smoke mode. The number of rounds, within ``rounds``, is
    chosen so that a case takes about ``target_s`` whatever its size."""
    if settings.smoke:
        return Timing(first_s, first_s, first_s, 1, "single run (smoke)")
    if settings.device.type == "cuda":
        _, first_s = run_once(fn, settings.device)  # the first run compiled and autotuned
    lo, hi = rounds
    rounds = max(lo, min(hi, int(target_s / max(first_s, 1e-6))))
    if settings.device.type == "cuda":
        return _cuda_time(fn, rounds)
    benchmark = request.getfixturevalue("benchmark")
    benchmark.group = group
    benchmark.extra_info.update(extra)
    benchmark.pedantic(fn, rounds=rounds, iterations=1)
    s = benchmark.stats.stats
    return Timing(s.median, s.min, s.mean, s.rounds, "pytest-benchmark")


def _cuda_time(fn, rounds: int) -> Timing:
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return Timing(statistics.median(times), min(times), statistics.mean(times), rounds, "cuda events")


def run_once(fn, device: torch.device):
    """``fn()`` and its wall time, synchronised on GPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


# ---------------------------------------------------------------------------- worker


def run_worker(case: ModelCase, weights_path: Path, inputs_path: Path, timeout_s: float = 3600,
               tree: Path = ROOT, alpha_path: Path | None = None) -> dict:  # fmt: skip
    """Build the model and run one forward in a fresh process, with the code of ``tree``
    (this checkout, or a baseline commit's): its latency, peak RSS and routed ratios; with
    ``alpha_path`` (this checkout's worker), the alpha and decisions saved there.
    Raises MemoryError when it ran out of memory or was killed (the OOM killer), which the
    caller reports as a skip: the case does not fit here now."""
    spec = {
        "weights": str(weights_path),
        "inputs": str(inputs_path),
        "dtype": DTYPE_NAMES[case.dtype],
        "backend": case.backend,
        "max_tokens": case.max_tokens,
        "model": getattr(case, "model", "mematte"),
    }
    if alpha_path is not None:
        spec["alpha_out"] = str(alpha_path)
    proc = subprocess.run(
        [sys.executable, str(tree / "bench" / "worker.py"), json.dumps(spec)],
        capture_output=True, text=True, timeout=timeout_s, cwd=tree,
    )  # fmt: skip
    if proc.returncode < 0:
        raise MemoryError(f"worker for {case.id} killed by signal {-proc.returncode} (out of memory?)")
    if proc.returncode and any(m in proc.stderr for m in ALLOCATION_FAILURES):
        raise MemoryError(f"worker for {case.id} ran out of memory: {proc.stderr.strip().splitlines()[-1]}")
    if proc.returncode:
        raise RuntimeError(f"worker for {case.id} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------- baseline


class BaselineError(Exception):
    """A --bench-baseline revision that cannot run: unknown, without a worker, or not built."""


BUILD_STAMP = ".mematte-bench-build.json"  # in a baseline tree: what its extension was built for


def baseline_cache() -> Path:
    """Where baseline commits are unpacked and built, outside any checkout, kept across runs."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mematte-bench"


def resolve_commit(rev: str) -> str:
    """The full hash of ``rev`` (any revision git names: hash, tag, branch, ``main~3``)."""
    proc = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                          cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    if proc.returncode:
        raise BaselineError(f"--bench-baseline {rev!r} names no commit of {ROOT}")
    return proc.stdout.strip()


def build_extension(tree: Path, log) -> int:
    """Build ``tree``'s compiled ops in place, CPU only, writing the output to ``log``;
    returns the exit status. The CUDA half is left out: the baseline runs on the CPU."""
    command = [sys.executable, "setup.py", "build_ext", "--inplace", "--force"]  # --force: no objects of a killed build
    env = {**os.environ, "MEMATTE_NO_CUDA": "1"}
    return subprocess.run(command, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT).returncode


# Run in a baseline tree the way its worker starts: what it imports must come from the tree,
# compiled ops included, or the baseline would time another checkout's code (an editable
# install serves a submodule missing from the tree from its own checkout).
IMPORT_CHECK = """
import sys
sys.path.insert(0, sys.argv[1])
import mematte, mematte_kernels
try:
    from mematte_kernels import _C
except ImportError as e:
    sys.exit(f"mematte_kernels._C: {e}")
for module in (mematte, mematte_kernels, _C):
    print(module.__name__, module.__file__)
"""


def prepare_baseline(commit: str, cache: Path, build=build_extension) -> Path:
    """The tree of ``commit``, unpacked under ``cache`` and its extension built with
    ``build(tree, log) -> exit status``; both done once and reused while the interpreter
    and torch stay the same. Raises BaselineError with what went wrong."""
    cache = cache.absolute()  # the worker runs with the tree as its working directory
    tree = cache / f"baseline-{commit}"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"baseline-{commit}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs wanting the same commit unpack and build it once
        if not tree.exists():
            _unpack(commit, tree)
        if not (tree / "bench" / "worker.py").exists():
            raise BaselineError(f"commit {commit[:10]} has no bench/worker.py to run its model with")
        stamp = {"python": sys.executable, "torch": torch.__version__}
        stamp_path = tree / BUILD_STAMP
        if not stamp_path.exists() or json.loads(stamp_path.read_text()) != stamp:
            stamp_path.unlink(missing_ok=True)
            log_path = tree / "build.log"
            with open(log_path, "w") as log:
                status = build(tree, log)
            if status:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
                raise BaselineError(f"building commit {commit[:10]} failed (exit {status}); end of {log_path}:\n{tail}")
            _check_imports(tree)
            stamp_path.write_text(json.dumps(stamp))
    return tree


def _unpack(commit: str, tree: Path) -> None:
    """``git archive`` of ``commit`` into ``tree``; a tree under its final name is complete."""
    partial = tree.with_name(tree.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    archive = subprocess.Popen(["git", "archive", commit], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    unpack = subprocess.run(["tar", "-x", "-C", str(partial)], stdin=archive.stdout, capture_output=True, text=True)
    archive.stdout.close()
    if archive.wait() or unpack.returncode:
        raise BaselineError(f"unpacking commit {commit[:10]} failed: {archive.stderr.read().decode()}{unpack.stderr}")
    partial.rename(tree)


def _check_imports(tree: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", IMPORT_CHECK, str(tree)], cwd=tree, capture_output=True, text=True)
    if proc.returncode:
        why = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    else:
        found = (line.split(" ", 1) for line in proc.stdout.splitlines())
        outside = [f"{name} from {path}" for name, path in found if not Path(path).is_relative_to(tree)]
        if not outside:
            return
        why = ", ".join(outside)
    raise BaselineError(f"{tree.name}: after the build, mematte and its compiled ops do not all import from the tree: "
                        f"{why}")  # fmt: skip
