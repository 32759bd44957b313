"""Benchmark the kernel layer, sandboxed and not, against the raw jupyter_client floor.

Measures, with the same kernel launcher and IPC transport on every side:

1. raw floor: AsyncKernelManager + AsyncKernelClient alone on the unsandboxed kernel
   command; cold start, then `x + 1` timed from sending the request to having both the
   shell reply and the IOPub idle status of that request;
2. raw sandboxed: the same on the bubblewrap command our layer launches, so the
   sandbox's own cost shows apart from the layer's;
3. our layer, unsandboxed (`KERNEL_MCP_SANDBOX=none`) and sandboxed (the default):
   `SessionManager.execute(session, "x + 1")` on one session;
4. first result of a new session: warm pool (pool_size=2) and cold (pool_size=0), with
   and without the sandbox;
5. idle RSS of sandboxed kernels after each executed `1` and idled one second, and of
   the two bubblewrap processes around each.

Latencies run in chunks whose order rotates every chunk, so machine noise hits every
side alike; cold starts alternate the same way.

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
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import ipykernel
import jupyter_client
import psutil
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from kernel_mcp import sandbox
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
RUN_DEADLINE = 170.0  # the whole run, so it ends (and cleans up) inside three minutes
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

    def __init__(
        self,
        spec: KernelSpec,
        env: dict[str, str],
        runtime: Path,
        cwd: Path,
        *,
        ipc_dir: Path | None = None,
    ) -> None:
        """`ipc_dir`: the socket folder a sandboxed spec binds (it must exist)."""
        kernel_id = str(uuid.uuid4())
        specs = _OneSpec()
        specs.spec = spec
        self.km = AsyncKernelManager(
            kernel_name="bench",
            kernel_spec_manager=specs,
            connection_file=str(runtime / f"raw-{kernel_id}.json"),
        )
        self.km.transport = "ipc"
        self.km.ip = str(ipc_dir / "k" if ipc_dir else runtime / f"r-{kernel_id[:8]}")
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

    def kernel_pid(self) -> int | None:
        """The ipykernel process (in a sandbox, a descendant of bwrap)."""
        pid = self.pid()
        return (sandbox.kernel_pid(pid) or pid) if pid else None

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


def _unsandboxed(settings: Settings) -> Settings:
    return settings.model_copy(update={"sandbox": "none"})


def kernel_spec_of(settings: Settings) -> KernelSpec:
    """The unsandboxed kernel command of our layer: the raw floor runs the same."""
    return LocalBackend(_unsandboxed(settings)).kernel_spec()


def floor_env(settings: Settings) -> dict[str, str]:
    """The environment our layer gives an unsandboxed kernel."""
    return LocalBackend(_unsandboxed(settings)).kernel_env()


class RawSandboxed:
    """Raw kernels on the sandboxed command of a started LocalBackend."""

    def __init__(self, backend: LocalBackend, runtime: Path, cwd: Path) -> None:
        self._backend = backend
        self._runtime = runtime
        self._cwd = cwd

    def kernel(self) -> RawKernel:
        sockets = self._runtime / "sockets" / uuid.uuid4().hex[:8]
        sockets.mkdir(mode=0o700, parents=True)
        spec = self._backend.kernel_spec(sockets)
        env = self._backend.kernel_env()
        return RawKernel(spec, env, self._runtime, self._cwd, ipc_dir=sockets)


def _rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 2**20


def _sandbox_rss_mb(kernel_pid: int) -> float:
    """RSS of the bwrap processes that are ancestors of a sandboxed kernel."""
    total = 0.0
    for parent in psutil.Process(kernel_pid).parents():
        if parent.name() != "bwrap":
            break
        total += float(parent.memory_info().rss) / 2**20
    return total


def _bwrap_version() -> str:
    found = subprocess.run(["bwrap", "--version"], capture_output=True, text=True, check=False)
    return found.stdout.strip()


# -- phases --------------------------------------------------------------------


async def _timed_start(raw: RawKernel) -> tuple[float, float]:
    """Cold start, and cold start plus a first result."""
    try:
        start = await raw.start()
        return start, start + await raw.execute("x = 1")
    except BaseException:
        await raw.shutdown()
        raise


async def cold_starts(
    make_raw: Callable[[], RawKernel],
    make_boxed: Callable[[], RawKernel],
    plain: SessionManager,
    boxed: SessionManager,
) -> tuple[RawKernel, RawKernel, dict[str, list[float]]]:
    """Alternate raw and layer cold starts, each with and without the sandbox.

    Keeps the last raw kernel of each kind for the latency phase.
    """
    times: dict[str, list[float]] = {
        name: []
        for name in (
            "raw_start",
            "raw_first_result",
            "raw_start_stock",
            "raw_sandboxed_start",
            "raw_sandboxed_first_result",
            "layer_cold",
            "layer_sandboxed_cold",
        )
    }
    kept: dict[str, RawKernel] = {}
    for i in range(N_COLD):
        last = i == N_COLD - 1
        for name, make in (("raw", make_raw), ("raw_sandboxed", make_boxed)):
            raw = make()
            start, first = await _timed_start(raw)
            times[f"{name}_start"].append(start)
            times[f"{name}_first_result"].append(first)
            if last:
                kept[name] = raw  # the latency phase reuses it
            else:
                await raw.shutdown()

        stock = make_raw()
        try:
            times["raw_start_stock"].append(await stock.start(stock_ready=True))
        finally:
            await stock.shutdown()

        for name, manager in (("layer", plain), ("layer_sandboxed", boxed)):
            session_id = f"cold-{i}"
            times[f"{name}_cold"].append(await layer_execute(manager, session_id, "x = 1"))
            if not last:
                await manager.close_session(session_id)
        logger.info(
            "cold %d: raw %.0f ms (sandboxed %.0f, stock wait_for_ready %.0f), "
            "layer first result %.0f ms (sandboxed %.0f)",
            i,
            times["raw_start"][-1] * 1000,
            times["raw_sandboxed_start"][-1] * 1000,
            times["raw_start_stock"][-1] * 1000,
            times["layer_cold"][-1] * 1000,
            times["layer_sandboxed_cold"][-1] * 1000,
        )
    return kept["raw"], kept["raw_sandboxed"], times


async def latencies(sides: dict[str, Callable[[], Awaitable[float]]]) -> dict[str, list[float]]:
    """`x + 1` round trips of every side, in chunks whose order rotates."""
    names = list(sides)
    for _ in range(N_WARMUP):
        for name in names:
            await sides[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    per_chunk = N_SAMPLES // N_CHUNKS
    for chunk in range(N_CHUNKS):
        shift = chunk % len(names)
        order = names[shift:] + names[:shift]
        if chunk % 2:
            order.reverse()
        for name in order:
            times[name].extend([await sides[name]() for _ in range(per_chunk)])
    logger.info(
        "latency p50: %s (%d samples each)",
        ", ".join(f"{n} {statistics.median(t) * 1000:.2f} ms" for n, t in times.items()),
        N_SAMPLES,
    )
    return times


async def pool_first_results(manager: SessionManager, label: str) -> list[float]:
    """First result of fresh sessions with a full warm pool, refilled in between."""
    times = []
    for i in range(N_POOL):
        await wait_pool_full(manager)
        times.append(await layer_execute(manager, f"pool-{i}", "x = 1"))
        logger.info("pool (%s) %d: first result %.1f ms", label, i, times[-1] * 1000)
    await wait_pool_full(manager)
    return times


async def idle_rss(
    manager: SessionManager, session_ids: list[str]
) -> tuple[list[float], list[float]]:
    """RSS in MB of each session's kernel, and of the bwrap processes around it."""
    for session_id in session_ids:
        await layer_execute(manager, session_id, "1")
    await asyncio.sleep(IDLE_SECONDS)
    kernels, wrappers = [], []
    for session_id in session_ids:
        pid = (await manager.kernel_info(session_id)).pid
        assert pid is not None
        kernels.append(_rss_mb(pid))
        wrappers.append(_sandbox_rss_mb(pid))
    logger.info(
        "idle RSS: kernels %s MB; bwrap around each %s MB",
        ", ".join(f"{s:.1f}" for s in kernels),
        ", ".join(f"{s:.1f}" for s in wrappers),
    )
    return kernels, wrappers


# -- the run -------------------------------------------------------------------


async def run(root: Path) -> dict[str, Any]:
    def settings(name: str, **values: Any) -> Settings:
        return Settings(workspace=root / f"ws-{name}", runtime_dir=root / f"rt-{name}", **values)

    plain_cold = settings("pc", pool_size=0, sandbox="none")
    boxed_cold = settings("bc", pool_size=0, sandbox="bwrap")
    (root / "rt-raw").mkdir(mode=0o700)
    (root / "raw-cwd").mkdir()
    spec = kernel_spec_of(plain_cold)
    env = floor_env(plain_cold)
    logger.info("kernel command: %s", " ".join(spec.argv))
    box_backend = LocalBackend(settings("rb", sandbox="bwrap"))
    await box_backend.start()
    logger.info("sandboxed: %s", " ".join(box_backend.kernel_spec(root / "sockets").argv))
    raw_boxed = RawSandboxed(box_backend, root / "rt-rb", root / "raw-cwd")

    kept: list[RawKernel] = []
    try:
        # Cold starts and latencies first, while no pool kernel is starting.
        async with SessionManager(plain_cold) as plain, SessionManager(boxed_cold) as boxed:
            raw, raw_sandboxed, cold = await cold_starts(
                lambda: RawKernel(spec, env, root / "rt-raw", root / "raw-cwd"),
                raw_boxed.kernel,
                plain,
                boxed,
            )
            kept += [raw, raw_sandboxed]
            session_id = f"cold-{N_COLD - 1}"
            times = await latencies(
                {
                    "raw": lambda: raw.execute(CODE),
                    "raw_sandboxed": lambda: raw_sandboxed.execute(CODE),
                    "layer": lambda: layer_execute(plain, session_id, CODE),
                    "layer_sandboxed": lambda: layer_execute(boxed, session_id, CODE),
                }
            )
            raw_pid = raw.kernel_pid()
            raw_rss = _rss_mb(raw_pid) if raw_pid else None
        async with SessionManager(settings("pp", pool_size=2, sandbox="none")) as manager:
            pool_plain = await pool_first_results(manager, "unsandboxed")
        async with SessionManager(settings("bp", pool_size=2, sandbox="bwrap")) as manager:
            pool_boxed = await pool_first_results(manager, "sandboxed")
            rss, wrapper_rss = await idle_rss(manager, [f"pool-{i}" for i in range(N_RSS)])
    finally:
        for kernel in kept:
            await kernel.shutdown()
        await box_backend.close()

    raw_p50, raw_p99 = _p(times["raw"], 50), _p(times["raw"], 99)
    figures: dict[str, Any] = {"raw_p50_ms": _ms(raw_p50), "raw_p99_ms": _ms(raw_p99)}
    for side in ("raw_sandboxed", "layer", "layer_sandboxed"):
        p50, p99 = _p(times[side], 50), _p(times[side], 99)
        figures |= {f"{side}_p50_ms": _ms(p50), f"{side}_p99_ms": _ms(p99)}
        figures |= {
            f"{side}_ratio_p50": round(p50 / raw_p50, 3),
            f"{side}_ratio_p99": round(p99 / raw_p99, 3),
        }
    med = statistics.median
    bwrap = await asyncio.to_thread(_bwrap_version)
    return figures | {
        "raw_cold_start_ms": _ms(med(cold["raw_start"])),
        "raw_cold_start_stock_ms": _ms(med(cold["raw_start_stock"])),
        "raw_cold_first_result_ms": _ms(med(cold["raw_first_result"])),
        "raw_sandboxed_cold_start_ms": _ms(med(cold["raw_sandboxed_start"])),
        "raw_sandboxed_cold_first_result_ms": _ms(med(cold["raw_sandboxed_first_result"])),
        "first_result_pool_ms": _ms(med(pool_plain)),
        "first_result_pool_sandboxed_ms": _ms(med(pool_boxed)),
        "first_result_cold_ms": _ms(med(cold["layer_cold"])),
        "first_result_cold_sandboxed_ms": _ms(med(cold["layer_sandboxed_cold"])),
        "idle_rss_sandboxed_mb": round(med(rss), 1),
        "bwrap_rss_mb": round(med(wrapper_rss), 1),
        "raw_idle_rss_mb": round(raw_rss, 1) if raw_rss is not None else None,
        "samples": len(times["raw"]),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "jupyter_client": jupyter_client.__version__,
        "ipykernel": ipykernel.__version__,
        "bwrap": bwrap,
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
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
