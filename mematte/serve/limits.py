"""Guards on the request body, applied while it streams in, before any parsing: a size
cap (413) and a deadline for the whole upload (408), so that neither a huge nor a slow
client can hold memory or a connection for long."""

from __future__ import annotations

import asyncio
import json
import time


class BodyTooLarge(Exception):
    pass


class BodyTooSlow(Exception):
    pass


class BodyLimits:
    """ASGI middleware: requests whose body exceeds ``max_bytes`` (by their Content-Length,
    or counted as the chunks arrive) get 413; bodies not complete within ``timeout``
    seconds get 408. Both as ``{"error": ...}``."""

    def __init__(self, app, max_bytes: int, timeout: float):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await _error(send, 413, self._too_large())
        deadline = time.monotonic() + self.timeout
        received, body_done = 0, False

        async def limited_receive():
            nonlocal received, body_done
            if body_done:  # after the body: only the disconnect notice is left to wait for
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
            except TimeoutError:
                raise BodyTooSlow(f"the request body did not arrive within {self.timeout:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self._too_large())
                body_done = not message.get("more_body", False)
            return message

        started = False

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except (BodyTooLarge, BodyTooSlow) as e:
            if started:
                raise
            await _error(send, 413 if isinstance(e, BodyTooLarge) else 408, str(e))

    def _too_large(self) -> str:
        return f"the request body is over the limit of {self.max_bytes / 2**20:g} MB (--max-upload-mb)"


async def _error(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
