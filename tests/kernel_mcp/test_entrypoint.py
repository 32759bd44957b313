"""`python -m kernel_mcp` as users run it: HTTP with clean SIGTERM, and stdio."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from fastmcp import Client
from fastmcp.client.transports import StdioTransport, StreamableHttpTransport

from .conftest import free_port

pytestmark = pytest.mark.kernel


def _env(short_tmp: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "KERNEL_MCP_WORKSPACE": str(short_tmp / "ws"),
        "KERNEL_MCP_RUNTIME_DIR": str(short_tmp / "rt"),
        "KERNEL_MCP_POOL_SIZE": "1",
        **extra,
    }


async def test_http_server_serves_and_sigterm_stops_every_kernel(short_tmp: Path) -> None:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "kernel_mcp"],
        env=_env(short_tmp, KERNEL_MCP_PORT=str(port)),
        stderr=subprocess.PIPE,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            deadline = time.monotonic() + 60
            while True:
                assert server.poll() is None, server.stderr.read().decode() if server.stderr else ""
                assert time.monotonic() < deadline, "kernel_mcp did not start"
                try:
                    if (await http.get("/health")).json()["pool_ready"] == 1:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
        transport = StreamableHttpTransport(
            f"http://127.0.0.1:{port}/mcp", headers={"X-Session-Id": "entry"}
        )
        async with Client(transport) as client:
            await client.call_tool("execute_code", {"code": "v = 3"})
            result = await client.call_tool("execute_code", {"code": "v * 14"})
            assert result.content[0].text == "42"
        kernels = psutil.Process(server.pid).children(recursive=True)
        assert len(kernels) >= 2, "the session kernel and a refilled pool kernel"
        server.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught.
        assert server.wait(timeout=20) in (0, -signal.SIGTERM)
        assert server.stderr is not None
        assert "session manager closed" in server.stderr.read().decode()
    finally:
        if server.poll() is None:
            server.kill()
    _gone, alive = psutil.wait_procs(kernels, timeout=5)
    assert alive == [], "kernels outlived the server"
    assert not list((short_tmp / "rt" / "kernels").iterdir()), "connection files are removed"


async def test_stdio_server_keeps_state(short_tmp: Path) -> None:
    transport = StdioTransport(
        command=sys.executable,
        args=["-m", "kernel_mcp", "--stdio", "--log-level", "warning"],
        env=_env(short_tmp, KERNEL_MCP_POOL_SIZE="0"),
    )
    async with Client(transport) as client:
        await client.call_tool("execute_code", {"code": "import os\nname = 'stdio'"})
        result = await client.call_tool("execute_code", {"code": "name.upper()"})
        assert result.content[0].text == "'STDIO'"
        info = await client.call_tool("kernel_info", {})
        assert info.structured_content["session_id"] == "stdio"
