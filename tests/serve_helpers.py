"""A real ``mematte serve`` in a subprocess on a free loopback port, for tests and the
benchmark."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: list[str]):
        self.proc, self.url, self.log = proc, url, log

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, **kwargs)

    def resident(self) -> tuple[int, int]:
        """(current, peak) resident bytes of the server process."""
        fields = dict(line.split(":", 1) for line in open(f"/proc/{self.proc.pid}/status"))
        return tuple(int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM"))

    def reset_peak(self) -> None:
        with open(f"/proc/{self.proc.pid}/clear_refs", "w") as f:
            f.write("5")


def start(checkpoint: Path, *args: str, env: dict | None = None, wait: float = 90.0) -> Server:
    """Start ``mematte serve --port 0`` and wait for it to listen; the port uvicorn chose is
    read from its log."""
    cmd = [sys.executable, "-m", "mematte", "serve", "--checkpoint", str(checkpoint), "--port", "0", *args]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment)
    log: list[str] = []
    found = threading.Event()
    url: list[str] = []

    def read():
        for line in proc.stdout:
            log.append(line)
            match = re.search(r"running on (http://[\d.]+:\d+)", line, re.IGNORECASE)
            if match and not found.is_set():
                url.append(match.group(1).replace("0.0.0.0", "127.0.0.1"))
                found.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + wait
    while not found.wait(0.1):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the server did not start:\n" + "".join(log))
    return Server(proc, url[0], log)


def stop(server: Server, timeout: float = 30.0) -> int:
    """SIGTERM, then the exit status."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
    try:
        return server.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        raise


@contextmanager
def running(checkpoint: Path, *args: str, env: dict | None = None):
    server = start(checkpoint, *args, env=env)
    try:
        yield server
    finally:
        stop(server)
