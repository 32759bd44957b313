"""The whole stack on 127.0.0.1 (the kernel_agent plugin's `agent_factory`), and agent_service
as a process of its own for the signal tests.

The agent's transcript store is SQLite, or PostgreSQL for tests marked `both_stores` (see
tests/conftest.py: `store_kind` and `database_url`).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI

from kernel_agent_pytest import AgentStack
from tests.kernel_mcp.conftest import free_port

# The stack's type under the name this suite's tests use.
Stack = AgentStack


@pytest.fixture
def start_stack(
    database_url: Callable[[], str | None], agent_factory: Callable[..., AgentStack]
) -> Callable[..., AgentStack]:
    """Factory: the plugin's whole stack with this suite's defaults; stopped after the test.

    Two provider retries and a 10 s model deadline (the retry and timeout tests rely on
    them), the web page on, interrupts given 1 s; transcripts in the test's store (a new
    database of its own on PostgreSQL). `database_url` comes first: set up before
    `agent_factory`, it is torn down after it, so a database is dropped only once the
    stacks on it have stopped.
    """

    def start(
        model: str | None = "hosted_vllm/fake",
        kernel_mcp: dict[str, Any] | None = None,
        **agent_overrides: Any,
    ) -> AgentStack:
        values: dict[str, Any] = {
            "model": model,
            "llm_retries": 2,
            "llm_timeout": 10,
            "ui": True,
            "database_url": database_url(),
            **agent_overrides,
        }
        return agent_factory(kernel_mcp={"interrupt_grace": 1.0, **(kernel_mcp or {})}, **values)

    return start


@pytest.fixture
def stack(start_stack: Callable[..., AgentStack]) -> AgentStack:
    return start_stack()


@dataclass
class AgentProcess:
    """`python -m agent_service` as its own process, for signals a test sends it."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs: Any) -> AsyncOpenAI:
        kwargs.setdefault("api_key", "unused")
        kwargs.setdefault("max_retries", 0)
        return AsyncOpenAI(base_url=f"{self.url}/v1", **kwargs)

    async def wait_exit(self, within: float = 60) -> int:
        code = await asyncio.to_thread(self.process.wait, within)
        return code

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
async def agent_process(
    stack: AgentStack, database_url: Callable[[], str | None]
) -> AsyncIterator[Callable[..., Any]]:
    """Factory: agent_service in a subprocess on the stack's kernel_mcp, LLM and data.

    On PostgreSQL its processes share a database of their own, apart from the stack's agent
    (as its own data folder is apart); `AGENT_DATABASE_URL=` in `env` picks another.
    """
    started: list[AgentProcess] = []
    database = database_url() if stack.agent_settings.postgres_url is not None else None

    async def start(**env: str) -> AgentProcess:
        port = free_port()
        log = stack.root / f"agent-{port}.log"
        values = {
            **os.environ,
            "AGENT_PORT": str(port),
            "AGENT_MCP_URL": stack.kernel_mcp.url,
            "AGENT_MODEL": "hosted_vllm/fake",
            "AGENT_API_BASE": stack.llm.base_url,
            "AGENT_DATA_DIR": str(stack.root / "process-data"),
            "AGENT_NOTEBOOKS_DIR": str(stack.root / "process-notebooks"),
            "AGENT_LLM_RETRIES": "0",
            "AGENT_UI": "false",
            **({"AGENT_DATABASE_URL": database} if database else {}),
            **env,
        }
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "agent_service", "--log-level", "info"],
                env=values,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        agent = AgentProcess(process, port, log)
        started.append(agent)
        deadline = time.monotonic() + 60
        async with httpx.AsyncClient(base_url=agent.url) as http:
            while True:
                assert process.poll() is None, f"agent_service exited:\n{agent.output()}"
                assert time.monotonic() < deadline, f"agent_service not up:\n{agent.output()}"
                try:
                    if (await http.get("/v1/models")).status_code == 200:
                        return agent
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)

    yield start
    for agent in started:
        if agent.process.poll() is None:
            agent.process.kill()
            await agent.wait_exit()
