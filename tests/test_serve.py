"""``mematte serve`` end to end: a real server in a subprocess (uvicorn, a free loopback
port), checked against ``mematte predict`` on the same files, under load, against hostile
inputs, on SIGTERM and with an API key."""

from __future__ import annotations

import io
import json
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

import serve_helpers

HEIGHT, WIDTH = 96, 128


def png_bytes(array: np.ndarray, **save) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=save.pop("format", "PNG"), **save)
    return out.getvalue()


def photo(height=HEIGHT, width=WIDTH, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width]
    base = np.stack([x / width, y / height, 0.5 + 0.0 * x], axis=2) * 200
    return (base + rng.integers(0, 50, (height, width, 3))).astype(np.uint8)


def trimap(height=HEIGHT, width=WIDTH) -> np.ndarray:
    t = np.full((height, width), 128, np.uint8)
    t[: height // 3], t[-(height // 3) :] = 0, 255
    return t


def mask(height=HEIGHT, width=WIDTH) -> np.ndarray:
    m = np.zeros((height, width), np.uint8)
    m[height // 4 : -height // 4, width // 4 : -width // 4] = 255
    return m


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming width×height, then a tiny IDAT: what a
    decompression bomb's header looks like, in 60 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


IMAGE, TRIMAP, MASK = png_bytes(photo()), png_bytes(trimap()), png_bytes(mask())


@pytest.fixture(scope="module")
def server(checkpoint):
    with serve_helpers.running(checkpoint, "--timeout", "4", "--max-upload-mb", "1", "--queue", "8") as s:
        yield s


def post(server, files=None, data=None, **kwargs) -> httpx.Response:
    with server.client(timeout=30) as c:
        return c.post("/v1/matte", files=files, data=data, **kwargs)


# ---------------------------------------------------------------------- the same PNG as predict


def test_round_trip_gives_the_bytes_of_mematte_predict(server, checkpoint, tmp_path):
    # an EXIF-rotated JPEG photo (orientation 6: shown rotated 90°) with its trimap as shown
    stored = photo(WIDTH, HEIGHT)
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "photo.jpg").write_bytes(png_bytes(stored, format="JPEG", quality=92, exif=exif))
    (tmp_path / "photo_trimap.png").write_bytes(TRIMAP)
    (tmp_path / "bg.png").write_bytes(png_bytes(photo(40, 60, seed=1)))
    (tmp_path / "photo_mask.png").write_bytes(MASK)
    run = [sys.executable, "-m", "mematte", "predict", str(tmp_path / "photo.jpg"), "--checkpoint", str(checkpoint)]
    # one after the other: the first stores the CPU kernel choices the second and the server read
    subprocess.run(
        run
        + [
            "--trimap",
            str(tmp_path / "photo_trimap.png"),
            "--rgba",
            "--background",
            str(tmp_path / "bg.png"),
            "-o",
            str(tmp_path / "trimap"),
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        run + ["--mask", str(tmp_path / "photo_mask.png"), "--band", "6", "--16bit", "-o", str(tmp_path / "mask")],
        check=True,
        capture_output=True,
    )
    image = (tmp_path / "photo.jpg").read_bytes()
    asked = {
        "trimap/photo_alpha.png": ({"trimap": TRIMAP}, {}),
        "trimap/photo_rgba.png": ({"trimap": TRIMAP}, {"output": "rgba"}),
        "trimap/photo_composite.png": (
            {"trimap": TRIMAP, "background": (tmp_path / "bg.png").read_bytes()},
            {"output": "composite"},
        ),
        "mask/photo_alpha.png": ({"mask": MASK}, {"band": "6", "bits": "16"}),
    }
    for written, (guide, options) in asked.items():
        response = post(server, files={"image": image, **guide}, data=options)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/png"
        assert response.content == (tmp_path / written).read_bytes(), written
    assert Image.open(io.BytesIO(response.content)).size == (WIDTH, HEIGHT)  # the photo as shown


def test_client_file_names_are_never_used(server):
    names = ["../../etc/passwd", "/etc/shadow", "a\nb.png", "é" * 300, "con.png", "."]
    expected = post(server, files={"image": IMAGE, "trimap": TRIMAP}).content
    for name in names:
        response = post(server, files={"image": (name, IMAGE), "trimap": (name, TRIMAP)})
        assert response.status_code == 200, (name, response.text)
        assert response.content == expected


def test_healthz_and_metrics(server):
    with server.client() as c:
        health = c.get("/healthz").json()
        assert health["model"] == "FastMEMatte(vit_s)" and health["device"] == "cpu"
        assert health["queue_depth"] == 0 and health["queue_size"] == 8
        post(server, files={"image": IMAGE, "trimap": TRIMAP})
        metrics = c.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    counted = [line for line in metrics.text.splitlines() if line.startswith('mematte_requests_total{status="200"}')]
    assert counted and float(counted[0].split()[-1]) >= 1
    assert "mematte_request_seconds_bucket" in metrics.text and "mematte_queue_depth" in metrics.text


def test_the_page_and_its_assets_need_nothing_from_elsewhere(server):
    with server.client() as c:
        page = c.get("/")
        assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
        texts = [page.text] + [c.get(f"/static/{name}").text for name in ("app.js", "style.css")]
        assert c.get("/static/..%2fapp.py").status_code == 404
    for text in texts:
        assert "http://" not in text and "https://" not in text and "//cdn" not in text


# ---------------------------------------------------------------------- hostile inputs


def _corrupt_png() -> bytes:
    data = bytearray(IMAGE)
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64  # inside IDAT: CRC and zlib fail
    return bytes(data)


def _palette_trimap() -> bytes:
    im = Image.fromarray(trimap()).convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    out = io.BytesIO()
    im.save(out, format="PNG")
    return out.getvalue()


def _gif() -> bytes:
    return png_bytes(photo(), format="GIF")


JPEG = png_bytes(photo(), format="JPEG")
GOOD = {"image": IMAGE, "trimap": TRIMAP}

# (id, files, form fields, expected status, words the error must contain)
HOSTILE = [
    ("truncated png", {"image": IMAGE[: len(IMAGE) // 2], "trimap": TRIMAP}, {}, 400, "image"),
    ("png cut inside its header", {"image": IMAGE[:30], "trimap": TRIMAP}, {}, 400, "image"),
    ("corrupt png data", {"image": _corrupt_png(), "trimap": TRIMAP}, {}, 400, "image"),
    ("truncated jpeg", {"image": JPEG[: len(JPEG) // 2], "trimap": TRIMAP}, {}, 400, "image"),
    ("header claims 30000x30000", {"image": png_header_only(30000, 30000), "trimap": TRIMAP}, {}, 413, "--max-pixels"),
    ("trimap claims 30000x30000", {"image": IMAGE, "trimap": png_header_only(30000, 30000)}, {}, 413, "trimap"),
    ("trimap size differs", {"image": IMAGE, "trimap": png_bytes(trimap(64, 64))}, {}, 400, "64×64"),
    ("mask size differs", {"image": IMAGE, "mask": png_bytes(mask(80, 128))}, {}, 400, "mask"),
    ("empty image part", {"image": b"", "trimap": TRIMAP}, {}, 400, "empty"),
    ("empty trimap part", {"image": IMAGE, "trimap": b""}, {}, 400, "empty"),
    ("non-image bytes", {"image": b"hello, this is not an image at all", "trimap": TRIMAP}, {}, 415, "allowed format"),
    ("gif", {"image": _gif(), "trimap": TRIMAP}, {}, 415, "allowed format"),
    (
        "svg",
        {"image": b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', "trimap": TRIMAP},
        {},
        415,
        "allowed format",
    ),
    ("pdf", {"image": b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", "trimap": TRIMAP}, {}, 415, "allowed"),
    ("ico", {"image": png_bytes(photo(32, 32), format="ICO"), "trimap": TRIMAP}, {}, 415, "allowed format"),
    ("missing image", {"trimap": TRIMAP}, {}, 400, "image"),
    ("missing trimap and mask", {"image": IMAGE}, {}, 400, "trimap"),
    ("both trimap and mask", {**GOOD, "mask": MASK}, {}, 400, "exactly one"),
    ("unknown output", GOOD, {"output": "jpeg"}, 400, "output"),
    ("composite without background", GOOD, {"output": "composite"}, 400, "background"),
    ("background without composite", {**GOOD, "background": IMAGE}, {}, 400, "background"),
    ("bits 12", GOOD, {"bits": "12"}, 400, "bits"),
    ("bits not a number", GOOD, {"bits": "sixteen"}, 400, "bits"),
    ("16 bits for a cutout", GOOD, {"bits": "16", "output": "rgba"}, 400, "bits"),
    ("band 0", {"image": IMAGE, "mask": MASK}, {"band": "0"}, 400, "band"),
    ("band huge", {"image": IMAGE, "mask": MASK}, {"band": "99999999999"}, 400, "band"),
    ("band with a trimap", GOOD, {"band": "5"}, 400, "band"),
    ("negative max_tokens", GOOD, {"max_tokens": "-5"}, 400, "max_tokens"),
    ("max_tokens not a number", GOOD, {"max_tokens": "1e9"}, 400, "max_tokens"),
    ("client-chosen model", GOOD, {"model": "/etc/passwd"}, 400, "'model'"),
    ("client-chosen device", GOOD, {"device": "cuda:7"}, 400, "'device'"),
    ("url instead of a file", {"trimap": TRIMAP}, {"image": "http://169.254.169.254/latest"}, 400, "file"),
    ("image twice", [("image", IMAGE), ("image", IMAGE), ("trimap", TRIMAP)], {}, 400, "more than once"),
    ("colour palette trimap", {"image": IMAGE, "trimap": _palette_trimap()}, {}, 400, "palette"),
    ("truncated background", {**GOOD, "background": IMAGE[:200]}, {"output": "composite"}, 400, "background"),
    ("too many fields", GOOD, {f"x{i}": "1" for i in range(20)}, 400, "form"),
]


@pytest.mark.parametrize(
    "files, data, status, words", [case[1:] for case in HOSTILE], ids=[case[0] for case in HOSTILE]
)
def test_hostile_input_gets_a_json_error_naming_it(server, files, data, status, words):
    response = post(server, files=files, data=data)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert words.lower() in response.json()["error"].lower()
    assert "Traceback" not in response.text
    with server.client() as c:
        assert c.get("/healthz").json()["status"] == "ok"


def _raw(server, head: bytes, body_parts, pause=0.0, read_timeout=20.0) -> tuple[int, dict]:
    """Send a request by hand; the status and JSON body of the answer."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=read_timeout) as s:
        s.sendall(head)
        for part in body_parts:
            try:
                s.sendall(part)
            except OSError:  # the server answered and closed early
                break
            time.sleep(pause)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    head_text, _, body = answer.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head_text.lower():
        body = body.split(b"\r\n", 1)[1].rsplit(b"\r\n0\r\n", 1)[0]
    return int(head_text.split()[1]), json.loads(body.decode().strip())


def test_over_cap_upload_is_refused_by_its_declared_length(server):
    response = post(server, files={"image": b"\0" * (2 << 20), "trimap": TRIMAP})
    assert response.status_code == 413 and "--max-upload-mb" in response.json()["error"]


def test_over_cap_upload_is_refused_while_it_streams(server):
    head = (
        b"POST /v1/matte HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
    )
    part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="i"\r\n\r\n'
    chunks = [b"%x\r\n%s\r\n" % (len(part), part)] + [b"10000\r\n" + b"\0" * 0x10000 + b"\r\n"] * 40
    status, body = _raw(server, head, chunks)
    assert status == 413 and "--max-upload-mb" in body["error"]


def test_a_slow_client_is_cut_off_at_the_timeout(server):
    head = (
        b"POST /v1/matte HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
    )
    start = time.monotonic()
    status, body = _raw(server, head, [b"--b\r\n"] + [b"x"] * 24, pause=0.25)
    assert status == 408 and "did not arrive" in body["error"]
    assert time.monotonic() - start < 12


@pytest.mark.parametrize(
    "content_type, body, status",
    [
        ("application/json", b'{"image": "http://example.com/a.png"}', 415),
        ("multipart/form-data", b"--x\r\n\r\n", 400),  # no boundary
        ("multipart/form-data; boundary=zz", b"garbage without any boundary", 400),
    ],
    ids=["json body", "multipart without boundary", "multipart without parts"],
)
def test_bodies_that_are_not_forms(server, content_type, body, status):
    response = post(server, content=body, headers={"content-type": content_type})
    assert response.status_code == status, response.text
    assert response.json()["error"]
    with server.client() as c:
        assert c.get("/healthz").status_code == 200


def test_unknown_paths_and_methods_answer_json(server):
    with server.client() as c:
        assert c.get("/v1/matte").status_code == 405 and "error" in c.get("/v1/matte").json()
        assert c.get("/admin").status_code == 404 and "error" in c.get("/admin").json()


def test_a_client_that_goes_away_has_its_work_dropped(server):
    size = (768, 768)  # long enough to matte that the client leaves while the model works on it
    body = httpx.Request(
        "POST",
        server.url + "/v1/matte",
        files={"image": png_bytes(photo(*size), format="JPEG", quality=90), "trimap": png_bytes(trimap(*size))},
    )
    body.read()
    head = (
        b"POST /v1/matte HTTP/1.1\r\nHost: x\r\n"
        + b"".join(f"{k}: {v}\r\n".encode() for k, v in body.headers.items() if k.lower() != "host")
        + b"\r\n"
    )
    host, port = server.url.removeprefix("http://").split(":")
    with server.client() as c:
        dropped = _count(c.get("/metrics").text, "499")
        with socket.create_connection((host, int(port))) as s:
            s.sendall(head + body.content)
            for _ in range(250):  # until the model works on it
                if working := c.get("/healthz").json()["in_progress"]:
                    break
                time.sleep(0.02)
        assert working, "the request never reached the model"
        for _ in range(100):
            if _count(c.get("/metrics").text, "499") > dropped:
                break
            time.sleep(0.05)
        assert _count(c.get("/metrics").text, "499") == dropped + 1
        assert c.get("/healthz").json()["status"] == "ok"
        assert post(server, files=GOOD).status_code == 200


def _count(metrics: str, status: str) -> float:
    line = next((l for l in metrics.splitlines() if l.startswith(f'mematte_requests_total{{status="{status}"}}')), None)
    return float(line.split()[-1]) if line else 0.0


def test_past_the_timeout_the_answer_is_504_and_the_work_is_dropped(server):
    size = (3072, 3072)  # well over 4 s of matting on a CPU, against the fixture's --timeout 4
    files = {"image": png_bytes(np.zeros((*size, 3), np.uint8)), "trimap": png_bytes(np.full(size, 128, np.uint8))}
    start = time.monotonic()
    response = post(server, files=files)
    assert response.status_code == 504 and "timeout" in response.json()["error"]
    assert time.monotonic() - start < 4 + 2
    assert post(server, files=GOOD).status_code == 200  # the model's thread is free again


def test_cors_is_off_without_cors_origin(server):
    with server.client() as c:
        answer = c.options(
            "/v1/matte", headers={"Origin": "http://example.test", "Access-Control-Request-Method": "POST"}
        )
    assert "access-control-allow-origin" not in answer.headers


# ---------------------------------------------------------------------- load


def test_load_64_clients_get_200_or_503_and_memory_stays_within_admission(checkpoint):
    import torch

    from mematte import FastMEMatte
    from mematte.api import resolve_dtype
    from mematte.serve.app import request_memory
    from mematte.serve.worker import MAX_BATCH

    size = (128, 160)
    image, guide = png_bytes(photo(*size)), png_bytes(trimap(*size))
    timeout = 30.0
    with serve_helpers.running(checkpoint, "--queue", "8", "--timeout", str(timeout), "--max-pixels", "0") as server:
        with server.client(timeout=timeout) as c:  # warm: the first call's one-off costs are no request's
            alone = c.post("/v1/matte", files={"image": image, "trimap": guide})
            assert alone.status_code == 200
            # the memory check: a header whose image needs more than this machine has
            huge = c.post("/v1/matte", files={"image": png_header_only(60000, 60000), "trimap": guide})
            assert huge.status_code == 413 and "GiB free" in huge.json()["error"]
        idle, _ = server.resident()
        server.reset_peak()
        health, stop = [], threading.Event()

        def watch():
            with server.client(timeout=5) as c:
                while not stop.is_set():
                    health.append(c.get("/healthz").status_code)
                    time.sleep(0.1)

        def client(index):
            answers = []
            with server.client(timeout=timeout + 10) as c:
                for _ in range(3):
                    start = time.monotonic()
                    response = c.post("/v1/matte", files={"image": image, "trimap": guide})
                    answers.append((response.status_code, time.monotonic() - start, response.headers))
                    if response.status_code == 200:  # matted alone or in a batch: the same bytes
                        assert response.content == alone.content
            return answers

        watcher = threading.Thread(target=watch)
        watcher.start()
        with ThreadPoolExecutor(64) as pool:
            answers = [a for client_answers in pool.map(client, range(64)) for a in client_answers]
        stop.set()
        watcher.join()
        _, peak = server.resident()
        with server.client() as c:
            assert c.get("/healthz").json()["queue_depth"] == 0
            metrics = c.get("/metrics").text
        batched = [line for line in metrics.splitlines() if line.startswith('mematte_batch_size_bucket{le="1.0"}')]
        all_batches = [line for line in metrics.splitlines() if line.startswith("mematte_batch_size_count")]
        assert float(batched[0].split()[-1]) < float(all_batches[0].split()[-1])  # some batches had several images

    statuses = [status for status, _, _ in answers]
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 8 and statuses.count(503) >= 1
    assert max(seconds for _, seconds, _ in answers) < timeout
    assert all(int(headers["retry-after"]) >= 1 for status, _, headers in answers if status == 503)
    assert health and set(health) == {200}
    model = FastMEMatte("vit_s", dtype=resolve_dtype("auto", torch.device("cpu")))
    budget = MAX_BATCH * request_memory(model, *size, "alpha")
    # at most MAX_BATCH images are matted together: the peak grows by at most their
    # predicted memory (within the estimate's 25 %), plus the buffers of 64 open connections
    assert peak - idle <= 1.25 * budget + (32 << 20), (peak - idle, budget)


# ---------------------------------------------------------------------- SIGTERM, API key


def test_sigterm_finishes_the_request_in_flight_and_exits_0(vitmatte_checkpoint):
    size = (512, 512)
    image, guide = png_bytes(photo(*size)), png_bytes(trimap(*size))
    server = serve_helpers.start(vitmatte_checkpoint, "--timeout", "60")
    try:
        with server.client() as c:  # a ViTMatte checkpoint is served as well
            assert c.get("/healthz").json()["model"] == "FastViTMatte(vit_s)"
        answer = []
        request = threading.Thread(target=lambda: answer.append(post(server, files={"image": image, "trimap": guide})))
        request.start()
        with server.client() as c:  # wait until the model works on it
            for _ in range(200):
                if c.get("/healthz").json()["in_progress"]:
                    break
                time.sleep(0.05)
            else:
                pytest.fail("the request never reached the model")
        status = serve_helpers.stop(server, timeout=120)
        request.join(60)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    assert answer and answer[0].status_code == 200
    assert Image.open(io.BytesIO(answer[0].content)).size == size[::-1]
    assert status == 0, "".join(server.log)


def test_binding_off_loopback_needs_a_key(checkpoint):
    done = subprocess.run(
        [sys.executable, "-m", "mematte", "serve", "--checkpoint", str(checkpoint), "--host", "0.0.0.0", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "--api-key-env" in done.stderr
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mematte",
            "serve",
            "--checkpoint",
            str(checkpoint),
            "--host",
            "0.0.0.0",
            "--api-key-env",
            "MEMATTE_TEST_UNSET_KEY",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in __import__("os").environ.items() if k != "MEMATTE_TEST_UNSET_KEY"},
    )
    assert done.returncode == 2 and "unset or empty" in done.stderr


def test_the_api_key_is_enforced_on_0_0_0_0(checkpoint):
    key = "s3cret-key-for-tests"
    with serve_helpers.running(
        checkpoint,
        "--host",
        "0.0.0.0",
        "--api-key-env",
        "MEMATTE_TEST_KEY",
        "--cors-origin",
        "http://allowed.test",
        env={"MEMATTE_TEST_KEY": key},
    ) as server:
        with server.client() as c:  # --cors-origin allows that origin, and no other
            for origin, allowed in (("http://allowed.test", True), ("http://other.test", False)):
                answer = c.options("/v1/matte", headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
                assert (answer.headers.get("access-control-allow-origin") == origin) == allowed, origin
        for headers in (
            {},
            {"X-API-Key": "wrong"},
            {"Authorization": "Bearer " + key[:-1]},
            {"Authorization": "Basic " + key},
        ):
            response = post(server, files=GOOD, headers=headers)
            assert response.status_code == 401 and "API key" in response.json()["error"], headers
        with server.client() as c:
            assert c.get("/metrics").status_code == 401
            assert c.get("/metrics", headers={"X-API-Key": key}).status_code == 200
            assert c.get("/healthz").json()["api_key_required"] is True
        for headers in ({"X-API-Key": key}, {"Authorization": "Bearer " + key}):
            assert post(server, files=GOOD, headers=headers).status_code == 200


def test_importing_mematte_and_serve_help_import_no_server_library():
    code = (
        "import sys, mematte; from mematte.cli import main; main(['serve', '--help']); "
        "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'prometheus_client', 'torch') "
        "if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=serve_helpers.ROOT
    )
    assert done.returncode == 0, done.stderr
    assert "POST /v1/matte" in done.stdout and done.stdout.splitlines()[-1] == "[]"
