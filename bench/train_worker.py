"""Training iterations in a fresh process, for the training benchmark:

    python bench/train_worker.py '{"crop": 512, "batch_size": 2, "precision": "bf16", "backend": "auto", "iters": 6, "warmup": 2}'

Makes a small dataset (foregrounds larger than the crop) and a random ViTMatte-S checkpoint
as --init (so the distillation teacher runs, as in the recipe) in a temporary folder, runs
the code path of ``mematte train`` (checks, model, loop; data loaded in the training
process, ``--workers 0``) and prints one JSON line: s_per_iter (median of the iterations
after the first ``warmup``, data loading and optimiser step included), peak_bytes (peak
RSS of the process on a CPU, CUDA max allocated on a GPU), routed (mean share per router
over the timed iterations) and device.
"""

import csv
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(Path(__file__).parent)]
from mematte.cli import build_parser  # noqa: E402
from mematte.train.engine import Trainer  # noqa: E402
from mematte.train.run import build_model, prepare  # noqa: E402

from train_helpers import make_dataset  # noqa: E402
from worker import status_bytes  # noqa: E402

SHAPES = ROOT / "tests" / "data" / "state_dict_shapes.json"


def random_vitmatte(path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, shape in sorted(json.loads(SHAPES.read_text())["vitmatte_vit_s"].items()):
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.zeros(shape, dtype=torch.long)
        elif k.endswith("running_var"):
            sd[k] = torch.ones(shape)
        else:
            sd[k] = torch.randn(shape, generator=g) * 0.02
    torch.save({"model": sd}, path)
    return path


def main(spec: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="mematte-train-bench-") as tmp:
        tmp = Path(tmp)
        side = spec["crop"] + spec["crop"] // 4
        data = make_dataset(tmp / "data", n_fg=2, n_bg=2 * spec["batch_size"], size=(side, side + 32))
        init = random_vitmatte(tmp / "vitmatte_s.pth")
        args = build_parser().parse_args(
            [
                "train",
                str(data),
                "--out",
                str(tmp / "run"),
                "--init",
                str(init),
                "--crop",
                str(spec["crop"]),
                "--batch-size",
                str(spec["batch_size"]),
                "--iters",
                str(spec["iters"]),
                "--precision",
                spec["precision"],
                "--backend",
                spec["backend"],
                "--workers",
                "0",
            ]
        )
        prepared = prepare(args)
        model, _ = build_model(prepared)
        device = prepared.device
        Trainer(model, prepared.files, prepared.cfg, device, progress=False).train()
        with open(tmp / "run" / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))[spec["warmup"] :]
    routers = [c for c in rows[0] if c.startswith("routed_share")]
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else status_bytes("VmHWM")
    return {
        "s_per_iter": statistics.median(float(r["s_per_iter"]) for r in rows),
        "peak_bytes": peak,
        "routed": [statistics.mean(float(r[c]) for r in rows) for c in routers],
        "device": str(device),
    }


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
