"""One forward of a model built with another library, as its users run it, eager or with
``mematte.accelerate``, for bench/test_bench_peers.py:

    python bench/peers_worker.py '{"model": "hf_vitmatte", "width": 2048, "height": 2048, "dtype": "fp32",
                                   "accelerate": true, "runs": 1, "out": "/tmp/alpha.pt"}'

``model``: "hf_vitmatte" (transformers' ``VitMatteForImageMatting``, ViT-S, the image and
trimap through ``VitMatteImageProcessor``) or "timm_samvit_base" (timm's
``samvit_base_patch16`` built for 1024², its ``forward_features`` on the input size given).
Weights are seeded (tests/peer_models.py). With ``runs`` > 1 the first forward is untimed.
Prints one JSON line: latency_s (the last forward), cpu_s (its CPU time, all threads: on a
machine shared with other jobs the steadier measure), peak_rss_bytes, loaded_rss_bytes
(before the forwards); ``out`` receives the output (alpha or features) in fp32.
"""

import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout as well
import mematte  # noqa: E402
from mematte_kernels import dispatch, selection  # noqa: E402

from worker import DTYPES, status_bytes  # noqa: E402

MODELS = ("hf_vitmatte", "timm_samvit_base")
SEED = 1234


def _peer_models():
    # The tests' model builders, imported by path so there is one copy.
    spec = importlib.util.spec_from_file_location("peer_models", ROOT / "tests" / "peer_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(spec: dict):
    """(model, forward) for ``spec``: the model in the requested dtype, and a callable that
    runs it on seeded inputs of the requested size."""
    peers = _peer_models()
    dtype = DTYPES[spec["dtype"]]
    height, width = spec["height"], spec["width"]
    if spec["model"] == "hf_vitmatte":
        model = peers.hf_vitmatte(seed=SEED, **peers.VIT_S_BACKBONE).to(dtype)
        pixels = peers.hf_inputs(height, width, seed=SEED).pixel_values.to(dtype)
        return model, lambda: model(pixel_values=pixels).alphas
    if spec["model"] == "timm_samvit_base":
        model = peers.timm_sam("samvit_base_patch16", img_size=1024, depth=None, seed=SEED).to(dtype)
        image = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(SEED)).to(dtype)
        return model, lambda: model.forward_features(image)
    raise ValueError(f"unknown model {spec['model']!r}; expected one of {', '.join(MODELS)}")


def main(spec: dict) -> dict:
    model, forward = build(spec)
    backend = "eager"
    if spec["accelerate"]:
        mematte.accelerate(model)
        table = dispatch.resolve("auto", "cpu")
        selection.choose_all(table, DTYPES[spec["dtype"]])  # the one-time choice, before any timing
        backend = table.name
    loaded = status_bytes("VmRSS")
    with torch.inference_mode():
        for _ in range(spec.get("runs", 1)):
            start, cpu_start = time.perf_counter(), time.process_time()
            out = forward()
            latency, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peak = status_bytes("VmHWM")
    if spec.get("out"):
        torch.save(out.float(), spec["out"])
    return {"latency_s": latency, "cpu_s": cpu, "peak_rss_bytes": peak, "loaded_rss_bytes": loaded, "backend": backend}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
