"""The kernel sandbox against the attacks of issue 10, on live sandboxed kernels.

Each test is one thing model-written code tried with an ordinary execution. The whole
stack runs as `make run` starts it (scripts/run_stack.py: two server processes) where
the attack is on the servers; the kernel layer alone where it is on the kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from fastmcp import Client
from fastmcp.client.transports import StreamableHttpTransport
from fastmcp.exceptions import ToolError

from kernel_mcp.config import Settings
from kernel_mcp.errors import SandboxUnavailable
from kernel_mcp.sessions import SessionManager

from .conftest import free_port, plain_of, text_of, wait_until

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
SECRETS = {
    "OPENAI_API_KEY": "sk-provider-secret-1f3a",
    "AGENT_API_KEY": "agent-provider-secret-77b2",
    "AGENT_API_KEYS": '["client-key-secret-9c41"]',
    "KERNEL_MCP_TOKEN": "mcp-token-secret-52de",
    "SOME_SERVICE_PASSWORD": "service-password-secret-0a8e",
}
SECRET_VALUES = ("sk-provider-secret", "agent-provider-secret", "client-key-secret", "mcp-token")
CLIENT_KEY = "client-key-secret-9c41"
DEADLINE = 30.0


# -- the stack as `make run` starts it ---------------------------------------------------


@dataclass
class RunningStack:
    agent_url: str
    kernel_port: int
    agent_port: int
    root: Path

    @property
    def workspace(self) -> Path:
        return self.root / "ws"

    @property
    def runtime(self) -> Path:
        return self.root / "rt"

    async def run(self, session_id: str, code: str) -> dict[str, Any]:
        """Run `code` in the session's kernel through the agent's code endpoint."""
        async with httpx.AsyncClient(
            base_url=self.agent_url, headers={"Authorization": f"Bearer {CLIENT_KEY}"}
        ) as http:
            response = await http.post(
                f"/v1/sessions/{session_id}/execute", json={"code": code}, timeout=DEADLINE
            )
            response.raise_for_status()
            result: dict[str, Any] = response.json()
            return result

    async def stdout(self, session_id: str, code: str) -> str:
        result = await self.run(session_id, code)
        assert result["status"] == "ok", result
        return text_of(result["outputs"])

    async def call(self, method: str, path: str) -> httpx.Response:
        async with httpx.AsyncClient(
            base_url=self.agent_url, headers={"Authorization": f"Bearer {CLIENT_KEY}"}
        ) as http:
            return await http.request(method, path, timeout=DEADLINE)


def _wait_healthy(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert process.poll() is None, "the stack exited during start-up"
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)  # polling a starting server: no event to wait for
    raise AssertionError(f"{url} did not become healthy")


@pytest.fixture(scope="module")
def running_stack() -> Iterator[RunningStack]:
    """kernel_mcp and agent_service as two processes, with secrets in their environment."""
    short = Path(tempfile.mkdtemp(prefix="ka-sb-"))  # IPC socket paths stay short
    kernel_port, agent_port = free_port(), free_port()
    env = {
        **os.environ,
        **SECRETS,
        "KERNEL_MCP_PORT": str(kernel_port),
        "KERNEL_MCP_WORKSPACE": str(short / "ws"),
        "KERNEL_MCP_RUNTIME_DIR": str(short / "rt"),
        "KERNEL_MCP_POOL_SIZE": "1",
        "KERNEL_MCP_SANDBOX": "bwrap",
        "KERNEL_MCP_KERNEL_NETWORK": "none",
        "AGENT_PORT": str(agent_port),
        "AGENT_DATA_DIR": str(short / "data"),
        "AGENT_NOTEBOOKS_DIR": str(short / "notebooks"),
        "AGENT_MODEL": "hosted_vllm/none",
        "AGENT_API_BASE": "http://127.0.0.1:9/v1",
        "AGENT_UI": "false",
    }
    process = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "run_stack.py")],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
    )
    try:
        _wait_healthy(f"http://127.0.0.1:{kernel_port}/health", process)
        _wait_healthy(f"http://127.0.0.1:{agent_port}/health", process)
        yield RunningStack(f"http://127.0.0.1:{agent_port}", kernel_port, agent_port, short)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        shutil.rmtree(short, ignore_errors=True)


_READ_EVERYTHING = """
import glob, os
seen = [repr(dict(os.environ))]
for path in glob.glob('/proc/*/environ') + glob.glob('/proc/*/cmdline'):
    try:
        seen.append(open(path, 'rb').read().decode(errors='replace'))
    except OSError as exc:
        seen.append(f'{path}: {exc}')
print(len(glob.glob('/proc/[0-9]*')))
print('\\n'.join(seen))
"""


async def test_no_secret_of_either_server_is_readable(running_stack: RunningStack) -> None:
    text = await running_stack.stdout("env-1", _READ_EVERYTHING)
    processes, seen = text.split("\n", 1)
    assert 1 < int(processes) <= 3, "the kernel sees only its sandbox: bwrap and itself"
    for secret in SECRET_VALUES:
        assert secret not in seen
    assert "-m kernel_mcp" not in seen
    assert "agent_service" not in seen


async def test_other_sessions_data_and_kernels_are_unreachable(
    running_stack: RunningStack,
) -> None:
    stack = running_stack
    await stack.stdout("victim", "open('diary.txt', 'w').write('victim-secret-3e1')")
    await stack.stdout("attacker", "1")
    victim_kernel = (await stack.call("GET", "/v1/sessions/victim/kernel")).json()
    attacker_kernel = (await stack.call("GET", "/v1/sessions/attacker/kernel")).json()
    transcripts = stack.root / "data" / "transcripts.sqlite3"
    notebooks = stack.root / "notebooks"
    assert transcripts.exists()
    assert (stack.workspace / "victim" / "diary.txt").exists()
    targets = {
        "victim_file": str(stack.workspace / "victim" / "diary.txt"),
        "victim_folder": str(stack.workspace / "victim"),
        "workspace": str(stack.workspace),
        "transcripts": str(transcripts),
        "data": str(stack.root / "data"),
        "notebooks": str(notebooks),
        "victim_connection": victim_kernel["connection_file"],
        "repo": str(REPO / "pyproject.toml"),
        "git": str(REPO / ".git"),
        "root_home": "/root/.bashrc",
    }
    code = f"""
import json, os
targets = {targets!r}
found = {{}}
for name, path in targets.items():
    try:
        found[name] = os.listdir(path) if os.path.isdir(path) else open(path, 'rb').read(64).hex()
    except OSError as exc:
        found[name] = type(exc).__name__
found['connections'] = [
    name for folder in ('kernels', 'pool') if os.path.isdir(f'{stack.runtime}/{{folder}}')
    for name in os.listdir(f'{stack.runtime}/{{folder}}')
]
print(json.dumps(found))
"""
    found = json.loads(await stack.stdout("attacker", code))
    for name in targets:
        assert found[name] in ("FileNotFoundError", "PermissionError"), (name, found[name])
    # Its own connection file is the only one in sight (bound at start, maybe in pool/).
    assert found["connections"] == [Path(attacker_kernel["connection_file"]).name]
    assert len(os.listdir(stack.runtime / "kernels")) >= 2


async def test_server_ports_are_unreachable_from_the_kernel(
    running_stack: RunningStack,
) -> None:
    code = f"""
import socket
for port in ({running_stack.kernel_port}, {running_stack.agent_port}):
    try:
        socket.create_connection(('127.0.0.1', port), timeout=5).close()
        print(port, 'connected')
    except OSError as exc:
        print(port, type(exc).__name__)
try:
    socket.create_connection(('1.1.1.1', 53), timeout=5).close()
    print('internet connected')
except OSError as exc:
    print('internet', exc.errno)
"""
    lines = (await running_stack.stdout("net-1", code)).split("\n")
    assert lines[0] == f"{running_stack.kernel_port} ConnectionRefusedError"
    assert lines[1] == f"{running_stack.agent_port} ConnectionRefusedError"
    assert lines[2] == "internet 101"  # ENETUNREACH: no route, no interface but loopback


async def test_deleted_session_id_starts_with_an_empty_folder(
    running_stack: RunningStack,
) -> None:
    stack = running_stack
    await stack.stdout("reuse-1", "open('left-behind.txt', 'w').write('old')")
    deleted = (await stack.call("DELETE", "/v1/sessions/reuse-1")).json()
    assert deleted["deleted"] is True
    assert deleted["kernel_shut_down"] is True
    assert not (stack.workspace / "reuse-1").exists()
    listing = await stack.stdout("reuse-1", "import os; print(os.listdir('.'))")
    assert listing == "[]\n"


async def test_health_reports_the_sandbox(running_stack: RunningStack) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{running_stack.kernel_port}/health")
    health = response.json()
    assert health["sandbox"] == "bwrap"
    assert health["kernel_network"] == "none"


# -- the kernel layer ------------------------------------------------------------------


async def test_host_network_opts_in(serve_http: Callable[..., Any]) -> None:
    base = serve_http(sandbox="bwrap", kernel_network="host")
    port = int(base.rsplit(":", 1)[1])
    code = (
        "import urllib.request\n"
        f"print(urllib.request.urlopen('http://127.0.0.1:{port}/health', timeout=10).status)"
    )
    transport = StreamableHttpTransport(f"{base}/mcp", headers={"X-Session-Id": "net-host"})
    async with Client(transport) as client:
        result = await client.call_tool("execute_code", {"code": code})
    assert result.structured_content is not None
    assert text_of(result.structured_content["outputs"]) == "200\n"


async def test_memory_limit_cannot_be_lifted(start_manager: Callable[..., Any]) -> None:
    manager: SessionManager = await start_manager(sandbox="bwrap", memory_limit_bytes=2 * 1024**3)
    code = """
import mmap, resource, subprocess, sys
print(resource.getrlimit(resource.RLIMIT_AS))
for limits in ((resource.RLIM_INFINITY, resource.RLIM_INFINITY), (8 * 1024**3, 8 * 1024**3)):
    try:
        resource.setrlimit(resource.RLIMIT_AS, limits)
        print('raised')
    except (ValueError, OSError) as exc:
        print(type(exc).__name__)
try:
    mmap.mmap(-1, 8 * 1024**3)
    print('mapped')
except (OSError, MemoryError) as exc:
    print(type(exc).__name__)
child = subprocess.run([sys.executable, '-c', 'bytearray(8 * 1024**3)'], capture_output=True)
print(child.stderr.decode().strip().splitlines()[-1])
"""
    result = await manager.execute("s1", code, timeout=60)
    assert result.status == "ok", result.outputs
    assert text_of(result.outputs).split("\n")[:-1] == [
        f"({2 * 1024**3}, {2 * 1024**3})",
        "ValueError",
        "ValueError",
        "OSError",
        "MemoryError",
    ]


_DAEMON = """
import subprocess, sys
code = '''
import os, sys, time
if os.fork():
    sys.exit(0)
os.setsid()
if os.fork():
    sys.exit(0)
time.sleep(1000)
'''
subprocess.Popen([sys.executable, '-c', code, {marker!r}], start_new_session=True).wait()
"""


def _processes_with(marker: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if marker in (process.info["cmdline"] or []):
            found.append(process)
    return found


async def _start_daemon(manager: SessionManager, session_id: str) -> str:
    marker = f"ka-daemon-{uuid.uuid4().hex}"
    result = await manager.execute(session_id, _DAEMON.format(marker=marker))
    assert result.status == "ok", result.outputs
    deadline = time.monotonic() + DEADLINE
    while not _processes_with(marker):
        assert time.monotonic() < deadline, "the daemon did not start"
        await asyncio.sleep(0.05)
    return marker


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # exited between the listing and the look
        return False


async def _gone(marker: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while survivors := [p for p in _processes_with(marker) if _alive(p)]:
        assert time.monotonic() < deadline, f"daemon survived: {survivors}"
        await asyncio.sleep(0.05)


async def test_double_forked_daemon_dies_with_restart_shutdown_and_death(
    start_manager: Callable[..., Any],
) -> None:
    manager: SessionManager = await start_manager(sandbox="bwrap")
    marker = await _start_daemon(manager, "s1")
    await manager.restart("s1")
    await _gone(marker)

    marker = await _start_daemon(manager, "s1")
    pid = (await manager.kernel_info("s1")).pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await _gone(marker)
    kernel = manager.existing("s1").kernel
    assert kernel is not None
    await wait_until(lambda: kernel.state == "dead", "kernel_mcp to see the death")

    died = await manager.execute("s1", "1")
    assert died.status == "kernel_died"
    marker = await _start_daemon(manager, "s1")
    await manager.close_session("s1")
    await _gone(marker)


_SWAP = """
import os, threading
outside = {outside!r}
open('inside.txt', 'w').write('inside')
stop = threading.Event()
def swap():
    while not stop.is_set():
        os.symlink(outside, 'l.tmp'); os.replace('l.tmp', 'f')
        os.link('inside.txt', 'h.tmp'); os.replace('h.tmp', 'f')
threading.Thread(target=swap, daemon=True).start()
"""


async def test_file_tools_cannot_be_raced_out_of_the_session_folder(
    serve_http: Callable[..., Any], short_tmp: Path
) -> None:
    outside = short_tmp / "outside.txt"
    outside.write_text("OUTSIDE")
    base = serve_http(sandbox="bwrap")
    transport = StreamableHttpTransport(f"{base}/mcp", headers={"X-Session-Id": "race"})
    outcomes: dict[str, int] = {}
    async with Client(transport) as client:
        setup = await client.call_tool("execute_code", {"code": _SWAP.format(outside=str(outside))})
        assert setup.structured_content is not None
        assert setup.structured_content["status"] == "ok"
        for _ in range(1000):
            try:
                text = (await client.call_tool("read_file", {"path": "f"})).content[0].text
            except ToolError as exc:
                text = "refused" if "symlink" in str(exc) else str(exc)
            assert "OUTSIDE" not in text
            outcomes[text] = outcomes.get(text, 0) + 1
        for _ in range(100):
            with contextlib.suppress(ToolError):
                await client.call_tool("write_file", {"path": "f", "content": "written"})
        await client.call_tool("execute_code", {"code": "stop.set()"})
    assert outside.read_text() == "OUTSIDE"
    assert set(outcomes) <= {"inside", "refused", "written"}, outcomes
    assert outcomes.get("inside"), "the race was not exercised"
    assert outcomes.get("refused"), "the race was not exercised"


async def test_the_kernel_cannot_write_outside_its_folder(
    start_manager: Callable[..., Any],
) -> None:
    manager: SessionManager = await start_manager(sandbox="bwrap")
    code = """
import os
for path in ('/proc/sys/vm/overcommit_ratio', '/usr/x', '/x', '/home/x', '/dev/x',
             os.environ['KERNEL_AGENT_SKILLS_DIR'] + '/x'):
    try:
        open(path, 'w').write('0')
        print(path, 'written')
    except OSError as exc:
        print(path, type(exc).__name__)
print(os.getuid(), os.getgid(), os.getcwd() == os.environ['HOME'])
"""
    result = await manager.execute("s1", code)
    lines = text_of(result.outputs).splitlines()
    assert not [line for line in lines if line.endswith("written")], lines
    assert lines[-1] == f"{manager.settings.sandbox_uid} {manager.settings.sandbox_gid} True"


async def test_missing_bwrap_is_a_clear_start_up_error(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, short_tmp: Path
) -> None:
    monkeypatch.setenv("PATH", str(short_tmp))
    manager = SessionManager(make_settings(sandbox="bwrap"))
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        await manager.start()
    await manager.close()
    process = subprocess.run(
        [sys.executable, "-m", "kernel_mcp"],
        env={
            **os.environ,
            "PATH": str(short_tmp),
            "KERNEL_MCP_PORT": str(free_port()),
            "KERNEL_MCP_SANDBOX": "bwrap",
        },
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert process.returncode != 0
    assert "KERNEL_MCP_SANDBOX=none" in process.stderr
    assert "apt-get install bubblewrap" in process.stderr


async def test_unsandboxed_mode_is_flagged(serve_http: Callable[..., Any]) -> None:
    base = serve_http(sandbox="none")
    async with httpx.AsyncClient() as http:
        health = (await http.get(f"{base}/health")).json()
    assert health["sandbox"] == "none"
    assert "UNSANDBOXED" in health["sandbox_warning"]
    transport = StreamableHttpTransport(f"{base}/mcp", headers={"X-Session-Id": "plain"})
    async with Client(transport) as client:
        result = await client.call_tool("execute_code", {"code": "import os; os.getuid()"})
    assert result.structured_content is not None
    assert plain_of(result.structured_content["outputs"]) == str(os.getuid())


async def test_pooled_kernel_takes_over_a_folder_that_has_files(
    start_manager: Callable[..., Any],
) -> None:
    manager: SessionManager = await start_manager(sandbox="bwrap", pool_size=1)
    folder = manager.settings.workspace / "has-files"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "data.csv").write_text("a,b\n1,2\n")
    deadline = time.monotonic() + DEADLINE
    while manager.stats()["pool_ready"] < 1:
        assert time.monotonic() < deadline, "the pool did not fill"
        await asyncio.sleep(0.05)
    result = await manager.execute("has-files", "print(open('sub/data.csv').read())")
    assert text_of(result.outputs) == "a,b\n1,2\n\n"
    assert sorted(os.listdir(folder)) == ["sub"]


def test_settings_refuse_what_would_open_the_sandbox(
    make_settings: Callable[..., Settings],
) -> None:
    workspace = make_settings().workspace
    for shown in (workspace, workspace / "alice", workspace.parent):
        with pytest.raises(ValueError, match="SANDBOX_READ_ONLY"):
            make_settings(sandbox_read_only=[shown])
    with pytest.raises(ValueError, match="KERNEL_NETWORK=host"):
        make_settings(sandbox="bwrap", transport="tcp")
    assert make_settings(sandbox="bwrap", transport="tcp", kernel_network="host")
