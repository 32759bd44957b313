"""agent_service's MCP client: one kept connection per session, reconnecting after a
restart of kernel_mcp, typed results, and tools offered to the model without handles."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from agent_service.config import Settings as AgentSettings
from agent_service.errors import KernelServiceError
from agent_service.kernel_client import KernelClient
from kernel_agent_pytest import KernelMcpServer

pytestmark = pytest.mark.kernel


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary folder: IPC socket paths must stay under ~100 bytes."""
    path = Path(tempfile.mkdtemp(prefix="ka-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def kernel_service(kernel_mcp_server_factory: Callable[..., KernelMcpServer]) -> KernelMcpServer:
    """kernel_mcp on a fixed port that can be stopped and started again (the plugin's)."""
    return kernel_mcp_server_factory(pool_size=0, interrupt_grace=1.0)


@pytest.fixture
async def client(kernel_service: KernelMcpServer, short_tmp: Path) -> AsyncIterator[KernelClient]:
    settings = AgentSettings(mcp_url=kernel_service.url, data_dir=short_tmp / "data")
    kernels = KernelClient(settings)
    yield kernels
    await kernels.aclose()


async def test_one_kept_connection_per_session(client: KernelClient) -> None:
    for n in range(3):  # three turns
        async with client.session("kept") as kernel:
            tools = await kernel.openai_tools()
            outcome = await kernel.call("execute_code", {"code": f"x = {n}; x"})
            assert outcome.result is not None
            assert outcome.result.status == "ok"
    async with client.session("other") as kernel:
        await kernel.call("execute_code", {"code": "1"})
    assert client.stats() == {"connections": 2, "opened": 2}
    names = {t["function"]["name"] for t in tools}
    assert "new_session" not in names
    assert "shutdown_kernel" not in names
    execute = next(t for t in tools if t["function"]["name"] == "execute_code")
    assert "session" not in execute["function"]["parameters"]["properties"]
    assert "code" in execute["function"]["parameters"]["properties"]
    refused = await client.call("kept", "new_session", {})
    assert refused.is_error


async def test_reconnects_when_kernel_mcp_restarts(
    client: KernelClient, kernel_service: KernelMcpServer
) -> None:
    async with client.session("s1") as kernel:
        before = await kernel.call("execute_code", {"code": "kept = 1"})
    assert before.result is not None
    kernel_service.stop()
    kernel_service.start()  # same port, a new process state: new kernels
    async with client.session("s1") as kernel:
        after = await kernel.call("execute_code", {"code": "'kept' in globals()"})
    assert after.result is not None
    assert after.text == "False"
    assert after.result.incarnation != before.result.incarnation, "the change is detectable"
    assert client.stats()["opened"] == 1, "the kept connection carried on"
    kernel_service.stop()
    async with client.session("s1") as kernel:
        with pytest.raises(KernelServiceError):
            await kernel.call("execute_code", {"code": "1"})
    kernel_service.start()
    async with client.session("s1") as kernel:
        back = await kernel.call("execute_code", {"code": "6 * 7"})
        info = await kernel.call("kernel_info", {})
    assert back.text == "42"
    assert back.result is not None
    assert info.structured is not None
    assert info.structured["incarnation"] == back.result.incarnation
    assert client.stats() == {"connections": 1, "opened": 2}
