"""Live-kernel fixtures: every kernel a test starts is recorded and always shut down.

Tests marked `gateway` run three times: on the local backend, on Jupyter Kernel Gateway
and on Jupyter Enterprise Gateway (real gateways, see `gateways.py`), or on the gateways
the marker names; the rest run locally. `backend_kind` names the backend of the current run.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from kernel_agent_pytest import KernelMcpServer
from kernel_mcp.config import Settings
from kernel_mcp.files import remove_folder
from kernel_mcp.gateway_kernel import GatewayBackend, GatewayKernel
from kernel_mcp.local_kernel import LocalBackend, LocalKernel
from kernel_mcp.sandbox import SESSION_FOLDER
from kernel_mcp.sessions import SessionManager

from . import gateways
from .gateways import Gateway

LOCAL = "local"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("gateway")
    if "backend_kind" in metafunc.fixturenames and marker is not None:
        metafunc.parametrize("backend_kind", [LOCAL, *(marker.args or gateways.KINDS)])


@pytest.fixture
def backend_kind() -> str:
    """The backend of this run: local unless the test is marked `gateway`."""
    return LOCAL


async def _start_gateway(kind: str, folder: Path) -> Gateway:
    if not gateways.available(kind):
        pytest.skip(f"{kind} virtualenv missing: run `make gateways`")
    gateway = Gateway(kind, folder)
    try:
        await gateway.start()
    except BaseException:
        gateway.stop()
        raise
    return gateway


@pytest.fixture(scope="session")
def gateway_folder() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ka-gw-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_gateways(gateway_folder: Path) -> Iterator[dict[str, Gateway]]:
    """Gateways started on first use and kept for the whole run (kernels are per test)."""
    started: dict[str, Gateway] = {}
    yield started
    for gateway in started.values():
        gateway.stop()


@pytest.fixture
async def gateway(
    backend_kind: str, shared_gateways: dict[str, Gateway], gateway_folder: Path
) -> AsyncIterator[Gateway | None]:
    """The gateway of this run (None when local); kernels the test left are deleted after."""
    if backend_kind == LOCAL:
        yield None
        return
    if backend_kind not in shared_gateways:
        shared_gateways[backend_kind] = await _start_gateway(
            backend_kind, gateway_folder / backend_kind
        )
    found = shared_gateways[backend_kind]
    before = set(await found.kernels())
    yield found
    for kernel_id in set(await found.kernels()) - before:
        await found.delete(kernel_id)


@pytest.fixture
async def start_gateway(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Factory: a gateway of the test's own (to kill and restart); stopped after the test."""
    started: list[Gateway] = []

    async def start(kind: str, port: int | None = None, token: str | None = None) -> Gateway:
        gateway = Gateway(kind, tmp_path / f"{kind}-{len(started)}")
        if port is not None:
            gateway.port = port
        if token is not None:
            gateway.token = token
        started.append(gateway)
        if not gateways.available(kind):
            pytest.skip(f"{kind} virtualenv missing: run `make gateways`")
        await gateway.start()
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


class RecordingBackend(LocalBackend):
    """The real local backend, remembering the pid of every kernel it starts."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.kernels: list[LocalKernel] = []
        self.pids: set[int] = set()

    async def start_kernel(self, cwd: Path, *, pooled: bool = False) -> LocalKernel:
        kernel = await super().start_kernel(cwd, pooled=pooled)
        self.kernels.append(kernel)
        self._remember(kernel)
        return kernel

    def _remember(self, kernel: LocalKernel) -> None:
        pid = kernel.info().pid
        if pid:
            self.pids.add(pid)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary folder: IPC socket paths must stay under ~100 bytes."""
    path = Path(tempfile.mkdtemp(prefix="ka-"))
    yield path
    remove_folder(path)  # iterative: a test's kernel may nest folders past recursion limits


class RecordingGatewayBackend(GatewayBackend):
    """The real gateway backend, remembering every kernel it starts or finds."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.kernels: list[GatewayKernel] = []
        self.pids: set[int] = set()

    async def start_kernel(self, cwd: Path, *, pooled: bool = False) -> GatewayKernel:
        kernel = await super().start_kernel(cwd, pooled=pooled)
        self.kernels.append(kernel)
        return kernel

    async def open_kernel(self, session_id: str, cwd: Path) -> GatewayKernel:
        kernel = await super().open_kernel(session_id, cwd)
        if kernel not in self.kernels:
            self.kernels.append(kernel)
        return kernel

    def _remember(self, kernel: GatewayKernel) -> None:
        return None


@pytest.fixture
def make_settings(short_tmp: Path, gateway: Gateway | None) -> Callable[..., Settings]:
    # Each test its own kernel ids: derived ids must not meet another test's kernels.
    namespace = uuid.uuid4()

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "workspace": short_tmp / "ws",
            "runtime_dir": short_tmp / "rt",
            "pool_size": 0,
            "interrupt_grace": 1.0,
        }
        if gateway is not None:
            values.update(gateway.settings(), gateway_namespace=namespace)
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
async def start_manager(
    make_settings: Callable[..., Settings],
) -> AsyncIterator[Callable[..., Any]]:
    """Factory: start a SessionManager on real kernels; all are shut down after the test."""
    started: list[tuple[SessionManager, Any]] = []

    async def start(**overrides: Any) -> SessionManager:
        settings = make_settings(**overrides)
        backend: Any = (
            RecordingGatewayBackend(settings)
            if settings.backend == "gateway"
            else RecordingBackend(settings)
        )
        manager = SessionManager(settings, backend)
        await manager.start()
        started.append((manager, backend))
        return manager

    yield start
    for manager, backend in started:
        for kernel in backend.kernels:  # restarts change pids: record the current ones too
            backend._remember(kernel)
        await manager.close()
    leftovers = []
    deadline = time.monotonic() + 5
    for _, backend in started:
        for pid in backend.pids:
            while psutil.pid_exists(pid) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                leftovers.append(pid)
    assert not leftovers, f"kernels left running after the test: {leftovers}"


@pytest.fixture
async def manager(start_manager: Callable[..., Any]) -> SessionManager:
    """A manager with no pool and default limits."""
    result: SessionManager = await start_manager()
    return result


async def wait_until(condition: Callable[[], bool], what: str, within: float = 60) -> None:
    """Poll `condition` until it holds; fail with `what` past the deadline (not a speed claim)."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def wait_until_async(
    check: Callable[[], Awaitable[Any]], what: str, within: float = 60
) -> Any:
    """Await `check` until it returns something true, which is returned; fail with `what`
    past the deadline (not a speed claim)."""
    deadline = time.monotonic() + within
    while not (result := await check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
    return result


async def wait_for_exit(pid: int, within: float = 60) -> None:
    """Wait until process `pid` has exited (a zombie counts: its parent reaps it later)."""

    def gone() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    await wait_until(gone, f"process {pid} to exit", within)


class LiveText:
    """An `on_output` callback keeping the stream text a running cell has printed so far."""

    def __init__(self) -> None:
        self.text = ""

    def __call__(self, msg: dict[str, Any]) -> None:
        if msg["header"]["msg_type"] == "stream":
            self.text += msg["content"]["text"]

    async def wait_for(self, text: str) -> None:
        await wait_until(lambda: text in self.text, f"the cell to print {text!r}")


def kernel_cwd(manager: SessionManager, session_id: str) -> str:
    """The session folder as its kernel sees it: a sandbox mounts it at SESSION_FOLDER."""
    if manager.settings.backend == "local" and manager.settings.sandbox == "bwrap":
        return SESSION_FOLDER
    return str(manager.settings.workspace / session_id)


def text_of(outputs: list[dict[str, Any]], name: str = "stdout") -> str:
    """All stream text of one stream in `outputs`."""
    return "".join(o["text"] for o in outputs if o["output_type"] == "stream" and o["name"] == name)


def plain_of(outputs: list[dict[str, Any]]) -> str | None:
    """The text/plain of the execute_result, if any."""
    for output in outputs:
        if output["output_type"] == "execute_result":
            value: str = output["data"]["text/plain"]
            return value
    return None


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def serve_http(
    make_settings: Callable[..., Settings],
    kernel_mcp_server_factory: Callable[..., KernelMcpServer],
) -> Callable[..., str]:
    """Factory: kernel_mcp over real HTTP on a free port (the plugin's server factory) with
    this suite's settings (`make_settings`); returns its base URL. Stopped after the test."""

    def serve(**overrides: Any) -> str:
        settings = make_settings(**overrides)
        return kernel_mcp_server_factory(**settings.model_dump()).base_url

    return serve
