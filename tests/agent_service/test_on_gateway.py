"""The agent on kernels of a gateway: what it tells the model holds there too."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from kernel_agent_pytest.scripted_llm import Text, ToolCall
from tests.kernel_mcp.conftest import start_gateway  # noqa: F401 (the fixture)
from tests.kernel_mcp.gateways import ENTERPRISE_GATEWAY, Gateway

from .conftest import Stack
from .test_chat import stream_turn

pytestmark = pytest.mark.kernel


async def test_a_restart_between_turns_is_noted_on_a_gateway(
    start_gateway: Callable[..., Any],  # noqa: F811 (the fixture imported above)
    agent_factory: Callable[..., Stack],
) -> None:
    # (start_gateway first: the gateway stops after the stack's kernel_mcp.)
    # Gateway kernels have no pid here: a restart keeps the kernel id, only the
    # incarnation tells the old kernel from the new one.
    gateway: Gateway = await start_gateway(ENTERPRISE_GATEWAY)
    stack = agent_factory(kernel_mcp=gateway.settings())
    stack.llm.script(ToolCall("execute_code", {"code": "x = 41"}), Text("Set."))
    await stream_turn(stack, "gw-1", "set x")
    async with stack.kernel_mcp.client("gw-1", mode="legacy") as client:
        await client.call_tool("restart_kernel", {})
    stack.llm.script(ToolCall("execute_code", {"code": "print(x + 1)"}), Text("Gone."))
    content, _ = await stream_turn(stack, "gw-1", "x + 1?")
    assert "> **Note:** The session's kernel was replaced" in content, "the user is told"
    notes = [m for m in stack.llm.requests[2]["messages"] if "Note from the service" in str(m)]
    assert len(notes) == 1, "the model is told, in that turn"
