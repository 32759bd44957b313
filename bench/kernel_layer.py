"""Benchmark the kernel layer against the raw jupyter_client floor, in one run.

Measures, with the same kernel command and IPC transport on both sides:

1. raw floor: AsyncKernelManager + AsyncKernelClient alone; cold start, then
   `x + 1` timed from sending the request to having both the shell reply and the
   IOPub idle status of that request;
2. our layer: `SessionManager.execute(session, "x + 1")` on one session;
3. first result of a new session: warm pool (pool_size=2) and cold (pool_size=0);
4. idle RSS of a kernel after it executed `1` and idled one second.

Raw and layer latencies run in alternating chunks (the order flips every chunk)
so machine noise hits both alike; cold starts alternate the same way.

Run: ``.venv/bin/python bench/kernel_layer.py`` (``make bench``). Prints one JSON
line on stdout; progress goes to stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import ipykernel
import jupyter_client
import psutil
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from kernel_mcp.config import Settings
from kernel_mcp.local_kernel import LocalBackend
from kernel_mcp.sessions import SessionManager

logger = logging.getLogger("bench.kernel_layer")

CODE = "x + 1"
N_SAMPLES = 300
N_WARMUP = 20
N_CHUNKS = 6
N_COLD = 3
N_POOL = 5
N_RSS = 3
IDLE_SECONDS = 1.0
STARTUP_TIMEOUT = 60.0
REPLY_TIMEOUT = 10.0
RUN_DEADLINE = 110.0  # the whole run, so it ends (and cleans up) inside two minutes
READY_PROBE = 0.25  # the resend period of our layer's kernel_info probe, for a fair floor


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _p(samples: list[float], q: int) -> float:
    """The q-th percentile (inclusive method) of samples in seconds."""
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1]


class _OneSpec(KernelSpecManager):
    """Serves one in-memory kernel spec under any name."""

    spec: KernelSpec | None = None

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        assert self.spec is not None
        return self.spec


# -- raw floor: jupyter_client alone -------------------------------------------


class RawKernel:
    """One kernel driven by jupyter_client alone, as a careful caller would."""

    def __init__(self, spec: KernelSpec, env: dict[str, str], runtime: Path, cwd: Path) -> None:
        kernel_id = str(uuid.uuid4())
        specs = _OneSpec()
        specs.spec = spec
        self.km = AsyncKernelManager(
            kernel_name="bench",
            kernel_spec_manager=specs,
            connection_file=str(runtime / f"raw-{kernel_id}.json"),
        )
        self.km.transport = "ipc"
        self.km.ip = str(runtime / f"r-{kernel_id[:8]}")
        self._kernel_id = kernel_id
        self._env = env
        self._cwd = cwd
        self.kc: AsyncKernelClient | None = None

    async def start(self, *, stock_ready: bool = False) -> float:
        """Start the kernel and wait until it is ready; returns the seconds taken.

        `stock_ready` uses jupyter_client's own `wait_for_ready` (all channels, as
        `start_new_async_kernel` does); otherwise a minimal probe: kernel_info
        until both its reply and its IOPub idle status arrive.
        """
        started = time.perf_counter()
        await self.km.start_kernel(kernel_id=self._kernel_id, cwd=str(self._cwd), env=self._env)
        self.kc = self.km.client()
        if stock_ready:
            self.kc.start_channels()
            await self.kc.wait_for_ready(timeout=STARTUP_TIMEOUT)
        else:
            self.kc.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=False)
            await self._ready()
        return time.perf_counter() - started

    async def _ready(self) -> None:
        assert self.kc is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            msg_id = self.kc.kernel_info()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(READY_PROBE):
                    await self._wait(msg_id)
                    return
        raise TimeoutError("raw kernel did not become ready")

    async def execute(self, code: str) -> float:
        """Run `code`; seconds from sending to having its reply and its IOPub idle."""
        assert self.kc is not None
        started = time.perf_counter()
        msg_id = self.kc.execute(code, store_history=True, allow_stdin=False, stop_on_error=True)
        reply = await self._wait(msg_id)
        elapsed = time.perf_counter() - started
        if reply["content"]["status"] != "ok":
            raise RuntimeError(f"raw execute failed: {reply['content']}")
        return elapsed

    async def _wait(self, msg_id: str) -> dict[str, Any]:
        """The shell reply to `msg_id`, after draining IOPub to its idle status."""
        assert self.kc is not None
        while True:
            reply: dict[str, Any] = await self.kc.get_shell_msg(timeout=REPLY_TIMEOUT)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        while True:
            msg = await self.kc.get_iopub_msg(timeout=REPLY_TIMEOUT)
            if (
                msg["parent_header"].get("msg_id") == msg_id
                and msg["msg_type"] == "status"
                and msg["content"]["execution_state"] == "idle"
            ):
                return reply

    def pid(self) -> int | None:
        pid = getattr(self.km.provisioner, "pid", None)
        return int(pid) if pid else None

    async def shutdown(self) -> None:
        if self.kc is not None:
            self.kc.stop_channels()
        try:
            async with asyncio.timeout(10):
                await self.km.shutdown_kernel(now=True)
        except Exception:
            logger.exception("raw kernel %s: shutdown failed", self._kernel_id)
        with contextlib.suppress(OSError):
            os.unlink(self.km.connection_file)


# -- helpers around the layer --------------------------------------------------


async def layer_execute(manager: SessionManager, session_id: str, code: str) -> float:
    started = time.perf_counter()
    result = await manager.execute(session_id, code)
    elapsed = time.perf_counter() - started
    if result.status != "ok":
        raise RuntimeError(f"layer execute failed: {result.status} {result.outputs}")
    return elapsed


async def wait_pool_full(manager: SessionManager) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while manager.stats()["pool_ready"] < manager.settings.pool_size:
        if time.monotonic() > deadline:
            raise TimeoutError("the warm pool did not fill")
        await asyncio.sleep(0.05)


def kernel_spec_of(settings: Settings) -> KernelSpec:
    """The kernel spec our layer launches, so the floor runs the same command."""
    # Private on purpose: the benchmark must follow whatever command the layer uses.
    spec: KernelSpec = LocalBackend(settings)._spec_manager.spec  # type: ignore[assignment]
    return spec


# -- phases --------------------------------------------------------------------


async def cold_starts(
    spec: KernelSpec, env: dict[str, str], root: Path, manager: SessionManager
) -> tuple[RawKernel, dict[str, list[float]]]:
    """Alternate raw cold starts and layer cold first results; keep one raw kernel."""
    runtime = root / "rt-raw"
    cwd = root / "raw-cwd"
    cwd.mkdir()
    times: dict[str, list[float]] = {
        "raw_start": [],
        "raw_first_result": [],
        "raw_start_stock": [],
        "layer_cold": [],
    }
    kept: RawKernel | None = None
    for i in range(N_COLD):
        raw = RawKernel(spec, env, runtime, cwd)
        try:
            start = await raw.start()
            first = start + await raw.execute("x = 1")
        except BaseException:
            await raw.shutdown()
            raise
        times["raw_start"].append(start)
        times["raw_first_result"].append(first)
        if i == N_COLD - 1:
            kept = raw  # the latency phase reuses the last one
        else:
            await raw.shutdown()

        stock = RawKernel(spec, env, runtime, cwd)
        try:
            times["raw_start_stock"].append(await stock.start(stock_ready=True))
        finally:
            await stock.shutdown()

        session_id = f"cold-{i}"
        times["layer_cold"].append(await layer_execute(manager, session_id, "x = 1"))
        if i < N_COLD - 1:
            await manager.close_session(session_id)
        logger.info(
            "cold %d: raw start %.0f ms (stock wait_for_ready %.0f ms), layer first result %.0f ms",
            i,
            times["raw_start"][-1] * 1000,
            times["raw_start_stock"][-1] * 1000,
            times["layer_cold"][-1] * 1000,
        )
    assert kept is not None
    return kept, times


async def latencies(
    raw: RawKernel, manager: SessionManager, session_id: str
) -> tuple[list[float], list[float]]:
    """`x + 1` round trips, raw and layer in alternating chunks."""
    await raw.execute("x = 1")
    await layer_execute(manager, session_id, "x = 1")
    for _ in range(N_WARMUP):
        await raw.execute(CODE)
        await layer_execute(manager, session_id, CODE)
    raw_times: list[float] = []
    layer_times: list[float] = []
    per_chunk = N_SAMPLES // N_CHUNKS
    for chunk in range(N_CHUNKS):
        order = ("raw", "layer") if chunk % 2 == 0 else ("layer", "raw")
        for side in order:
            if side == "raw":
                raw_times.extend([await raw.execute(CODE) for _ in range(per_chunk)])
            else:
                layer_times.extend(
                    [await layer_execute(manager, session_id, CODE) for _ in range(per_chunk)]
                )
    logger.info(
        "latency: raw p50 %.2f ms, layer p50 %.2f ms (%d samples each)",
        statistics.median(raw_times) * 1000,
        statistics.median(layer_times) * 1000,
        len(raw_times),
    )
    return raw_times, layer_times


async def pool_first_results(manager: SessionManager) -> list[float]:
    """First result of fresh sessions with a full warm pool, refilled in between."""
    times = []
    for i in range(N_POOL):
        await wait_pool_full(manager)
        times.append(await layer_execute(manager, f"pool-{i}", "x = 1"))
        logger.info("pool %d: first result %.1f ms", i, times[-1] * 1000)
    await wait_pool_full(manager)
    return times


async def idle_rss(manager: SessionManager, session_ids: list[str]) -> list[float]:
    """RSS in MB of each session's kernel, after executing `1` and idling."""
    for session_id in session_ids:
        await layer_execute(manager, session_id, "1")
    await asyncio.sleep(IDLE_SECONDS)
    sizes = []
    for session_id in session_ids:
        pid = (await manager.kernel_info(session_id)).pid
        assert pid is not None
        sizes.append(psutil.Process(pid).memory_info().rss / 2**20)
    logger.info("idle RSS: %s MB", ", ".join(f"{s:.1f}" for s in sizes))
    return sizes


# -- the run -------------------------------------------------------------------


async def run(root: Path) -> dict[str, Any]:
    cold_settings = Settings(workspace=root / "ws-cold", runtime_dir=root / "rt-c", pool_size=0)
    pool_settings = Settings(workspace=root / "ws-pool", runtime_dir=root / "rt-p", pool_size=2)
    (root / "rt-raw").mkdir(mode=0o700)
    spec = kernel_spec_of(cold_settings)
    env = LocalBackend(cold_settings).kernel_env()
    logger.info("kernel command: %s", " ".join(spec.argv))

    raw: RawKernel | None = None
    try:
        # Cold starts and latencies first, while no pool kernel is starting.
        async with SessionManager(cold_settings) as cold_manager:
            raw, cold = await cold_starts(spec, env, root, cold_manager)
            raw_times, layer_times = await latencies(raw, cold_manager, f"cold-{N_COLD - 1}")
            raw_pid = raw.pid()
            raw_rss = psutil.Process(raw_pid).memory_info().rss / 2**20 if raw_pid else None
            await raw.shutdown()
            raw = None
        async with SessionManager(pool_settings) as pool_manager:
            pool_times = await pool_first_results(pool_manager)
            rss = await idle_rss(pool_manager, [f"pool-{i}" for i in range(N_RSS)])
    finally:
        if raw is not None:
            await raw.shutdown()

    raw_p50, raw_p99 = _p(raw_times, 50), _p(raw_times, 99)
    layer_p50, layer_p99 = _p(layer_times, 50), _p(layer_times, 99)
    return {
        "raw_p50_ms": _ms(raw_p50),
        "raw_p99_ms": _ms(raw_p99),
        "layer_p50_ms": _ms(layer_p50),
        "layer_p99_ms": _ms(layer_p99),
        "ratio_p50": round(layer_p50 / raw_p50, 3),
        "ratio_p99": round(layer_p99 / raw_p99, 3),
        "raw_cold_start_ms": _ms(statistics.median(cold["raw_start"])),
        "raw_cold_start_stock_ms": _ms(statistics.median(cold["raw_start_stock"])),
        "raw_cold_first_result_ms": _ms(statistics.median(cold["raw_first_result"])),
        "first_result_pool_ms": _ms(statistics.median(pool_times)),
        "first_result_cold_ms": _ms(statistics.median(cold["layer_cold"])),
        "idle_rss_mb": round(statistics.median(rss), 1),
        "raw_idle_rss_mb": round(raw_rss, 1) if raw_rss is not None else None,
        "samples": len(raw_times),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
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
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    logging.getLogger("kernel_mcp").setLevel(logging.WARNING)
    asyncio.run(main())
