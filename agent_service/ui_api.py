"""The service's public HTTP API, as the web page calls it for one browser request.

Calls go to the socket the browser's request arrived on (never to a host a request names) with
the browser's Host header, so the links the service writes are ones the browser can open.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import html
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from .config import Settings

_SERVICE_IMAGE = re.compile(
    r"(!\[[^\]]*\]\()(https?://[^)\s]+/v1/sessions/[^)\s]+/outputs/[^)\s]+)\)"
)


class ApiError(Exception):
    """A call to the service failed; the message is meant for people (markdown-safe)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        # Messages such as "Bearer <key>" would otherwise be eaten as HTML tags.
        super().__init__(html.escape(message, quote=False))
        self.status = status


class ServiceApi:
    """The service's public HTTP API, called on behalf of one browser request.

    `request` is gradio's request of the page's event (its `.request` is the browser's), or
    None outside one: calls then go to the configured host and port.
    """

    def __init__(self, settings: Settings, request: Any, key: str) -> None:
        raw = getattr(request, "request", None)
        server = raw.scope.get("server") if raw is not None else None
        host, port = server or (settings.host, settings.port)
        host = f"[{host}]" if ":" in str(host) else host
        self.base = f"http://{host}:{port}"
        self.headers: dict[str, str] = {}
        if raw is not None:  # the service then writes links the browser can open
            self.headers["host"] = raw.headers.get("host", f"{host}:{port}")
            self.headers["x-forwarded-proto"] = raw.url.scheme
        self.keyed = bool(key.strip())
        if self.keyed:
            self.headers["authorization"] = f"Bearer {key.strip()}"
        self._long = httpx.Timeout(30.0, read=settings.mcp_timeout)

    @contextlib.asynccontextmanager
    async def _client(self, long: bool = False) -> AsyncIterator[httpx.AsyncClient]:
        try:
            async with httpx.AsyncClient(
                base_url=self.base,
                headers=self.headers,
                timeout=self._long if long else 30.0,
                trust_env=False,  # never route calls to ourselves through a proxy
            ) as client:
                yield client
        except httpx.TimeoutException as exc:
            raise ApiError("The service did not answer in time.") from exc
        except httpx.HTTPError as exc:
            raise ApiError(f"The connection to the service at {self.base} failed: {exc}") from exc

    async def call(
        self, method: str, path: str, *, long: bool = False, **kwargs: Any
    ) -> httpx.Response:
        async with self._client(long) as client:
            response = await client.request(method, path, **kwargs)
        check(response)
        return response

    async def download(self, path: str, target: Path) -> None:
        """GET `path` into the file `target`, streamed (session files may be large)."""
        async with self._client(long=True) as client, client.stream("GET", path) as response:
            if not response.is_success:
                await response.aread()
                check(response)
            with target.open("wb") as out:
                async for chunk in response.aiter_bytes(1024 * 1024):
                    await asyncio.to_thread(out.write, chunk)

    async def upload(self, sid: str, paths: list[Path]) -> list[dict[str, Any]]:
        """POST files into the session folder; the saved files as the service lists them."""
        with contextlib.ExitStack() as stack:
            parts = [("files", (p.name, stack.enter_context(p.open("rb")))) for p in paths]
            response = await self.call("POST", f"/v1/sessions/{sid}/files", files=parts, long=True)
        saved: list[dict[str, Any]] = response.json().get("data", [])
        return saved

    async def chat(self, sid: str, model: str, message: str) -> AsyncIterator[str]:
        """The content deltas of one streamed turn."""
        body = {"model": model, "stream": True, "messages": [{"role": "user", "content": message}]}
        async with (
            self._client(long=True) as client,
            client.stream(
                "POST", "/v1/chat/completions", json=body, headers={"x-session-id": sid}
            ) as response,
        ):
            if not response.is_success:
                await response.aread()
                check(response)
            async for line in response.aiter_lines():
                data = line.removeprefix("data:").strip()
                if not line.startswith("data:") or not data:
                    continue
                if data == "[DONE]":
                    return
                try:
                    chunk = json.loads(data)
                except ValueError as exc:
                    raise ApiError(f"The service sent a malformed event: {data[:80]}") from exc
                if "error" in chunk:
                    raise ApiError(_error_message(chunk, "the turn failed"))
                for choice in chunk.get("choices", []):
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        yield text

    async def inline_images(self, text: str, cache: dict[str, str]) -> str:
        """Image links as data URIs: with an API key the browser cannot load them itself."""
        for url in {m.group(2) for m in _SERVICE_IMAGE.finditer(text)} - cache.keys():
            response = await self.call("GET", httpx.URL(url).path)
            mime = response.headers.get("content-type", "image/png")
            cache[url] = f"data:{mime};base64,{base64.b64encode(response.content).decode()}"
        return _SERVICE_IMAGE.sub(lambda m: f"{m.group(1)}{cache.get(m.group(2), '')})", text)


def _error_message(body: Any, default: str) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    return str(error.get("message") or default) if isinstance(error, dict) else default


def check(response: httpx.Response) -> None:
    """Raise the service's OpenAI-shaped error as a sentence, with its status."""
    if response.is_success:
        return
    try:
        message = _error_message(response.json(), response.reason_phrase)
    except ValueError:
        message = response.text[:300] or response.reason_phrase
    hint = " Enter an API key under Settings." if response.status_code == 401 else ""
    raise ApiError(f"{message} (HTTP {response.status_code}).{hint}", response.status_code)
