"""Launched by tests/test_train_engine.py under ``torchrun --nproc-per-node 2``: trains
the small stand-in model with the real engine (DDP over gloo), then each rank saves its
parameters to OUT/rank<r>.pt.

    torchrun --standalone --nproc-per-node 2 tests/train_ddp_toy.py DATA OUT ITERS
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from mematte.distributed import distributed_from_env  # noqa: E402
from mematte.train.data import find_dataset  # noqa: E402
from mematte.train.engine import Trainer, init_distributed  # noqa: E402

from train_helpers import ToyMatte, toy_config  # noqa: E402


def main(data: str, out: str, iters: str) -> None:
    device = torch.device("cpu")
    ddp = distributed_from_env()
    init_distributed(ddp, device)
    torch.manual_seed(0)
    model = ToyMatte()
    cfg = toy_config(Path(out), iters=int(iters), checkpoint_period=1)
    Trainer(model, find_dataset(data), cfg, device, ddp, progress=False).train()
    torch.save({n: p.detach() for n, p in model.named_parameters()}, Path(out) / f"rank{ddp.rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
