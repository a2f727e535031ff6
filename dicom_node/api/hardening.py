"""HTTP hardening of every answer: security headers, no caching of data, a body size limit.

One pure ASGI middleware (no buffering of responses, streaming untouched):

* every response carries :data:`SECURITY_HEADERS` — a Content-Security-Policy that allows
  nothing but this origin (the dashboard's script and style are files; heatmaps are shown
  from ``blob:`` URLs the page makes of what it fetched with its token), no framing, no
  MIME sniffing, no referrer;
* answers under ``/api/``, ``/metrics``, ``/healthz`` and ``/openapi.json`` are
  ``Cache-Control: no-store`` (patient data must not stay in browser or proxy caches);
* a request body over ``[http] max_body_bytes`` is answered 413 before the application
  sees it: at once when ``Content-Length`` says so, else after reading at most that many
  bytes of a chunked body. A ``Content-Length`` that is not a number is 400.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
NO_STORE_PREFIXES = ("/api/",)
NO_STORE_PATHS = frozenset({"/metrics", "/healthz", "/openapi.json"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def no_store(path: str) -> bool:
    return path.startswith(NO_STORE_PREFIXES) or path in NO_STORE_PATHS


class _BodyTooLarge(Exception):
    pass


class HardeningMiddleware:
    """Headers on every answer and the body limit (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        cache = no_store(scope["path"])

        async def send_hardened(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
                if cache:
                    headers["Cache-Control"] = "no-store"
                    headers["Pragma"] = "no-cache"
            await send(message)

        declared = Headers(scope=scope).get("content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await _problem(send_hardened, 400, "invalid Content-Length")
                return
            if length > self.max_body_bytes:
                await _problem(send_hardened, 413, self._too_large())
                return
        elif scope["method"] in BODY_METHODS:
            try:
                receive = await self._buffered(receive)
            except _BodyTooLarge:
                await _problem(send_hardened, 413, self._too_large())
                return
        await self.app(scope, receive, send_hardened)

    async def _buffered(self, receive: Receive) -> Receive:
        """Read a body of unknown length, refusing it past the limit; replay it after."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client went away: let the application see it
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body_bytes:
                raise _BodyTooLarge
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replay: list[Message] = [{"type": "http.request", "body": b"".join(chunks)}]
        if message["type"] != "http.request":
            replay = [message]

        async def replayed() -> Message:
            return replay.pop(0) if replay else await receive()

        return replayed

    def _too_large(self) -> str:
        return f"request body larger than {self.max_body_bytes} bytes"


async def _problem(send: Send, code: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers: list[tuple[bytes, bytes]] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    start: dict[str, Any] = {"type": "http.response.start", "status": code, "headers": headers}
    await send(start)
    await send({"type": "http.response.body", "body": body})
