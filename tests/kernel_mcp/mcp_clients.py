"""Real MCP clients for the tests: the official `mcp` SDK and fastmcp's client."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import psutil

SDK_TIMEOUT = 120.0


@contextlib.asynccontextmanager
async def sdk_client(
    base: str,
    *,
    headers: dict[str, str] | None = None,
    mode: str = "auto",
    max_sse_event_size: int | None = 1024 * 1024,
) -> AsyncIterator[Any]:
    """The official SDK's `Client` over streamable HTTP (default: its own defaults)."""
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    async with httpx2.AsyncClient(headers=headers or {}, timeout=SDK_TIMEOUT) as http:
        transport = streamable_http_client(
            f"{base}/mcp", http_client=http, max_sse_event_size=max_sse_event_size
        )
        async with Client(transport, mode=mode, read_timeout_seconds=SDK_TIMEOUT) as client:
            yield client


def gone(pid: int) -> bool:
    """The process has exited (or is a zombie awaiting its parent)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
