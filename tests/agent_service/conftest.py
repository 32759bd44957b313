"""The whole stack on 127.0.0.1: kernel_mcp and agent_service over real HTTP, a scripted LLM."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from openai import AsyncOpenAI

from agent_service.app import create_app
from agent_service.config import Settings as AgentSettings
from kernel_mcp.config import Settings as KernelSettings
from kernel_mcp.server import create_server
from tests.kernel_mcp.conftest import free_port
from tests.support.fake_llm import FakeLLM


class RunningServer:
    """A uvicorn server running as a task of the test's event loop."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(
                app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
            )
        )
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> RunningServer:
        self.task = asyncio.create_task(self.server.serve())
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert not self.task.done(), "the server failed to start"
            assert time.monotonic() < deadline, "the server did not start in 30 s"
            await asyncio.sleep(0.01)
        return self

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await asyncio.wait_for(self.task, 30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Stack:
    llm: FakeLLM
    kernel_mcp: RunningServer
    agent: RunningServer
    agent_settings: AgentSettings
    root: Path

    @property
    def base_url(self) -> str:
        return f"{self.agent.url}/v1"

    def client(self, **kwargs: Any) -> AsyncOpenAI:
        kwargs.setdefault("api_key", "unused")
        return AsyncOpenAI(base_url=self.base_url, **kwargs)

    async def restart_agent(self, **overrides: Any) -> None:
        """Stop the agent service and start a new one on the same data."""
        await self.agent.stop()
        settings = self.agent_settings.model_copy(update=overrides)
        self.agent = await RunningServer(create_app(settings)).start()


@pytest.fixture
async def start_stack() -> AsyncIterator[Callable[..., Any]]:
    """Factory: kernel_mcp + agent_service + FakeLLM; everything stopped after the test."""
    stacks: list[Stack] = []
    roots: list[Path] = []

    async def start(model: str | None = "hosted_vllm/fake", **agent_overrides: Any) -> Stack:
        root = Path(tempfile.mkdtemp(prefix="ka-"))
        roots.append(root)
        llm = FakeLLM()
        await llm.__aenter__()
        kernel_settings = KernelSettings(
            workspace=root / "ws", runtime_dir=root / "rt", pool_size=1, interrupt_grace=1.0
        )
        kernel_app = create_server(kernel_settings).http_app(
            path="/mcp", host_origin_protection=True
        )
        kernel = await RunningServer(kernel_app).start()
        values: dict[str, Any] = {
            "mcp_url": f"{kernel.url}/mcp",
            "model": model,
            "api_base": llm.base_url,
            "data_dir": root / "data",
            "notebooks_dir": root / "notebooks",
            "llm_retries": 2,
            "llm_timeout": 10,
        }
        values.update(agent_overrides)
        agent_settings = AgentSettings(**values)
        agent = await RunningServer(create_app(agent_settings)).start()
        stack = Stack(llm, kernel, agent, agent_settings, root)
        stacks.append(stack)
        return stack

    yield start
    for stack in stacks:
        await stack.agent.stop()
        await stack.kernel_mcp.stop()
        await stack.llm.__aexit__(None, None, None)
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def stack(start_stack: Callable[..., Any]) -> Stack:
    result: Stack = await start_stack()
    return result
