"""ASGI middlewares that answer before the app: body size, Host and Origin."""

from __future__ import annotations

import json
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import Settings
from .errors import RequestTooLarge, ServiceError

_UPLOAD_PATH = re.compile(r"/v1/sessions/[^/]+/files/?")
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
_LOOPBACK_ORIGIN = re.compile(r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?")


async def send_error(send: Send, error: ServiceError) -> None:
    """An OpenAI-shaped error response, straight on the ASGI channel."""
    body = json.dumps(error.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [(b"content-type", b"application/json"), (b"x-should-retry", b"false")],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Refuses request bodies over `limit` bytes with 413, before the app sees them.

    A declared `Content-Length` is checked at once; a chunked body is read up to the
    limit first, so the app never half-parses one (FastAPI would turn an error raised
    while it reads into a 400).
    """

    def __init__(self, app: ASGIApp, limit: int, upload_limit: int | None = None) -> None:
        self.app = app
        self.limit = limit
        self.upload_limit = upload_limit or limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        upload = scope.get("method") == "POST" and _UPLOAD_PATH.fullmatch(scope.get("path", ""))
        limit = self.upload_limit if upload else self.limit
        what = "upload" if upload else "request body"
        too_large = RequestTooLarge(
            f"{what} exceeds {limit:,} bytes"
            + (" (AGENT_MAX_UPLOAD_BYTES)" if upload else " (AGENT_MAX_REQUEST_BYTES)")
        )
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await send_error(send, too_large)
            return
        if upload:
            # Streamed to the route, never buffered here: counted, and cut off past the limit
            # by an error the route's form parsing lets through (the app answers 413).
            received = 0

            async def counted() -> Message:
                nonlocal received
                message = await receive()
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large
                return message

            await self.app(scope, counted, send)
            return
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.limit:
                await send_error(send, too_large)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then disconnect notices, as the server sends them

        await self.app(scope, replay, send)


class HostOriginGuard:
    """Refuses foreign Host headers (421) and browser Origins (403): DNS rebinding.

    Without it a web page could reach this loopback service through a rebound name
    and run code in a kernel; kernel_mcp guards its port the same way.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.hosts = _LOOPBACK_HOSTS | {h.lower() for h in settings.allowed_hosts}
        if settings.host not in ("0.0.0.0", "::"):
            self.hosts.add(settings.host.lower())
        self.origins = {o.rstrip("/").lower() for o in settings.allowed_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        host = headers.get(b"host", b"").decode("latin-1").lower()
        name = host[1 : host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
        origin = headers.get(b"origin", b"").decode("latin-1").rstrip("/").lower()
        error: ServiceError | None = None
        if "*" not in self.hosts and name not in self.hosts:
            error = ServiceError(
                f"Host {host!r} is not served here; add it to AGENT_ALLOWED_HOSTS",
                code="host_not_allowed",
            )
            error.status = 421
        elif origin and not _LOOPBACK_ORIGIN.fullmatch(origin) and origin not in self.origins:
            error = ServiceError(
                f"Origin {origin!r} is not allowed; add it to AGENT_ALLOWED_ORIGINS",
                code="origin_not_allowed",
            )
            error.status = 403
        if error is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await send_error(send, error)
        else:
            await send({"type": "websocket.close", "code": 1008})
