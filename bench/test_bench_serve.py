"""``mematte serve`` under concurrent clients: requests/s and p50/p95 latency of
``POST /v1/matte`` at 1024² with 1, 4 and 16 clients, a real server in a subprocess (the
ViT-S model, seeded random weights, the dtype ``--dtype auto`` picks); and whether matting
same-size images as one batch pays over one at a time.

    pytest bench/test_bench_serve.py                     1024², written to bench/results/serve-*.json
    pytest bench/test_bench_serve.py --benchmark-disable smoke: 64², 1 and 2 clients, nothing written
"""

from __future__ import annotations

import io
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import report

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import serve_helpers  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SIZE, CLIENTS, REQUESTS_PER_CLIENT = 1024, (1, 4, 16), 3
SMOKE_SIZE, SMOKE_CLIENTS = 64, (1, 2)
BATCH = 4
_results: dict = {}


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def _inputs(size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    trimap = np.full((size, size), 128, np.uint8)
    trimap[: size // 3], trimap[-(size // 3) :] = 0, 255
    return image, trimap


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from mematte import FastMEMatte

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("serve-bench") / "vit_s.pth"
    torch.save(FastMEMatte("vit_s").state_dict(), path)
    return path


def test_serve_throughput_and_latency(checkpoint, settings):
    size, clients = (SMOKE_SIZE, SMOKE_CLIENTS) if settings.smoke else (SIZE, CLIENTS)
    image, trimap = (_png(a) for a in _inputs(size))
    files = {"image": image, "trimap": trimap}
    rows = []
    with serve_helpers.running(checkpoint, "--queue", str(max(clients)), "--timeout", "600") as server:
        with server.client(timeout=600) as c:  # warm-up: one-off costs are no request's
            assert c.post("/v1/matte", files=files).status_code == 200

        def one_client(_):
            seconds = []
            with server.client(timeout=600) as c:
                for _ in range(REQUESTS_PER_CLIENT):
                    start = time.perf_counter()
                    response = c.post("/v1/matte", files=files)
                    assert response.status_code == 200, response.text
                    seconds.append(time.perf_counter() - start)
            return seconds

        for n in clients:
            start = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                latencies = sorted(s for client in pool.map(one_client, range(n)) for s in client)
            wall = time.perf_counter() - start
            p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
            rows.append(
                {
                    "clients": n,
                    "requests": len(latencies),
                    "requests_per_s": len(latencies) / wall,
                    "p50_s": statistics.median(latencies),
                    "p95_s": p95,
                }
            )
            print(
                f"serve {size}²: {n:2d} clients, {rows[-1]['requests_per_s']:.2f} req/s, "
                f"p50 {rows[-1]['p50_s']:.2f} s, p95 {p95:.2f} s"
            )
    assert [r["requests"] for r in rows] == [n * REQUESTS_PER_CLIENT for n in clients]
    _results["serve"] = {"size": size, "rows": rows}


def test_batching_same_size_images(settings):
    """``BATCH`` images in one forward against ``BATCH`` forwards of one: the server
    batches only where the first is clearly faster."""
    from mematte import FastMEMatte
    from mematte.api import resolve_dtype

    size = SMOKE_SIZE if settings.smoke else 512
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = FastMEMatte("vit_s", dtype=resolve_dtype("auto", device))
    image, trimap = _inputs(size)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(255)
    t = torch.from_numpy(trimap)[None, None].float().div(255)
    one = {"image": x, "trimap": t}
    batch = {"image": x.expand(BATCH, -1, -1, -1).contiguous(), "trimap": t.expand(BATCH, -1, -1, -1).contiguous()}
    rounds = 1 if settings.smoke else 3
    with torch.inference_mode():
        model(one)  # warm-up
        single, batched = [], []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(BATCH):
                alone = model(one)[0]["phas"]
            single.append(time.perf_counter() - start)
            start = time.perf_counter()
            together = model(batch)[0]["phas"]
            batched.append(time.perf_counter() - start)
    # the same matte either way: a batch is the same computation per image
    torch.testing.assert_close(together[-1:].float(), alone.float(), atol=2e-2, rtol=0)
    result = {
        "size": size,
        "images": BATCH,
        "one_at_a_time_s": min(single),
        "batched_s": min(batched),
        "speedup": min(single) / min(batched),
        "dtype": str(model.dtype).removeprefix("torch."),
    }
    print(
        f"batching {BATCH}×{size}²: one at a time {result['one_at_a_time_s']:.2f} s, "
        f"one batch {result['batched_s']:.2f} s ({result['speedup']:.2f}×)"
    )
    _results["batching"] = result


def test_write_results(settings):
    if settings.smoke or set(_results) != {"serve", "batching"}:
        pytest.skip("smoke run, or a case did not run: nothing written")
    info = report.machine(torch.device("cpu"))
    doc = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": info,
        "git": report.git_state(),
        "model": "FastMEMatte(vit_s), random weights",
        **_results,
    }
    path = RESULTS / f"serve-{report.device_slug(info)}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"results: {path}")
