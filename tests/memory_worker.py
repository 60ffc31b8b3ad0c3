"""Peak memory of matting one image, measured in a fresh process (run by
tests/test_estimate_memory.py): prints JSON with the growth of the peak resident size over
the resident size just before the call, and the model's own estimate.

    python tests/memory_worker.py {mematte,vitmatte} DTYPE HEIGHT WIDTH
"""
import json
import sys

import numpy as np
import torch

from mematte import FastMEMatte, FastViTMatte, api


def resident() -> tuple[int, int]:
    """(current, peak) resident bytes of this process."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return tuple(int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM"))


def main(kind: str, dtype: str, height: int, width: int) -> None:
    torch.manual_seed(0)
    model = {"mematte": FastMEMatte, "vitmatte": FastViTMatte}[kind]("vit_s", dtype=getattr(torch, dtype))
    # one small call first: library start-up (thread pools, kernel choices) is no part of a call
    api.matte(model, np.zeros((64, 64, 3), np.float32), np.full((64, 64), 128, np.uint8))
    rng = np.random.default_rng(0)
    image = rng.random((height, width, 3), dtype=np.float32)
    trimap = np.full((height, width), 128, np.uint8)
    trimap[: height // 3], trimap[-(height // 3):] = 0, 255
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident size to the current one
    before, _ = resident()
    api.matte(model, image, trimap)
    _, peak = resident()
    print(json.dumps({"measured": peak - before, "estimated": model.estimate_memory(height, width)}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
