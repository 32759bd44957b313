"""Benchmark kernel_mcp under load: many sessions, concurrent clients, `x + 1` each.

`python -m kernel_mcp` runs in a subprocess, as `make run` serves it. The benchmark
process opens `--clients` connections with the official `mcp` SDK in its default mode
(protocol 2026-07-28), mints `--sessions` session handles with `new_session` (spread
evenly over the clients) and defines `x` in each, which starts one kernel per session.
Then every client, concurrently, runs `x + 1` in its sessions in turn for `--seconds`.

Printed (one JSON line on stdout, progress on stderr): latency p50/p99 as the clients
see it, executions per second, and CPU time per execution of the kernel_mcp process
alone (its own `cpu_times`, so the clients' work and the kernels' are apart; both are
reported too). `--profile FILE` records the server with py-spy during the timed phase
(`pip install py-spy`), as a speedscope JSON or, with a `.svg` name, a flame graph.

Run: ``.venv/bin/python bench/mcp_load.py`` (about 1-2 minutes: starting 100 kernels on
2 cores takes most of it). Uses a temporary `/tmp/ka-*` folder and stops everything.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import httpx2
import psutil
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_layer import _ms, _p
from mcp_server import free_port, server_process

logger = logging.getLogger("bench.mcp_load")

CODE = "x + 1"
SETUP_CONCURRENCY = 4
RUN_DEADLINE = 900.0


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def _children_cpu(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            total += _cpu(process)
    return total


@contextlib.asynccontextmanager
async def sdk_client(url: str) -> Any:
    async with httpx2.AsyncClient(timeout=120) as http:
        transport = streamable_http_client(url, http_client=http)
        async with Client(transport, read_timeout_seconds=120) as client:
            yield client


async def execute(client: Any, code: str, handle: str) -> float:
    started = time.perf_counter()
    result = await client.call_tool("execute_code", {"code": code, "session": handle})
    elapsed = time.perf_counter() - started
    status = (result.structured_content or {}).get("status")
    if result.is_error or status != "ok":
        raise RuntimeError(f"execute_code failed: {status} {result.content}")
    return elapsed


async def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERNEL_MCP_")} | {
        "KERNEL_MCP_HOST": "127.0.0.1",
        "KERNEL_MCP_PORT": str(port),
        "KERNEL_MCP_WORKSPACE": str(root / "ws"),
        "KERNEL_MCP_RUNTIME_DIR": str(root / "rt"),
        "KERNEL_MCP_MAX_KERNELS": str(args.sessions + 8),
        "KERNEL_MCP_IDLE_TIMEOUT": "86400",
    }

    async def up(http: httpx.AsyncClient) -> bool:
        return (await http.get(f"{base}/health")).status_code == 200

    if args.url:  # a server started elsewhere (e.g. under a profiler)
        base = args.url.removesuffix("/mcp").rstrip("/")
        port = int(base.rsplit(":", 1)[1])
    async with contextlib.AsyncExitStack() as stack:
        if not args.url:
            await stack.enter_async_context(
                server_process("kernel_mcp", ["-m", "kernel_mcp"], env, root / "mcp.log", up)
            )
        server = _server_process(port)
        clients = [
            await stack.enter_async_context(sdk_client(f"{base}/mcp")) for _ in range(args.clients)
        ]
        handles: list[list[str]] = [[] for _ in clients]
        for n in range(args.sessions):
            client = clients[n % len(clients)]
            minted = await client.call_tool("new_session", {})
            handles[n % len(clients)].append(minted.structured_content["session"])

        started = time.monotonic()
        gate = asyncio.Semaphore(SETUP_CONCURRENCY)

        async def define(client: Any, handle: str) -> None:
            async with gate:
                await execute(client, "x = 1", handle)

        await asyncio.gather(
            *(define(c, h) for c, hs in zip(clients, handles, strict=True) for h in hs)
        )
        logger.info(
            "%d sessions with a kernel each in %.1f s", args.sessions, time.monotonic() - started
        )
        for client, own in zip(clients, handles, strict=True):  # one warm-up round
            for handle in own:
                await execute(client, CODE, handle)

        kernels = server.children(recursive=True)
        profiler = _start_profiler(args, server.pid, root) if args.profile else None
        cpu_server, cpu_kernels = _cpu(server), _children_cpu(kernels)
        cpu_self = _cpu(psutil.Process())
        times: list[float] = []
        stop_at = time.monotonic() + args.seconds

        async def drive(client: Any, own: list[str]) -> None:
            n = 0
            while time.monotonic() < stop_at:
                times.append(await execute(client, CODE, own[n % len(own)]))
                n += 1

        wall_start = time.perf_counter()
        await asyncio.gather(*(drive(c, h) for c, h in zip(clients, handles, strict=True)))
        wall = time.perf_counter() - wall_start
        cpu_server = _cpu(server) - cpu_server
        cpu_kernels = _children_cpu(kernels) - cpu_kernels
        cpu_self = _cpu(psutil.Process()) - cpu_self
        if profiler is not None:
            await _stop_profiler(profiler, args)
        async with httpx.AsyncClient() as http:
            health = (await http.get(f"{base}/health")).json()

    count = len(times)
    figures = {
        "sessions": args.sessions,
        "clients": args.clients,
        "seconds": round(wall, 1),
        "executions": count,
        "p50_ms": _ms(_p(times, 50)),
        "p90_ms": _ms(_p(times, 90)),
        "p99_ms": _ms(_p(times, 99)),
        "executions_per_s": round(count / wall, 1),
        "server_cpu_ms_per_execution": round(cpu_server / count * 1000, 3),
        "kernels_cpu_ms_per_execution": round(cpu_kernels / count * 1000, 3),
        "clients_cpu_ms_per_execution": round(cpu_self / count * 1000, 3),
        "server_cpu_share": round(cpu_server / wall, 3),
        "kernels_running": health.get("kernels_running"),
        "cpus": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    return figures


def _server_process(port: int) -> psutil.Process:
    """The kernel_mcp process (the one listening on `port`)."""
    for conn in psutil.net_connections("tcp"):
        listening = conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN
        if listening and conn.pid is not None:
            return psutil.Process(conn.pid)
    raise RuntimeError(f"no process listens on port {port}")


def _start_profiler(args: argparse.Namespace, pid: int, root: Path) -> asyncio.Task[Any]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    fmt = "flamegraph" if str(args.profile).endswith(".svg") else "speedscope"
    command = [spy, "record", "--pid", str(pid), "--nonblocking", "--format", fmt]
    command += ["--output", str(args.profile), "--duration", str(int(args.seconds) + 1)]

    async def run_spy() -> Any:
        return await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )

    return asyncio.create_task(run_spy())


async def _stop_profiler(task: asyncio.Task[Any], args: argparse.Namespace) -> None:
    proc = await task
    try:
        async with asyncio.timeout(60):
            _, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        err = b""
    if proc.returncode != 0:
        logger.warning("py-spy ended with %s: %s", proc.returncode, err.decode()[-500:])
    else:
        logger.info("profile written to %s", args.profile)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--url", help="measure a running kernel_mcp (http://host:port/mcp)")
    parser.add_argument("--profile", type=Path, help="py-spy output (.json speedscope, .svg)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ka-"))
    try:
        async with asyncio.timeout(RUN_DEADLINE):
            figures = await run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    sys.stdout.write(json.dumps(figures) + "\n")


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    logging.getLogger("bench").setLevel(logging.INFO)
    asyncio.run(main())
