"""``python -m bench.profile``: the stage table of one forward at a tiny size, its times
against the wall time, and its FLOP against counts from the model's shapes."""

import math
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from mematte.backbone import DEPTH, GLOBAL_BLOCKS, PATCH, VARIANTS, WINDOW_SIZE
from mematte_kernels import dispatch

import harness
import stage_profile

SIZE = harness.Size(96, 64)  # W x H: a 4 x 6 token grid, one (padded) window
# What the issue asks the table to show, at the least.
REQUIRED = (
    "routed global attention", "window attention", "router scoring", "token gather/scatter, index, cap",
    "GEMMs (qkv, proj, MLP, LTRM fc1/fc2)", "LTRM dwconv+GELU, ECA", "ResBottleneck convs", "patch embedding",
    "decoder fusion upsample-conv", "decoder small-channel convs", "LayerNorms", "other",
)  # fmt: skip


@pytest.fixture(scope="module")
def profiled():
    start = time.perf_counter()
    result = stage_profile.profile(SIZE, torch.float32, warmup=None, gemm_budget_s=0.2)
    return result, time.perf_counter() - start


def stage(result, name):
    return next(s for s in result["stages"] if s["stage"] == name)


def test_every_stage_listed_and_printed(profiled):
    result, _ = profiled
    names = [s["stage"] for s in result["stages"]]
    assert names[: len(REQUIRED)] == list(REQUIRED)
    text = stage_profile.format_profile(result)
    for name in names + ["total", "floor", result["machine"]["cpu"], *result["implementations"].values()]:
        assert name in text


def test_stage_times_sum_to_the_wall_time(profiled):
    result, elapsed = profiled
    wall = result["total"]["seconds"]
    assert 0 < wall < elapsed  # the forward, not the calibration or the GEMM ceiling
    seconds = [s["seconds"] for s in result["stages"]]
    assert min(seconds) >= 0  # "other" too: no time was counted twice
    assert sum(seconds) == pytest.approx(wall, rel=1e-9)
    assert sum(s["share"] for s in result["stages"]) == pytest.approx(100, abs=0.5)
    for name in REQUIRED[:-1]:  # every stage ran at this size
        assert stage(result, name)["calls"] > 0, name


def test_flop_follow_the_model_shapes(profiled):
    result, _ = profiled
    C, heads = VARIANTS["vit_s"]
    h, w = SIZE.height // PATCH, SIZE.width // PATCH
    tokens = h * w
    routed = result["model"]["routed_tokens"]
    # The benchmarks' calibration: a quarter of the tokens per router.
    assert routed == [round(harness.ROUTED_FRACTION * tokens)] * len(GLOBAL_BLOCKS)

    attention_proj = 2 * C * 3 * C + 2 * C * C  # qkv, proj: per token attending
    mlp = 2 * C * 4 * C * 2  # fc1, fc2
    ltrm_fc = 2 * C * 2 * C * 2  # fc1, fc2
    window_blocks = DEPTH - len(GLOBAL_BLOCKS)
    gemm = (window_blocks * tokens * (attention_proj + mlp)
            + len(GLOBAL_BLOCKS) * tokens * (mlp + ltrm_fc) + sum(routed) * attention_proj)  # fmt: skip
    assert stage(result, "GEMMs (qkv, proj, MLP, LTRM fc1/fc2)")["flop"] == gemm

    windows = math.ceil(h / WINDOW_SIZE) * math.ceil(w / WINDOW_SIZE)
    assert stage(result, "window attention")["flop"] == window_blocks * windows * 4 * WINDOW_SIZE**4 * C
    assert stage(result, "routed global attention")["flop"] == sum(4 * n * n * C for n in routed)
    assert stage(result, "patch embedding")["flop"] == 2 * C * 4 * PATCH * PATCH * tokens
    assert result["total"]["flop"] == sum(s["flop"] for s in result["stages"])
    assert result["floor"]["seconds"] == pytest.approx(result["total"]["flop"] / 1e9 / result["floor"]["gflops"])


def test_a_table_op_owns_the_torch_calls_inside_it():
    clock = stage_profile.StageClock()
    x = torch.randn(1, 5, 7, 8)
    weight, bias = torch.randn(8, 1, 5, 5), torch.randn(8)
    with stage_profile.instrumented(torch.nn.Module(), clock):
        ops = dispatch.resolve("reference", "cpu")
        assert ops is dispatch.REFERENCE  # so the model still runs the upstream decoder
        ops.dwconv_gelu(x, weight, bias)  # the reference runs F.conv2d inside
        F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=2, groups=8)
        F.layer_norm(x, (8,))
    assert dict(clock.calls) == {"LTRM dwconv+GELU, ECA": 1, "decoder small-channel convs": 1, "LayerNorms": 1}
    assert clock.flop["LTRM dwconv+GELU, ECA"] == clock.flop["decoder small-channel convs"] == 2 * 8 * 25 * 5 * 7


def test_help_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "bench.profile", "--help"], cwd=harness.ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "--size" in proc.stdout and "--json" in proc.stdout
