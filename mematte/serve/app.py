"""The HTTP application: admission (key, form, formats, sizes, memory) on the event loop,
matting on the model's thread with same-size images batched (:mod:`.worker`), everything
answered as PNG or as JSON ``{"error": ...}``."""

from __future__ import annotations

import hmac
import logging
import shutil
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import UnidentifiedImageError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from .. import io
from ..model import check_max_tokens
from .limits import BodyLimits, BodyTooLarge, BodyTooSlow
from .worker import MAX_BATCH, Cancelled, Job, Matter, QueueFull

log = logging.getLogger("mematte.serve")

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP")  # Pillow's names
# How each allowed format's files start, to tell a damaged file from a foreign one.
SIGNATURES = {
    "PNG": lambda b: b.startswith(b"\x89PNG\r\n\x1a\n"),
    "JPEG": lambda b: b.startswith(b"\xff\xd8\xff"),
    "WEBP": lambda b: b.startswith(b"RIFF") and b[8:12] == b"WEBP",
    "TIFF": lambda b: b[:4] in (b"II*\0", b"MM\0*"),
    "BMP": lambda b: b.startswith(b"BM"),
}
FILE_FIELDS = ("image", "trimap", "mask", "background")
TEXT_FIELDS = ("band", "output", "bits", "max_tokens")
OUTPUTS = ("alpha", "rgba", "composite")
MAX_BAND = 1024
# Bytes per pixel a request holds besides the model call (decoded image and trimap, alpha,
# foreground colours, composite, PNG encoding), added to it as an upper bound: requests'
# measured peaks stay below the sum (docs/serving.md).
PIPELINE_BYTES_PER_PIXEL = {"alpha": 40, "rgba": 120, "composite": 150}
STATIC = resources.files(__package__) / "static"
# The page may use nothing but itself.
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True)
class Settings:
    max_pixels: int | None = io.MAX_PIXELS
    max_upload_bytes: int = 64 * 2**20
    queue: int = 8
    timeout: float = 60.0
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    max_tokens: int | None = None
    tile: bool = True


class Refused(Exception):
    """A request answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def free_memory(device: torch.device) -> int:
    """Bytes the device can still give: on a GPU what CUDA reports free, on the CPU the
    kernel's MemAvailable (what can be allocated without swapping)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def request_memory(model, height: int, width: int, output: str) -> int:
    """Predicted peak bytes of one request of an height×width image: the model call
    (``model.estimate_memory``) and the pipeline around it."""
    return model.estimate_memory(height, width) + PIPELINE_BYTES_PER_PIXEL[output] * height * width


def create_app(model, settings: Settings, *, free_memory=free_memory):
    """The ASGI application serving ``model`` (one loaded FastMEMatte or FastViTMatte)."""
    device = model.pixel_mean.device
    registry = CollectorRegistry()
    batch_sizes = Histogram(
        "mematte_batch_size",
        "Images matted together in one forward pass",
        registry=registry,
        buckets=tuple(range(1, MAX_BATCH + 1)),
    )
    matter = Matter(
        model,
        queue=settings.queue,
        tile=settings.tile,
        max_pixels=settings.max_pixels,
        free_memory=lambda: free_memory(device),
        on_batch=batch_sizes.observe,
    )
    requests = Counter("mematte_requests", "Matting requests by HTTP status", ["status"], registry=registry)
    latency = Histogram(
        "mematte_request_seconds",
        "Time to answer a matting request",
        registry=registry,
        buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120),
    )
    depth = Gauge("mematte_queue_depth", "Requests waiting for the model", registry=registry)
    depth.set_function(lambda: matter.waiting)
    rejections = Counter(
        "mematte_rejections", "Requests refused before matting, by reason", ["reason"], registry=registry
    )

    @asynccontextmanager
    async def lifespan(app):
        yield
        matter.close()

    app = FastAPI(title="mematte", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key"],
        )

    @app.exception_handler(Refused)
    async def refused(request, e: Refused):
        return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        return JSONResponse({"error": "invalid request"}, status_code=400)

    @app.exception_handler(Exception)
    async def crashed(request, e: Exception):
        log.exception("internal error")
        return JSONResponse({"error": "internal error"}, status_code=500)

    def authorise(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("x-api-key") or ""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            given = token.strip()
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            rejections.labels("unauthorised").inc()
            raise Refused(
                401,
                "a valid API key is required (Authorization: Bearer KEY or X-API-Key: KEY)",
                {"WWW-Authenticate": "Bearer"},
            )

    @app.get("/healthz")
    async def healthz():
        return {
            "status": "ok",
            "model": f"{type(model).__name__}({model.variant})",
            "device": str(device),
            "dtype": str(model.dtype).removeprefix("torch."),
            "queue_depth": matter.waiting,
            "in_progress": matter.pending > 0,
            "queue_size": settings.queue,
            "api_key_required": settings.api_key is not None,
        }

    @app.get("/metrics")
    async def metrics(request: Request):
        authorise(request)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse((STATIC / "index.html").read_text(), headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/static/{name}")
    async def asset(name: str):
        types = {"app.js": "text/javascript", "style.css": "text/css"}
        if name not in types:  # a fixed list: no path from the client reaches the disk
            raise Refused(404, f"no asset {name!r}")
        return Response((STATIC / name).read_text(), media_type=types[name])

    @app.post("/v1/matte")
    async def matte(request: Request):
        start = time.monotonic()
        status = 500
        try:
            authorise(request)
            with tempfile.TemporaryDirectory(prefix="mematte-serve-") as folder:
                job = await _admit(request, Path(folder), model, settings, device, free_memory)
                try:
                    png = await matter.run(job, deadline=start + settings.timeout, gone=request.is_disconnected)
                except QueueFull as e:
                    raise Refused(503, str(e), {"Retry-After": str(e.retry_after)}) from None
                except TimeoutError:
                    raise Refused(
                        504,
                        f"matting took longer than the server's {settings.timeout:g} s timeout; the work was dropped",
                    ) from None
                except Cancelled:
                    raise Refused(499, "the client went away; the work was dropped") from None
                except (ValueError, OSError) as e:
                    raise Refused(400, _without_folder(str(e), folder)) from None
                except (MemoryError, torch.OutOfMemoryError):
                    raise Refused(
                        503, "the device ran out of memory for this image; retry later", {"Retry-After": "5"}
                    ) from None
            status = 200
            return Response(png, media_type="image/png")
        except Refused as e:
            status = e.status
            if status in (408, 413, 415, 503, 504):
                rejections.labels(
                    {408: "slow_upload", 413: "too_large", 415: "format", 503: "busy", 504: "timeout"}[status]
                ).inc()
            raise
        finally:
            requests.labels(str(status)).inc()
            latency.observe(time.monotonic() - start)

    return BodyLimits(app, settings.max_upload_bytes, settings.timeout)


async def _admit(request: Request, folder: Path, model, settings: Settings, device, free_memory) -> Job:
    """The request's files on disk and its options checked, or Refused saying what is wrong."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise Refused(415, "send multipart/form-data with an image and a trimap or mask file")
    try:
        form = await request.form(max_files=len(FILE_FIELDS), max_fields=len(TEXT_FIELDS), max_part_size=1024)
    except HTTPException as e:  # the multipart parser's own refusals
        raise Refused(400, f"unreadable form: {e.detail}") from None
    except BodyTooLarge as e:
        raise Refused(413, str(e)) from None
    except BodyTooSlow as e:
        raise Refused(408, str(e)) from None
    for name in form:
        if name not in FILE_FIELDS + TEXT_FIELDS:
            raise Refused(400, f"unknown field {name!r}; the fields are {', '.join(FILE_FIELDS + TEXT_FIELDS)}")
        if len(form.getlist(name)) > 1:
            raise Refused(400, f"field {name!r} is given more than once")
    files = {}
    for name in FILE_FIELDS:
        part = form.get(name)
        if part is None:
            continue
        if not isinstance(part, UploadFile):
            raise Refused(400, f"{name} must be a file, not a text field")
        files[name] = folder / name  # the client's file name is never used
        with open(files[name], "wb") as f:
            shutil.copyfileobj(part.file, f)
        if files[name].stat().st_size == 0:
            raise Refused(400, f"{name}: the file is empty")
    options = {name: form[name] for name in TEXT_FIELDS if name in form}
    for name, value in options.items():
        if not isinstance(value, str):
            raise Refused(400, f"{name} must be a text field, not a file")

    if "image" not in files:
        raise Refused(400, "missing field 'image': the photo to matte")
    if ("trimap" in files) == ("mask" in files):
        raise Refused(400, "give exactly one of the files 'trimap' or 'mask'")
    output = options.get("output", "alpha")
    if output not in OUTPUTS:
        raise Refused(400, f"output {output!r}: expected one of {', '.join(OUTPUTS)}")
    if (output == "composite") != ("background" in files):
        raise Refused(400, "output=composite needs a 'background' file, and a background is only used by it")
    bits = _whole(options, "bits", 8, 8, 16)
    if bits not in (8, 16):
        raise Refused(400, f"bits {bits}: expected 8 or 16")
    if bits == 16 and output != "alpha":
        raise Refused(400, "bits=16 applies to output=alpha only")
    band = _whole(options, "band", 10, 1, MAX_BAND)
    if "band" in options and "mask" not in files:
        raise Refused(400, "band applies to a mask only")
    max_tokens = None
    if "max_tokens" in options:
        if not hasattr(model, "max_tokens"):
            raise Refused(400, "max_tokens applies to MEMatte models; this server runs ViTMatte")
        max_tokens = _whole(options, "max_tokens", 0, 0, 2**31 - 1)
        check_max_tokens(max_tokens)

    sizes = {name: _header(name, path, settings.max_pixels) for name, path in files.items()}
    height, width = sizes["image"]
    need = request_memory(model, height, width, output)
    free = free_memory(device)
    if need > free:
        raise Refused(
            413,
            f"image: {width}×{height} needs about {need / 2**30:.1f} GiB to matte, but "
            f"the {device.type} has {free / 2**30:.1f} GiB free",
        )
    return Job(
        folder=folder,
        image=files["image"],
        trimap=files.get("trimap"),
        mask=files.get("mask"),
        background=files.get("background"),
        band=band,
        output=output,
        bits=bits,
        max_tokens=max_tokens,
        size=(height, width),
        need=need,
    )


def _whole(options: dict, name: str, default: int, least: int, most: int) -> int:
    if name not in options:
        return default
    text = options[name].strip()
    if not text.isdigit() or len(text) > 10:
        raise Refused(400, f"{name} {options[name][:40]!r}: expected a whole number")
    value = int(text)
    if not least <= value <= most:
        raise Refused(400, f"{name} {value}: must be between {least} and {most}")
    return value


def _header(name: str, path: Path, max_pixels: int | None) -> tuple[int, int]:
    """(height, width) from the file's header, its format allowed and its size within the
    pixel limit; nothing is decoded."""
    try:
        _, height, width = io.read_header(path, formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        with open(path, "rb") as f:
            start = f.read(12)
        claimed = next((fmt for fmt, magic in SIGNATURES.items() if magic(start)), None)
        if claimed:
            raise Refused(400, f"{name}: a truncated or corrupt {claimed} file (its header cannot be read)") from None
        raise Refused(415, f"{name}: not an image in an allowed format ({', '.join(ALLOWED_FORMATS)})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise Refused(400, f"{name}: unreadable image header ({e})") from None
    if max_pixels is not None and width * height > max_pixels:
        raise Refused(
            413,
            f"{name}: {width}×{height} is {width * height:,} pixels, over the server's "
            f"limit of {max_pixels:,} (--max-pixels)",
        )
    if width < 1 or height < 1:
        raise Refused(400, f"{name}: the image is empty ({width}×{height})")
    return height, width


def _without_folder(message: str, folder: str) -> str:
    """An error message with the request's temporary folder left out: files are named by
    their form field."""
    return message.replace(folder + "/", "").replace(folder, "")
