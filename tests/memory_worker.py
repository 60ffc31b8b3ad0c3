"""Peak memory of matting one image, measured in a fresh process (run by
tests/test_estimate_memory.py): prints JSON with the growth of the peak resident size over
the resident size just before the call, and the model's own estimate.

    python tests/memory_worker.py {mematte,vitmatte} DTYPE HEIGHT WIDTH

glibc's malloc moves its mmap threshold as blocks are freed, which makes the resident
size after a warm-up call vary by a factor of 3 from run to run; a fixed threshold makes
every large block its own mapping, so the peak resident size is the peak of what is live.
"""

import json
import os
import sys

if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # glibc reads it at start-up: run again with it
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})

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
    trimap[: height // 3], trimap[-(height // 3) :] = 0, 255
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident size to the current one
    before, _ = resident()
    api.matte(model, image, trimap)
    _, peak = resident()
    print(json.dumps({"measured": peak - before, "estimated": model.estimate_memory(height, width)}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
