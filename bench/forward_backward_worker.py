"""Training steps of the model alone (forward + losses + backward, no data loading or
optimiser) in a fresh process, for the forward+backward benchmark:

    python bench/forward_backward_worker.py '{"backend": "auto", "crop": 512, "batch": 2, "precision": "fp32", "steps": 3, "warmup": 1}'

MEMatte-S with its ViTMatte-S teacher on the synthetic weights and Gumbel noise of the
training golden file's recipe (tests/data/golden/README.md), ``crop``² synthetic images.
Prints one JSON line: s_per_step (median of the steps after the first ``warmup``),
peak_bytes (peak RSS of the process on a CPU, CUDA max allocated on a GPU), loaded_rss_bytes (before the first step),
losses (of the last step), routed (hard share per router) and backend (the training table).
"""

import importlib.util
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout as well
from mematte import FastMEMatte  # noqa: E402
from mematte_kernels import dispatch  # noqa: E402

from worker import status_bytes  # noqa: E402

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _synth():
    spec = importlib.util.spec_from_file_location("synth", ROOT / "tests" / "data" / "golden" / "synth.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def batch(synth, crop: int, size: int) -> dict[str, torch.Tensor]:
    images, trimaps = zip(*(synth.inputs(crop, crop, seed=21 + i) for i in range(size)))
    image, trimap = torch.cat(images), torch.cat(trimaps)
    alpha = torch.where(trimap == 1, 1.0, torch.where(trimap == 0, 0.0, image.mean(1, keepdim=True)))
    return {"image": image, "trimap": trimap, "alpha": alpha}


def main(spec: dict) -> dict:
    synth = _synth()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = FastMEMatte("vit_s", backend=spec["backend"], teacher=True)
    teacher = synth.weights("vitmatte_vit_s", seed=96)
    model.load_state_dict(
        {
            **synth.weights("mematte_vit_s", seed=95),
            **{f"teacher_{k}": v for k, v in teacher.items() if k.startswith("backbone.")},
        }
    )
    model.to(device).train()
    data = {k: v.to(device) for k, v in batch(synth, spec["crop"], spec["batch"]).items()}
    tokens = (spec["crop"] // 16) ** 2
    g = torch.Generator().manual_seed(11)
    noise = [(-torch.empty(spec["batch"], tokens, 2).exponential_(generator=g).log()).to(device) for _ in range(4)]
    dtype = PRECISIONS[spec["precision"]]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    loaded = status_bytes("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        with autocast:
            losses = model(data, gumbel_noise=noise)
        sum(losses.values()).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else status_bytes("VmHWM")
    return {
        "s_per_step": statistics.median(times[spec["warmup"] :]),
        "peak_bytes": peak,
        "loaded_rss_bytes": loaded,
        "losses": {k: v.item() for k, v in losses.items()},
        "routed": model.routed_share.tolist(),
        "backend": dispatch.resolve(spec["backend"], device, training=True).name,
    }


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
