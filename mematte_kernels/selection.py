"""Choosing among an op's CPU implementations by measuring them on the CPU at hand.

Which implementation of an op is fastest depends on the CPU more than on the op: torch's
fused attention beats the extension's AVX512-BF16 kernel where AMX does its dot products and
loses where it does not; where the CPU has no bf16 dot-product instructions at all, torch's
bf16 GEMMs and convolutions are emulated and run several times slower than the same work in
fp32. No rule written down covers every CPU, so the ``cpu`` backend's table holds, for each op
with more than one implementation, a :class:`SelectedOp`: at its first call in a dtype it
times every candidate that can run that dtype here on a small representative input (a few ms
on a recent CPU), keeps the fastest, logs the choice once, and remembers it on disk per CPU
model, torch version and thread count, as Triton's autotuner caches its configurations.

Environment:
  ``MEMATTE_CPU_KERNELS``  ``op=candidate[,op=candidate...]`` forces choices, e.g.
                           ``varlen_attention=sdpa,linear=fp32``; a forced candidate that
                           cannot run a dtype leaves that dtype to measurement.
  ``MEMATTE_CACHE_DIR``    where the choices are kept (default ``$XDG_CACHE_HOME/mematte``
                           or ``~/.cache/mematte``).
``MEMATTE_BACKEND=reference`` bypasses all of this for the plain PyTorch references.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("mematte_kernels")

FORCE_ENV = "MEMATTE_CPU_KERNELS"
CACHE_ENV = "MEMATTE_CACHE_DIR"
CACHE_FILE = "cpu-kernels.json"
# Timed runs per candidate after one warm-up; the minimum is kept (the least disturbed run).
RUNS = 3
# A candidate whose first timed run is this much slower than the best so far is out at once:
# emulated bf16 can be 10x slower, and need not be timed three times to lose.
CUTOFF = 3.0


def _always(dtype: torch.dtype) -> bool:
    return True


@dataclass(frozen=True)
class Candidate:
    """One implementation of an op: ``name`` (as logged, cached and forced), the function,
    and whether it can take tensors of a dtype on this machine."""

    name: str
    fn: Callable
    runs: Callable[[torch.dtype], bool] = _always


def time_call(fn: Callable, args: tuple) -> float:
    """Seconds one call of ``fn(*args)`` takes. Tests replace it with a fake timer."""
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


class SelectedOp:
    """An op table entry that calls, for each dtype, the candidate measured fastest here.

    ``probe(dtype)`` builds a representative input (a tuple of arguments) for measuring;
    ``trainable`` is the differentiable implementation a training table uses in its place
    (None: the reference's)."""

    def __init__(self, op: str, candidates: list[Candidate], probe: Callable[[torch.dtype], tuple],
                 trainable: Callable | None = None):  # fmt: skip
        names = [c.name for c in candidates]
        if len(set(names)) != len(names):
            raise ValueError(f"{op}: candidate names repeat: {names}")
        self.op = op
        self.candidates = candidates
        self.probe = probe
        self.trainable = trainable
        self._chosen: dict[torch.dtype, Candidate] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        chosen = ", ".join(f"{_dtype_name(d)}: {c.name}" for d, c in self._chosen.items()) or "not chosen yet"
        return f"<selected {self.op} among {', '.join(c.name for c in self.candidates)} ({chosen})>"

    def __call__(self, *args, **kwargs):
        dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
        candidate = self._chosen.get(dtype) or self.choose(dtype)
        return candidate.fn(*args, **kwargs)

    def runnable(self, dtype: torch.dtype) -> list[Candidate]:
        return [c for c in self.candidates if c.runs(dtype)]

    def choose(self, dtype: torch.dtype) -> Candidate:
        """The candidate for ``dtype``: forced, cached, or measured now (then cached)."""
        with self._lock:
            if dtype in self._chosen:
                return self._chosen[dtype]
            candidate, how = self._decide(dtype)
            self._chosen[dtype] = candidate
        log.info("mematte_kernels: cpu %s[%s] -> %s (%s)", self.op, _dtype_name(dtype), candidate.name, how)
        return candidate

    def _decide(self, dtype: torch.dtype) -> tuple[Candidate, str]:
        runnable = self.runnable(dtype)
        if not runnable:
            raise ValueError(f"{self.op}: no implementation runs {_dtype_name(dtype)} tensors on this machine")
        forced = forced_choices().get(self.op)
        if forced is not None:
            match = [c for c in runnable if c.name == forced]
            if match:
                return match[0], f"forced by {FORCE_ENV}"
            if forced not in {c.name for c in self.candidates}:
                raise ValueError(
                    f"{FORCE_ENV}: {self.op} has no candidate {forced!r}; "
                    f"expected one of {', '.join(c.name for c in self.candidates)}"
                )
        if len(runnable) == 1:
            return runnable[0], "the only one that runs here"
        key = f"{self.op}/{_dtype_name(dtype)}"
        cached = read_cache().get(key)
        # A cache entry counts only if it measured exactly the candidates that run here now:
        # a rebuilt extension with a new kernel gets measured.
        by_name = {c.name: c for c in runnable}
        if cached is not None and set(cached.get("ms", {})) == set(by_name) and cached.get("choice") in by_name:
            return by_name[cached["choice"]], f"cached: {_timings_text(cached['ms'])}"
        timings = self._measure(runnable, dtype)
        best = min(timings, key=timings.get)
        write_cache(key, {"choice": best, "ms": timings})
        return next(c for c in runnable if c.name == best), f"measured: {_timings_text(timings)}"

    def _measure(self, runnable: list[Candidate], dtype: torch.dtype) -> dict[str, float]:
        """Milliseconds per call of each candidate on the probe input: the best of ``RUNS``
        after a warm-up, or of fewer where one run already lost by ``CUTOFF``."""
        args = self.probe(dtype)
        timings: dict[str, float] = {}
        with torch.inference_mode():
            for candidate in runnable:
                candidate.fn(*args)  # warm-up: first-call costs (oneDNN primitives, allocation)
                best = None
                for _ in range(RUNS):
                    seconds = time_call(candidate.fn, args)
                    best = seconds if best is None else min(best, seconds)
                    fastest = min(timings.values(), default=None)
                    if fastest is not None and best * 1e3 > CUTOFF * fastest:
                        break
                timings[candidate.name] = best * 1e3
        return timings


def _timings_text(timings: dict) -> str:
    return ", ".join(f"{name} {ms:.2f} ms" for name, ms in sorted(timings.items(), key=lambda item: item[1]))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def choose_all(table, dtype: torch.dtype) -> dict[str, str]:
    """Make now every choice an op table holds for ``dtype`` (measuring what is not cached),
    so that a first forward that is timed times the model alone; {field: candidate name}."""
    return {field: op.choose(dtype).name for field, op in vars(table).items() if isinstance(op, SelectedOp)}


# ------------------------------------------------------------------------- forcing


def forced_choices() -> dict[str, str]:
    """``MEMATTE_CPU_KERNELS`` as {op: candidate}."""
    text = os.environ.get(FORCE_ENV, "").strip()
    choices = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        op, sep, name = item.partition("=")
        if not sep or not op.strip() or not name.strip():
            raise ValueError(f"{FORCE_ENV}={text!r}: expected op=candidate[,op=candidate...], got {item!r}")
        choices[op.strip()] = name.strip()
    return choices


def check_forced(selected: dict[str, SelectedOp]) -> None:
    """Refuse ``MEMATTE_CPU_KERNELS`` entries that name no selected op or no candidate of it."""
    for op, name in forced_choices().items():
        if op not in selected:
            raise ValueError(
                f"{FORCE_ENV}: no CPU op {op!r} has a choice of implementations; "
                f"expected one of {', '.join(sorted(selected))}"
            )
        names = [c.name for c in selected[op].candidates]
        if name not in names:
            raise ValueError(f"{FORCE_ENV}: {op} has no candidate {name!r}; expected one of {', '.join(names)}")


# --------------------------------------------------------------------------- cache


def cache_path() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "mematte"
    )
    return Path(root) / CACHE_FILE


def machine_key() -> str:
    """What the choices depend on: the CPU model, torch, the thread count and whether the
    extension's AVX512-BF16 kernels run here."""
    from . import ext

    return (
        f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
        f"avx512-bf16 kernels {'yes' if ext.cpu_bf16_kernels() else 'no'}"
    )


def cpu_model() -> str:
    return cpuinfo("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpuinfo(field: str) -> str | None:
    """The first CPU's ``field`` in /proc/cpuinfo (None where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _read_file() -> dict:
    path = cache_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        log.warning("mematte_kernels: ignoring unreadable CPU kernel choices in %s (%s); measuring again", path, error)
        return {}
    return data if isinstance(data, dict) else {}


def read_cache() -> dict:
    """This machine's cached choices, {"op/dtype": {"choice": name, "ms": {name: ms}}}."""
    entry = _read_file().get(machine_key(), {})
    return entry if isinstance(entry, dict) else {}


def write_cache(key: str, value: dict) -> None:
    """Add one choice to the cache file, atomically; a cache that cannot be written costs a
    measurement in the next process, nothing more."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_file()
        entry = data.get(machine_key())
        data[machine_key()] = {**(entry if isinstance(entry, dict) else {}), key: value}
        with tempfile.NamedTemporaryFile(
            "w", dir=path.parent, prefix=".cpu-kernels-", suffix=".tmp", delete=False
        ) as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(f.name, path)
    except OSError as error:
        log.warning("mematte_kernels: could not keep CPU kernel choices in %s (%s)", path, error)
