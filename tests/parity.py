"""What the parity tests against the original code share: the published state-dict manifest
and the generator the golden outputs' weights and inputs were made with."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(DATA / "golden"))
import synth  # noqa: E402,F401  (the generator the golden outputs were made with)


@functools.cache
def manifest(name: str) -> dict[str, list[int]]:
    """The official checkpoint's key -> shape for ``name`` (e.g. "mematte_vit_s")."""
    return json.loads((DATA / "state_dict_shapes.json").read_text())[name]


def assert_matches_manifest(state: dict[str, torch.Tensor], name: str) -> None:
    expected = manifest(name)
    assert sorted(state) == sorted(expected)
    wrong = {k: (list(v.shape), expected[k]) for k, v in state.items() if list(v.shape) != expected[k]}
    assert not wrong
