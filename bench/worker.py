"""One whole-model forward in a fresh process, for the CPU peak-memory numbers:

    python bench/worker.py '{"weights": ..., "inputs": ..., "dtype": "bf16", "backend": "auto", "max_tokens": 18500}'

prints one JSON line: latency_s (the forward alone), peak_rss_bytes, loaded_rss_bytes
(before the forward), routed (per router; ViTMatte: none), backend and the CPU kernel
choices (made before the forward: a one-time measurement per machine, not part of a
forward). ``"model": "vitmatte"`` runs FastViTMatte instead of FastMEMatte; ``"alpha_out":
path`` saves the alpha (fp32) and the routing decisions there. It imports only what an
application would (torch, mematte), so its peak RSS is what running the model costs.
"""

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout as well
from mematte import FastMEMatte, FastViTMatte  # noqa: E402
from mematte_kernels import dispatch, selection  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_model(weights_path, device, dtype: torch.dtype, backend: str, max_tokens: int | None) -> FastMEMatte:
    """The model as a user builds it: from a checkpoint file, in the requested precision."""
    return FastMEMatte.from_checkpoint(
        weights_path, map_location=device, backend=backend, max_tokens=max_tokens, dtype=dtype
    )


def status_bytes(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process. Not ru_maxrss: Linux carries it
    over exec from the forked parent, so a child of pytest would report pytest's RSS."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def main(spec: dict) -> dict:
    dtype = DTYPES[spec["dtype"]]
    if spec.get("model") == "vitmatte":
        model = FastViTMatte.from_checkpoint(spec["weights"], backend=spec["backend"], dtype=dtype)
    else:
        model = load_model(spec["weights"], "cpu", dtype, spec["backend"], spec["max_tokens"])
    table = dispatch.resolve(spec["backend"], "cpu")
    choices = selection.choose_all(table, dtype)
    data = torch.load(spec["inputs"], mmap=True)
    loaded = status_bytes("VmRSS")
    with torch.inference_mode():
        start = time.perf_counter()
        outputs = model({"image": data["image"], "trimap": data["trimap"]})
        latency = time.perf_counter() - start
    peak = status_bytes("VmHWM")
    alpha, decisions = (outputs[0]["phas"], outputs[2]) if isinstance(outputs, tuple) else (outputs["phas"], [])
    if spec.get("alpha_out"):
        torch.save({"alpha": alpha.float(), "decisions": decisions}, spec["alpha_out"])
    return {
        "latency_s": latency,
        "peak_rss_bytes": peak,
        "loaded_rss_bytes": loaded,
        "routed": [float(d.float().mean()) for d in decisions],
        "backend": table.name,
        "choices": choices,
    }


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
