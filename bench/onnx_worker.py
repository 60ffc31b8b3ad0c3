"""One ONNX Runtime (CPU) forward in a fresh process, for time and peak memory:

    python bench/onnx_worker.py '{"model": "model.onnx", "inputs": "inputs.npz", "alpha_out": "alpha.npz"}'

prints one JSON line: latency_s (the run alone), peak_rss_bytes, loaded_rss_bytes (the
session created, before the run). It imports only numpy and onnxruntime, as an application
that ships the ONNX file would; ``alpha_out`` saves the outputs (alpha, and MEMatte's
routing decisions).
"""

import json
import sys
import time

import numpy as np
import onnxruntime as ort


def status_bytes(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process (see bench/worker.py)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def main(spec: dict) -> dict:
    session = ort.InferenceSession(spec["model"], providers=["CPUExecutionProvider"])
    data = np.load(spec["inputs"])
    feeds = {"image": data["image"], "trimap": data["trimap"]}
    loaded = status_bytes("VmRSS")
    start = time.perf_counter()
    outputs = session.run(None, feeds)
    latency = time.perf_counter() - start
    peak = status_bytes("VmHWM")
    if spec.get("alpha_out"):
        names = [o.name for o in session.get_outputs()]
        np.savez(spec["alpha_out"], **dict(zip(names, outputs)))
    return {"latency_s": latency, "peak_rss_bytes": peak, "loaded_rss_bytes": loaded}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
