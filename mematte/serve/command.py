"""``mematte serve``: its command line (built without importing torch or FastAPI) and what
it runs."""

from __future__ import annotations

import argparse
import ipaddress

from ..cli import EXIT_OK, MAX_PIXELS, UsageError, _whole, add_model_options

SERVE_EPILOG = """\
endpoints:
  POST /v1/matte   multipart: image, and trimap or mask (files); band, output (alpha, rgba,
                   composite with a background file), bits (8, 16), max_tokens -> image/png
  GET  /healthz    model, device, dtype, queue depth (JSON)
  GET  /metrics    Prometheus text
  GET  /           a page to try it: upload or paint a trimap, see the alpha and the cutout

Safe by default: binds 127.0.0.1; any other address needs --api-key-env, whose key
clients send as "Authorization: Bearer KEY" or "X-API-Key: KEY". No URL inputs, no
client-chosen paths, models or devices; PNG, JPEG, WebP, TIFF and BMP only. Images are
admitted by their header: over --max-pixels, or needing more memory than the device has
free (model.estimate_memory), they get 413 before any decoding. A full queue gets 503
with Retry-After, a request past --timeout 504 (its work is dropped), a client that goes
away has its work cancelled. SIGTERM: stop accepting, finish the requests in flight (up
to --timeout), exit 0.

exit status: 0 stopped (SIGTERM), 1 the model could not be loaded, 2 usage error.
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve",
        help="matte over HTTP, with a page to try it",
        description="Serve one model over HTTP: POST /v1/matte returns the PNG that "
        "mematte predict writes for the same files.",
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: %(default)s); any non-loopback address needs --api-key-env",
    )
    p.add_argument("--port", type=_whole(0, "port", 65535), default=8000, help="(default: %(default)s)")
    p.add_argument(
        "--max-pixels",
        type=_whole(0, "pixels"),
        default=MAX_PIXELS,
        metavar="N",
        help="refuse images with more pixels (413), read from the header before "
        "decoding; 0: only the memory check (default: %(default)s, Pillow's limit)",
    )
    p.add_argument(
        "--max-upload-mb",
        type=_whole(1, "MB"),
        default=64,
        metavar="N",
        help="refuse request bodies over N MB (413) while they stream (default: %(default)s)",
    )
    p.add_argument(
        "--queue",
        type=_whole(1, "requests"),
        default=8,
        metavar="N",
        help="requests that may wait for the model; more get 503 (default: %(default)s)",
    )
    p.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=60.0,
        metavar="S",
        help="seconds a request may take, upload included: then 408 (upload) or "
        "504 (matting, whose work is dropped) (default: %(default)s)",
    )
    p.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="environment variable holding the API key that every /v1/matte and "
        "/metrics request must present (required off loopback)",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        metavar="ORIGIN",
        default=[],
        help="allow browser requests from ORIGIN (repeatable; default: none)",
    )
    add_model_options(p)
    p.set_defaults(run="mematte.serve.command:run_serve")
    return p


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} seconds: must be positive")
    return value


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def api_key(args: argparse.Namespace, environ) -> str | None:
    """The API key the server demands, or None; a usage error where one is needed and
    missing, so that no server ever listens off loopback unprotected."""
    if args.api_key_env is None:
        if not is_loopback(args.host):
            raise UsageError(
                f"--host {args.host} is reachable from other machines: give "
                "--api-key-env VAR, an environment variable holding the API key"
            )
        return None
    key = environ.get(args.api_key_env, "")
    if not key.strip():
        raise UsageError(f"--api-key-env {args.api_key_env}: the variable is unset or empty")
    return key


def run_serve(args: argparse.Namespace) -> int:
    import os
    import signal

    from ..cli import EXIT_FAILED
    from ..commands import _load, _require_checkpoint, _runtime

    _require_checkpoint(args)
    key = api_key(args, os.environ)
    device, dtype, backend = _runtime(args)
    model = _load(args, device, dtype, backend)
    if model is None:
        return EXIT_FAILED

    import uvicorn

    from .app import Settings, create_app

    settings = Settings(
        max_pixels=args.max_pixels or None,
        max_upload_bytes=args.max_upload_mb * 2**20,
        queue=args.queue,
        timeout=args.timeout,
        api_key=key,
        cors_origins=tuple(args.cors_origin),
        max_tokens=args.max_tokens,
        tile=args.tile,
    )
    app = create_app(model, settings)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        timeout_graceful_shutdown=args.timeout,
        log_level="info",
        access_log=False,
        server_header=False,
    )
    # uvicorn handles SIGTERM itself (stop accepting, finish in-flight requests) and then
    # re-raises it to the handler it found: make that one a no-op, so a stop exits 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.Server(config).run()
    return EXIT_OK
