"""Benchmark the kernel_mcp MCP server over streamable HTTP against its two floors, in one run.

Measures, in alternating chunks so machine noise hits all sides alike:

1. kernel floor: `x + 1` on a kernel driven by jupyter_client alone (`RawKernel` of
   `kernel_layer.py`: same kernel command, environment and IPC transport as the server);
2. echo floor: `call_tool("echo", ...)` on a trivial fastmcp server, i.e. what MCP over
   streamable HTTP costs with no work behind it (fastmcp client, uvicorn, starlette,
   the MCP request layer, JSON-RPC and SSE framing). The same server has a tool
   `exec_raw` that runs the code on a raw jupyter_client kernel (`RawKernel`): the two
   floors composed in one request, with no kernel_mcp code (reported, not the target);
3. ours through a handle: `call_tool("execute_code", {"code": "x + 1", "session": h})`
   on kernel_mcp as `make run` serves it (`python -m kernel_mcp`), `h` from `new_session`;
4. ours through the header: the same call without `session`, on a connection sending
   `X-Session-Id` (agent_service's way).

All clients are fastmcp `Client`s in their default mode (protocol 2026-07-28, which the
official SDK and fastmcp negotiate today). Both servers run in their own process (the
client and the raw kernel in this one), as in production, where the MCP client is
another program. The target is `mcp_execute_p50 <= 1.15 * (kernel_p50 + echo_p50)` for
the handle.

Run: ``.venv/bin/python bench/mcp_server.py``. Prints one JSON line on stdout; progress
goes to stderr. Takes about 10 s, uses a temporary `/tmp/ka-*` folder and stops both
servers and every kernel they started.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import fastmcp
import httpx
import ipykernel
import jupyter_client
import psutil
import uvicorn
from fastmcp import Client
from fastmcp.client.transports import StreamableHttpTransport

from kernel_mcp.config import Settings

# The kernel floor is kernel_layer.py's; this folder is on sys.path when run as a script,
# the insert makes the import work however this module is loaded.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_layer import RawKernel, _ms, _p, floor_env, kernel_spec_of

logger = logging.getLogger("bench.mcp_server")

CODE = "x + 1"
N_SAMPLES = 300
N_WARMUP = 20
N_CHUNKS = 6
TARGET = 1.15
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
RUN_DEADLINE = 95.0  # measuring; stopping the servers after it stays inside two minutes
REPO = Path(__file__).resolve().parent.parent

# Served exactly as `kernel_mcp.__main__.serve_http` serves ours: `asyncio.run` of
# `uvicorn.Server.serve()` (the stdlib event loop: `uvicorn.run` would pick uvloop) with
# the same Config. `async def`: fastmcp runs a sync tool in a worker thread.
ECHO_SERVER = """
import asyncio
import contextlib
import json
import sys
from pathlib import Path

import uvicorn
from fastmcp import FastMCP

config = json.loads(sys.argv[2])
sys.path.insert(0, config["bench"])
from kernel_layer import RawKernel, kernel_spec_of  # noqa: E402

from kernel_mcp.config import Settings  # noqa: E402
from kernel_mcp.local_kernel import LocalBackend  # noqa: E402

settings = Settings(workspace=config["workspace"], runtime_dir=config["runtime_dir"])
raw = RawKernel(
    kernel_spec_of(settings),
    LocalBackend(settings).kernel_env(),
    Path(config["raw_runtime"]),
    Path(config["raw_cwd"]),
)


@contextlib.asynccontextmanager
async def lifespan(server):
    await raw.start()
    await raw.execute("x = 1")
    try:
        yield {}
    finally:
        await raw.shutdown()


mcp = FastMCP("echo", lifespan=lifespan)


@mcp.tool
async def echo(text: str) -> str:
    return text


@mcp.tool
async def exec_raw(code: str) -> str:
    await raw.execute(code)
    return "ok"


config = uvicorn.Config(
    mcp.http_app(path="/mcp"),
    host="127.0.0.1",
    port=int(sys.argv[1]),
    log_level="warning",
    timeout_graceful_shutdown=3,
    lifespan="on",
)
asyncio.run(uvicorn.Server(config).serve())
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- servers in subprocesses ---------------------------------------------------


@contextlib.asynccontextmanager
async def server_process(
    name: str,
    args: list[str],
    env: dict[str, str],
    log: Path,
    ready: Callable[[httpx.AsyncClient], Awaitable[bool]],
) -> AsyncIterator[None]:
    """Run `python *args` until the block ends; SIGTERM, then kill whatever is left.

    The server's descendants (kernels start in sessions of their own, so a process-group
    kill would miss them) are recorded just before it is stopped and must be gone after.
    """
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            cwd=REPO,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    descendants: dict[int, psutil.Process] = {}
    try:
        await _wait_ready(name, proc, log, ready)
        yield
    finally:
        with contextlib.suppress(psutil.Error):
            descendants = {p.pid: p for p in psutil.Process(proc.pid).children(recursive=True)}
        await _stop(name, proc, descendants, log)


async def _wait_ready(
    name: str,
    proc: asyncio.subprocess.Process,
    log: Path,
    ready: Callable[[httpx.AsyncClient], Awaitable[bool]],
) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    async with httpx.AsyncClient(timeout=2.0) as http:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise RuntimeError(f"{name} server exited ({proc.returncode}): {_tail(log)}")
            with contextlib.suppress(httpx.HTTPError):
                if await ready(http):
                    return
            await asyncio.sleep(0.05)
    raise TimeoutError(f"{name} server not ready after {START_TIMEOUT:g} s: {_tail(log)}")


async def _stop(
    name: str,
    proc: asyncio.subprocess.Process,
    descendants: dict[int, psutil.Process],
    log: Path,
) -> None:
    if proc.returncode is None:
        proc.terminate()  # uvicorn's graceful shutdown runs the lifespan: kernels stop
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await proc.wait()
        except TimeoutError:
            logger.error("%s server ignored SIGTERM for %g s; killing it", name, STOP_TIMEOUT)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    survivors = [p for p in descendants.values() if _alive(p)]
    if survivors:
        logger.error(
            "%s server left %d processes running (%s); killing them. Server log: %s",
            name,
            len(survivors),
            ", ".join(str(p.pid) for p in survivors),
            _tail(log),
        )
        for p in survivors:
            with contextlib.suppress(psutil.Error):
                p.kill()
    logger.info("%s server stopped (exit %s)", name, proc.returncode)


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _tail(log: Path, chars: int = 2000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


# -- the three sides -----------------------------------------------------------


async def kernel_call(raw: RawKernel) -> float:
    return await raw.execute(CODE)


async def echo_call(client: Client) -> float:
    started = time.perf_counter()
    result = await client.call_tool("echo", {"text": CODE})
    elapsed = time.perf_counter() - started
    if result.data != CODE:
        raise RuntimeError(f"echo returned {result.data!r}")
    return elapsed


async def raw_tool_call(client: Client) -> float:
    started = time.perf_counter()
    result = await client.call_tool("exec_raw", {"code": CODE})
    elapsed = time.perf_counter() - started
    if result.data != "ok":
        raise RuntimeError(f"exec_raw returned {result.data!r}")
    return elapsed


async def mcp_call(client: Client, handle: str | None = None) -> float:
    arguments = {"code": CODE} if handle is None else {"code": CODE, "session": handle}
    started = time.perf_counter()
    result = await client.call_tool("execute_code", arguments)
    elapsed = time.perf_counter() - started
    status = (result.structured_content or {}).get("status")
    if status != "ok":
        raise RuntimeError(f"execute_code failed: {status} {result.content}")
    return elapsed


async def measure(sides: dict[str, Callable[[], Awaitable[float]]]) -> dict[str, list[float]]:
    """Warm every side up, then time them in chunks whose order flips every chunk."""
    for _ in range(N_WARMUP):
        for call in sides.values():
            await call()
    times: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    per_chunk = N_SAMPLES // N_CHUNKS
    for chunk in range(N_CHUNKS):
        for name in names if chunk % 2 == 0 else reversed(names):
            times[name].extend([await sides[name]() for _ in range(per_chunk)])
    return times


# -- the run -------------------------------------------------------------------


async def run(root: Path) -> dict[str, Any]:
    settings = Settings(workspace=root / "ws", runtime_dir=root / "rt", pool_size=1)
    (root / "rt-raw").mkdir(mode=0o700)
    (root / "raw-cwd").mkdir()
    spec = kernel_spec_of(settings)  # the floor: the kernel command without its sandbox
    kernel_env = floor_env(settings)

    echo_port, mcp_port = free_port(), free_port()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("KERNEL_MCP_")}
    mcp_env = base_env | {
        "KERNEL_MCP_HOST": "127.0.0.1",
        "KERNEL_MCP_PORT": str(mcp_port),
        "KERNEL_MCP_WORKSPACE": str(settings.workspace),
        "KERNEL_MCP_RUNTIME_DIR": str(settings.runtime_dir),
        "KERNEL_MCP_POOL_SIZE": "1",
    }
    echo_url = f"http://127.0.0.1:{echo_port}/mcp"
    mcp_base = f"http://127.0.0.1:{mcp_port}"

    async def echo_up(http: httpx.AsyncClient) -> bool:
        await http.get(echo_url)  # any HTTP answer means uvicorn serves the app
        return True

    (root / "rt-echo").mkdir(mode=0o700)
    (root / "echo-cwd").mkdir()
    echo_config = json.dumps(
        {
            "bench": str(Path(__file__).resolve().parent),
            "workspace": str(root / "ws-echo"),
            "runtime_dir": str(root / "rt-echo-settings"),
            "raw_runtime": str(root / "rt-echo"),
            "raw_cwd": str(root / "echo-cwd"),
        }
    )

    async def pool_full(http: httpx.AsyncClient) -> bool:
        stats = (await http.get(f"{mcp_base}/health")).json()
        return bool(stats["pool_ready"] >= stats["pool_size"])

    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(
            server_process(
                "echo",
                ["-c", ECHO_SERVER, str(echo_port), echo_config],
                base_env,
                root / "echo.log",
                echo_up,
            )
        )
        await stack.enter_async_context(
            server_process("kernel_mcp", ["-m", "kernel_mcp"], mcp_env, root / "mcp.log", pool_full)
        )
        logger.info("servers up: echo :%d, kernel_mcp :%d (pool ready)", echo_port, mcp_port)

        raw = RawKernel(spec, kernel_env, root / "rt-raw", root / "raw-cwd")
        stack.push_async_callback(raw.shutdown)
        await raw.start()
        await raw.execute("x = 1")

        echo = await stack.enter_async_context(Client(StreamableHttpTransport(echo_url)))
        ours = await stack.enter_async_context(Client(StreamableHttpTransport(f"{mcp_base}/mcp")))
        header = await stack.enter_async_context(
            Client(StreamableHttpTransport(f"{mcp_base}/mcp", headers={"X-Session-Id": "bench"}))
        )
        handle = (await ours.call_tool("new_session", {})).structured_content["session"]
        for client, arguments in ((ours, {"session": handle}), (header, {})):
            # The first claims the pooled kernel, the second starts one.
            result = await client.call_tool("execute_code", {"code": "x = 1", **arguments})
            if (result.structured_content or {}).get("status") != "ok":
                raise RuntimeError(f"could not define x: {result.content}")
        # The pool refills in the background; let that kernel start before timing.
        async with httpx.AsyncClient(timeout=2.0) as http:
            deadline = time.monotonic() + START_TIMEOUT
            while not await pool_full(http):
                if time.monotonic() > deadline:
                    raise TimeoutError("the kernel_mcp pool did not refill")
                await asyncio.sleep(0.05)

        times = await measure(
            {
                "kernel": lambda: kernel_call(raw),
                "echo": lambda: echo_call(echo),
                "raw_tool": lambda: raw_tool_call(echo),
                "mcp_execute": lambda: mcp_call(ours, handle),
                "mcp_header": lambda: mcp_call(header),
            }
        )

    p50 = {name: _p(samples, 50) for name, samples in times.items()}
    p99 = {name: _p(samples, 99) for name, samples in times.items()}
    floor = p50["kernel"] + p50["echo"]
    ratio = p50["mcp_execute"] / floor
    logger.info(
        "p50: kernel %.2f ms, echo %.2f ms, execute via handle %.2f ms (ratio %.3f), "
        "via header %.2f ms",
        p50["kernel"] * 1000,
        p50["echo"] * 1000,
        p50["mcp_execute"] * 1000,
        ratio,
        p50["mcp_header"] * 1000,
    )
    return {
        "kernel_p50_ms": _ms(p50["kernel"]),
        "echo_p50_ms": _ms(p50["echo"]),
        "mcp_execute_p50_ms": _ms(p50["mcp_execute"]),
        "kernel_p99_ms": _ms(p99["kernel"]),
        "echo_p99_ms": _ms(p99["echo"]),
        "mcp_execute_p99_ms": _ms(p99["mcp_execute"]),
        "mcp_header_p50_ms": _ms(p50["mcp_header"]),
        "raw_tool_p50_ms": _ms(p50["raw_tool"]),
        "ratio_vs_raw_tool": round(p50["mcp_execute"] / p50["raw_tool"], 3),
        "mcp_header_p99_ms": _ms(p99["mcp_header"]),
        "protocol": "2026-07-28",
        "floor_p50_ms": _ms(floor),
        "overhead_p50_ms": _ms(p50["mcp_execute"] - floor),
        "ratio": round(ratio, 3),
        "target": TARGET,
        "met": ratio <= TARGET,
        "samples": len(times["kernel"]),
        "servers": "subprocess",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "fastmcp": fastmcp.__version__,
        "mcp": importlib.metadata.version("mcp"),
        "uvicorn": uvicorn.__version__,
        "jupyter_client": jupyter_client.__version__,
        "ipykernel": ipykernel.__version__,
    }


async def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="ka-"))
    try:
        async with asyncio.timeout(RUN_DEADLINE):
            figures = await run(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    sys.stdout.write(json.dumps(figures) + "\n")


if __name__ == "__main__":
    # Libraries warn only: httpx logs every request at INFO, which would slow the client.
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    logging.getLogger("bench").setLevel(logging.INFO)
    asyncio.run(main())
