"""Sessions for every client: handles (protocol 2026-07-28), header and MCP-session precedence,
the typed result, and the kernel incarnation, through the official SDK and fastmcp's client."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import time
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

import httpx
import pytest
from fastmcp import Client
from fastmcp.client.transports import StreamableHttpTransport
from fastmcp.exceptions import ToolError

from kernel_schema import ExecuteResult, KernelInfoResult, typed_outputs

from .mcp_clients import gone, sdk_client

pytestmark = pytest.mark.kernel


def text(result: Any) -> str:
    return str(result.content[0].text)


async def execute(client: Any, code: str, **args: Any) -> ExecuteResult:
    """Run code through the official SDK client and validate the typed result."""
    result = await client.call_tool("execute_code", {"code": code, **args})
    assert not result.is_error, text(result)
    return ExecuteResult.model_validate(result.structured_content)


async def test_sdk_default_mode_keeps_state_through_a_handle(
    serve_http: Callable[..., Any],
) -> None:
    base = serve_http()
    async with sdk_client(base) as client:
        assert client.protocol_version == "2026-07-28"
        minted = await client.call_tool("new_session", {})
        handle = minted.structured_content["session"]
        assert handle in text(minted)
        first = await execute(client, "kept = 41", session=handle)
        assert first.session == handle
        assert not first.session_created
    async with sdk_client(base) as client:  # a new connection, the same session
        again = await execute(client, "print(kept + 1)", session=handle)
        assert again.outputs[0]["text"] == "42\n"
        assert again.incarnation == first.incarnation


async def test_a_call_without_a_handle_runs_and_names_its_handle(
    serve_http: Callable[..., Any],
) -> None:
    base = serve_http()
    async with sdk_client(base) as client:
        result = await client.call_tool("execute_code", {"code": "value = 'mine'; 6 * 7"})
        typed = ExecuteResult.model_validate(result.structured_content)
        assert typed.status == "ok"
        assert typed.session_created
        assert typed.session is not None
        assert f'session="{typed.session}"' in text(result)
        later = await execute(client, "value", session=typed.session)
        assert later.outputs[0]["data"]["text/plain"] == "'mine'"
        other = await execute(client, "'value' in globals()")
        assert other.session != typed.session
        assert other.outputs[0]["data"]["text/plain"] == "False"


async def test_guessed_handles_reach_nothing(serve_http: Callable[..., Any]) -> None:
    base = serve_http()
    async with sdk_client(base, headers={"X-Session-Id": "victim"}) as client:
        await execute(client, "secret = 'x'")
    async with sdk_client(base) as client:
        for guess in ("victim", "s-" + secrets.token_urlsafe(24), "stdio", "../victim"):
            result = await client.call_tool("execute_code", {"code": "secret", "session": guess})
            assert result.is_error
            assert "Unknown session handle" in text(result)
            assert "new_session" in text(result)
            refused = await client.call_tool("read_file", {"path": "x", "session": guess})
            assert refused.is_error


async def test_header_wins_and_another_sessions_handle_is_refused(
    serve_http: Callable[..., Any],
) -> None:
    base = serve_http()
    async with sdk_client(base) as client:
        handle = (await client.call_tool("new_session", {})).structured_content["session"]
        await execute(client, "theirs = 1", session=handle)
    async with sdk_client(base, headers={"X-Session-Id": "agent-1"}) as client:
        refused = await client.call_tool("execute_code", {"code": "theirs", "session": handle})
        assert refused.is_error
        assert "X-Session-Id" in text(refused)
        assert "refused" in text(refused)
        assert (await client.call_tool("new_session", {})).is_error
        own = await execute(client, "mine = 2", session="agent-1")  # naming itself is fine
        assert own.session is None
        assert own.status == "ok"


async def test_legacy_mode_keys_on_the_mcp_session_and_refuses_handles(
    serve_http: Callable[..., Any],
) -> None:
    base = serve_http()
    async with sdk_client(base) as client:
        handle = (await client.call_tool("new_session", {})).structured_content["session"]
    async with sdk_client(base, mode="legacy") as client:
        assert client.protocol_version == "2025-11-25"
        assert client.server_info.version == version("kernel-agent")
        await execute(client, "x = 3")
        assert (await execute(client, "x * 2")).outputs[0]["data"]["text/plain"] == "6"
        refused = await client.call_tool("execute_code", {"code": "1", "session": handle})
        assert refused.is_error
        assert "MCP session" in text(refused)
        minted = await client.call_tool("new_session", {})
        assert minted.is_error
        assert "already has its session" in text(minted)


async def test_output_schema_is_listed_and_real_results_follow_it(
    serve_http: Callable[..., Any],
) -> None:
    base = serve_http()
    async with sdk_client(base, headers={"X-Session-Id": "typed"}) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        schema = tools["execute_code"].output_schema
        assert schema is not None
        assert set(ExecuteResult.model_fields) <= set(schema["properties"])
        assert {"incarnation", "kernel_id", "kernel_generation"} <= set(schema["required"]) | set(
            schema["properties"]
        )
        assert "session" in tools["execute_code"].input_schema["properties"]
        # The SDK validates every structured result against the schema itself.
        failed = await execute(client, "1 / 0")
        assert failed.status == "error"
        assert failed.error is not None
        assert failed.error.ename == "ZeroDivisionError"
        assert typed_outputs(failed.outputs)[-1].output_type == "error"
        slow = await execute(client, "import time; time.sleep(30)", timeout=1)
        assert slow.status == "timeout_interrupted"
        assert slow.message
        plot = await execute(
            client, "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2]); plt.show()"
        )
        assert "image/png" in plot.outputs[0]["data"]
        info = await client.call_tool("kernel_info", {})
        typed = KernelInfoResult.model_validate(info.structured_content)
        assert typed.incarnation == plot.incarnation


async def test_incarnation_changes_whenever_the_kernel_is_replaced(
    serve_http: Callable[..., Any],
) -> None:
    base = serve_http()
    headers = {"X-Session-Id": "lives"}
    async with sdk_client(base, headers=headers) as client:
        first = await execute(client, "a = 1")
        assert first.incarnation == f"{first.kernel_id}.{first.kernel_generation}"
        assert (await execute(client, "a")).incarnation == first.incarnation
        await client.call_tool("restart_kernel", {})
        restarted = await execute(client, "b = 1")
        assert restarted.kernel_id == first.kernel_id
        assert restarted.incarnation != first.incarnation
        pid = (await client.call_tool("kernel_info", {})).structured_content["pid"]
        os.kill(pid, signal.SIGKILL)
        died = await execute(client, "c = 1")
        assert died.status == "kernel_died"
        assert died.incarnation not in (first.incarnation, restarted.incarnation)
        await client.call_tool("shutdown_kernel", {})
        fresh = await execute(client, "d = 1")
        assert fresh.kernel_id != first.kernel_id
    other = serve_http()  # another kernel_mcp process, the same workspace and session
    async with sdk_client(other, headers=headers) as client:
        elsewhere = await execute(client, "'d' in globals()")
    assert elsewhere.outputs[0]["data"]["text/plain"] == "False"
    seen = {first.incarnation, restarted.incarnation, died.incarnation, fresh.incarnation}
    assert elsewhere.incarnation not in seen


async def test_idle_handles_expire_with_their_kernel(serve_http: Callable[..., Any]) -> None:
    base = serve_http(idle_timeout=2, cull_interval=0.2)
    async with sdk_client(base) as client:
        first = await execute(client, "kept = 1")
        handle = first.session
        pid = (await client.call_tool("kernel_info", {"session": handle})).structured_content["pid"]
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient() as http:
            while (await http.get(f"{base}/health")).json()["handles"] or not gone(pid):
                assert time.monotonic() < deadline, "the idle handle was not culled"
                await asyncio.sleep(0.1)
        result = await client.call_tool("execute_code", {"code": "kept", "session": handle})
        assert result.is_error
        assert "variables are gone" in text(result)


async def test_fastmcp_client_default_and_legacy(serve_http: Callable[..., Any]) -> None:
    base = serve_http()
    async with Client(StreamableHttpTransport(f"{base}/mcp")) as client:
        handle = (await client.call_tool("new_session", {})).structured_content["session"]
        await client.call_tool("execute_code", {"code": "n = 10", "session": handle})
        result = await client.call_tool("execute_code", {"code": "n + 1", "session": handle})
        assert ExecuteResult.model_validate(result.structured_content).session == handle
        assert result.content[0].text == "11"
        with pytest.raises(ToolError, match="Unknown session handle"):
            await client.call_tool("execute_code", {"code": "n", "session": "s-nope"})
    async with Client(StreamableHttpTransport(f"{base}/mcp"), mode="legacy") as client:
        await client.call_tool("execute_code", {"code": "m = 5"})
        assert (await client.call_tool("execute_code", {"code": "m"})).content[0].text == "5"
        with pytest.raises(ToolError, match="refused"):
            await client.call_tool("execute_code", {"code": "n", "session": handle})
