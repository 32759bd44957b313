"""The whole stack on 127.0.0.1: kernel_mcp and agent_service over real HTTP, a scripted LLM.

The agent's transcript store is SQLite, or PostgreSQL for tests marked `both_stores`
(parametrized `store_kind`: each runs once per store, on a database of its own in a
throwaway cluster started once per test session).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from openai import AsyncOpenAI

from agent_service.app import create_app
from agent_service.config import Settings as AgentSettings
from kernel_mcp.config import Settings as KernelSettings
from kernel_mcp.server import create_server
from tests.kernel_mcp.conftest import free_port
from tests.support.fake_llm import FakeLLM
from tests.support.postgres import PostgresCluster, binaries

STORES = ("sqlite", "postgres")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked `both_stores` run against SQLite and PostgreSQL."""
    if "store_kind" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
        "both_stores"
    ):
        metafunc.parametrize("store_kind", STORES, indirect=True)


@pytest.fixture
def store_kind(request: pytest.FixtureRequest) -> str:
    """Which transcript store the test's agent services use."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A PostgreSQL server for the whole test session (Debian's `postgresql` package)."""
    bindir = binaries()
    if bindir is None:
        message = "PostgreSQL is not installed (make test installs it: scripts/ensure_postgres.sh)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    cluster = PostgresCluster(bindir).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def database_url(
    store_kind: str, request: pytest.FixtureRequest
) -> Iterator[Callable[[], str | None]]:
    """Factory: a new database's URL for PostgreSQL tests (None: SQLite under data_dir)."""
    made: list[str] = []

    def make() -> str | None:
        if store_kind != "postgres":
            return None
        cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
        made.append(cluster.create_database())
        return made[-1]

    yield make
    if made:
        cluster = request.getfixturevalue("postgres_cluster")
        for url in made:
            cluster.drop_database(url)


class RunningServer:
    """A uvicorn server running as a task of the test's event loop."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.app = app
        self.port = port or free_port()
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
    kernel_settings: KernelSettings
    process_database: str | None = None
    """The database of agent_process's services (PostgreSQL tests), apart from `agent`'s."""

    @property
    def services(self) -> Any:
        """The running agent service's shared parts (to inject faults in-process)."""
        return self.agent.app.state.services

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

    async def restart_kernel_mcp(self) -> None:
        """Stop kernel_mcp (its kernels with it) and start a new one on the same port."""
        await self.kernel_mcp.stop()
        self.kernel_mcp = await RunningServer(
            _kernel_app(self.kernel_settings), self.kernel_mcp.port
        ).start()


def _kernel_app(settings: KernelSettings) -> Any:
    return create_server(settings).http_app(path="/mcp", host_origin_protection=True)


@pytest.fixture
async def start_stack(
    database_url: Callable[[], str | None],
) -> AsyncIterator[Callable[..., Any]]:
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
        kernel = await RunningServer(_kernel_app(kernel_settings)).start()
        values: dict[str, Any] = {
            "mcp_url": f"{kernel.url}/mcp",
            "model": model,
            "api_base": llm.base_url,
            "data_dir": root / "data",
            "notebooks_dir": root / "notebooks",
            "llm_retries": 2,
            "llm_timeout": 10,
            "database_url": database_url(),
        }
        values.update(agent_overrides)
        agent_settings = AgentSettings(**values)
        agent = await RunningServer(create_app(agent_settings)).start()
        stack = Stack(llm, kernel, agent, agent_settings, root, kernel_settings)
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
    stack: Stack, database_url: Callable[[], str | None]
) -> AsyncIterator[Callable[..., Any]]:
    """Factory: agent_service in a subprocess on the stack's kernel_mcp, LLM and data."""
    started: list[AgentProcess] = []
    if stack.agent_settings.postgres_url is not None and stack.process_database is None:
        stack.process_database = database_url()

    async def start(**env: str) -> AgentProcess:
        port = free_port()
        log = stack.root / f"agent-{port}.log"
        values = {
            **os.environ,
            "AGENT_PORT": str(port),
            "AGENT_MCP_URL": f"{stack.kernel_mcp.url}/mcp",
            "AGENT_MODEL": "hosted_vllm/fake",
            "AGENT_API_BASE": stack.llm.base_url,
            "AGENT_DATA_DIR": str(stack.root / "process-data"),
            "AGENT_NOTEBOOKS_DIR": str(stack.root / "process-notebooks"),
            "AGENT_LLM_RETRIES": "0",
            "AGENT_UI": "false",
            **({"AGENT_DATABASE_URL": stack.process_database} if stack.process_database else {}),
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
