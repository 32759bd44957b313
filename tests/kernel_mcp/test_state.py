"""Kernel state you can trust: each reproduction of issue 11 against live kernels."""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

import psutil
import pytest
from jupyter_client.blocking import BlockingKernelClient

from kernel_mcp.sessions import SessionManager

from .conftest import LiveText, plain_of, text_of, wait_for_exit, wait_until

pytestmark = pytest.mark.kernel

RUNNING = "import time\nprint('running', flush=True)\ntime.sleep(3600)"
# Ignores SIGINT, so only a restart stops it.
STUBBORN = (
    "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
    "print('running', flush=True)\nwhile True: time.sleep(0.01)"
)


def kernel_processes(manager: SessionManager, session_id: str) -> list[psutil.Process]:
    """Processes started for the session's connection file (one per live kernel)."""
    kernel = manager.existing(session_id).kernel
    assert kernel is not None
    connection_file = kernel.connection.info().connection_file
    assert connection_file
    found = []
    for process in psutil.process_iter(["cmdline", "status", "name"]):
        if process.info["name"] == "bwrap":  # the sandbox around a kernel names its file too
            continue
        cmdline = process.info["cmdline"] or []
        if process.info["status"] != psutil.STATUS_ZOMBIE and any(
            os.path.basename(connection_file) in arg for arg in cmdline
        ):
            found.append(process)
    return found


def attach(manager: SessionManager, session_id: str) -> BlockingKernelClient:
    """A client attached to the session's kernel, as `jupyter console --existing` is."""
    kernel = manager.existing(session_id).kernel
    assert kernel is not None
    client = BlockingKernelClient(connection_file=kernel.connection.info().connection_file)
    client.load_connection_file()
    client.start_channels()
    client.wait_for_ready(timeout=60)
    return client


async def test_concurrent_restarts_become_one_kernel(manager: SessionManager) -> None:
    await manager.execute("s1", "kept = 1")
    await asyncio.gather(*(manager.restart("s1") for _ in range(3)))
    assert len(kernel_processes(manager, "s1")) == 1
    assert manager.stats()["kernels_running"] == 1
    result = await manager.execute("s1", "print('after'); 'kept' in globals()")
    assert text_of(result.outputs) == "after\n", "output still reaches the session"
    assert plain_of(result.outputs) == "False"
    await manager.close_session("s1")
    assert manager.stats()["kernels_running"] == 0


async def test_cancelled_during_its_timeout_restart_leaves_a_working_session(
    manager: SessionManager,
) -> None:
    task = asyncio.create_task(manager.execute("s1", STUBBORN, timeout=1))
    kernel = await _kernel_of(manager, "s1")
    await wait_until(lambda: kernel.state == "restarting", "the timeout's restart")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    result = await manager.execute("s1", "print('fine')", timeout=60)
    assert result.status == "ok"
    assert text_of(result.outputs) == "fine\n"
    assert result.state_lost, "the restart the cancelled call caused is reported"
    assert len(kernel_processes(manager, "s1")) == 1


async def test_a_cancelled_waiter_does_not_skip_the_settling(manager: SessionManager) -> None:
    await manager.execute("s1", "kept = 1")
    live = LiveText()
    first = asyncio.create_task(manager.execute("s1", STUBBORN, timeout=300, on_output=live))
    await live.wait_for("running")
    first.cancel()  # settling now interrupts twice, then restarts
    with pytest.raises(asyncio.CancelledError):
        await first
    session = manager.existing("s1")
    second = asyncio.create_task(manager.execute("s1", "never_ran = 1"))
    await wait_until(session.lock.locked, "the next call to wait for the settling")
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    third = await manager.execute("s1", "print('third'); 'never_ran' in globals()", timeout=60)
    assert third.status == "ok", third.message
    assert text_of(third.outputs) == "third\n"
    assert plain_of(third.outputs) == "False"
    assert third.state_lost
    assert "restarted" in (third.message or "")


async def test_close_during_a_cull_leaves_no_kernel_running(start_manager) -> None:
    manager: SessionManager = await start_manager(idle_timeout=0.2, cull_interval=0.05)
    await manager.execute("s1", "1")
    pid = (await manager.kernel_info("s1")).pid
    assert pid is not None
    await wait_until(lambda: manager.existing("s1").kernel is None, "the cull to begin")
    await manager.close()  # cancels the culler, maybe in the middle of that shutdown
    await wait_for_exit(pid)


async def test_restart_and_close_race_leave_nothing_behind(manager: SessionManager) -> None:
    await manager.execute("s1", "1")
    pid = (await manager.kernel_info("s1")).pid
    assert pid is not None
    await asyncio.gather(manager.restart("s1"), manager.close_session("s1"))
    await wait_for_exit(pid)
    assert manager.stats()["kernels_running"] <= 1
    assert plain_of((await manager.execute("s1", "40 + 2")).outputs) == "42"


@pytest.mark.timeout(300)
async def test_300_mb_in_1_mb_writes_keeps_the_kernel_and_bounds_the_server(
    manager: SessionManager,
) -> None:
    await manager.execute("s1", "kept = 'yes'")
    pid = (await manager.kernel_info("s1")).pid
    server = psutil.Process()
    before = server.memory_info().rss
    peak = before

    def sample(msg: dict[str, Any]) -> None:
        nonlocal peak
        peak = max(peak, server.memory_info().rss)

    code = "import sys\nfor _ in range(300): sys.stdout.write('x' * 2**20)\nprint('END')"
    result = await manager.execute("s1", code, timeout=240, on_output=sample)
    assert result.status == "ok", result.message
    assert result.truncated
    assert text_of(result.outputs).endswith("END\n")
    assert result.truncated_bytes > 290 * 2**20
    assert (await manager.kernel_info("s1")).pid == pid, "the kernel survived"
    assert plain_of((await manager.execute("s1", "kept")).outputs) == "'yes'"
    peak = max(peak, server.memory_info().rss)
    assert peak - before < 100 * 2**20, f"kernel_mcp grew by {(peak - before) >> 20} MB"


@pytest.mark.timeout(300)
async def test_one_huge_write_stays_in_its_own_cell(manager: SessionManager) -> None:
    code = "import sys\nsys.stdout.write('z' * 100_000_000)\nprint('END-MARK')"
    result = await manager.execute("s1", code, timeout=240)
    assert result.status == "ok"
    assert result.truncated
    assert text_of(result.outputs).endswith("END-MARK\n")
    after = await manager.execute("s1", "print('next')")
    assert text_of(after.outputs) == "next\n"
    assert after.background_outputs == []


@pytest.mark.gateway
async def test_an_interrupt_sent_before_the_cell_starts_is_not_lost(start_manager) -> None:
    # The interrupt waits for the kernel to begin the cell, up to interrupt_grace: the
    # suite's 1 s is too short for a kernel starved on a loaded machine.
    manager: SessionManager = await start_manager(interrupt_grace=60)
    await manager.execute("s1", "kept = 1")
    task = asyncio.create_task(manager.execute("s1", RUNNING, timeout=300))
    kernel = await _kernel_of(manager, "s1")
    await wait_until(lambda: kernel.state == "busy", "the code to be sent")
    assert await manager.interrupt("s1")  # the kernel may not have begun it yet
    result = await task
    assert result.outputs[-1]["ename"] == "KeyboardInterrupt"
    assert not result.kernel_restarted
    assert plain_of((await manager.execute("s1", "kept")).outputs) == "1"


@pytest.mark.gateway
async def test_list_variables_runs_no_user_code(manager: SessionManager) -> None:
    code = (
        "import signal, time\n"
        "class Evil:\n"
        "    def __repr__(self):\n"
        "        signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "        while True: time.sleep(0.01)\n"
        "    def __getattr__(self, name):\n"
        "        while True: time.sleep(0.01)\n"
        "    def __len__(self):\n"
        "        while True: time.sleep(0.01)\n"
        "class Meta(type):\n"
        "    def __eq__(cls, other):\n"
        "        while True: time.sleep(0.01)\n"
        "    __hash__ = type.__hash__\n"
        "class Odd(metaclass=Meta): pass\n"
        "evil, odd, n, words = Evil(), Odd(), 3, ['a', 'b']"
    )
    await manager.execute("s1", code)
    rows = {r["name"]: r for r in await manager.list_variables("s1")}
    assert rows["evil"]["type"] == "Evil"
    assert rows["odd"]["type"] == "Odd"
    assert rows["n"]["repr"] == "3"
    assert rows["words"]["repr"] == "<list of 2 items>"
    after = await manager.execute("s1", "n + 1")
    assert plain_of(after.outputs) == "4"
    assert not after.state_lost


async def test_an_attached_client_cannot_shut_the_kernel_down(manager: SessionManager) -> None:
    await manager.execute("s1", "kept = 'yes'")
    pid = (await manager.kernel_info("s1")).pid
    client = attach(manager, "s1")
    try:
        msg_id = client.shutdown()
        reply = await asyncio.to_thread(client.get_control_msg, timeout=30)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["status"] == "error"
        assert "kernel-agent" in reply["content"]["evalue"]
    finally:
        client.stop_channels()
    result = await manager.execute("s1", "kept")
    assert plain_of(result.outputs) == "'yes'"
    assert not result.state_lost
    assert (await manager.kernel_info("s1")).pid == pid


async def test_output_of_an_attached_client_is_not_the_sessions(manager: SessionManager) -> None:
    await manager.execute("s1", "x = 1")
    client = attach(manager, "s1")
    try:
        reply = await asyncio.to_thread(
            client.execute_interactive, "print('from the console')", timeout=30
        )
        assert reply["content"]["status"] == "ok"
    finally:
        client.stop_channels()
    result = await manager.execute("s1", "print('mine')")
    assert text_of(result.outputs) == "mine\n"
    assert result.background_outputs == []


@pytest.mark.gateway("kernel-gateway")  # shared Enterprise Gateway kernels have no pool
async def test_execution_counts_start_at_one_and_internal_requests_leave_no_gap(
    start_manager,
) -> None:
    manager: SessionManager = await start_manager(pool_size=1)
    await wait_until(lambda: manager.stats()["pool_ready"] == 1, "the pool to fill")
    first = await manager.execute("s1", "1")
    assert first.execution_count == 1
    await manager.list_variables("s1")
    second = await manager.execute("s1", "1 / 0")
    assert second.execution_count == 2
    assert "In[2]" in "".join(second.outputs[-1]["traceback"])


async def test_a_large_scatter_plot_arrives_whole(manager: SessionManager) -> None:
    code = (
        "import matplotlib.pyplot as plt, numpy as np\n"
        "rng = np.random.default_rng(0)\n"
        "fig = plt.figure(figsize=(12, 9), dpi=100)\n"
        "plt.scatter(rng.random(20000), rng.random(20000), s=3, c=rng.random(20000))\n"
        "plt.show()"
    )
    result = await manager.execute("s1", code, timeout=120)
    images = [o for o in result.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1, [o["output_type"] for o in result.outputs]
    assert len(images[0]["data"]["image/png"]) > manager.settings.output_cap_bytes // 2
    assert not result.truncated


async def _kernel_of(manager: SessionManager, session_id: str) -> Any:
    await wait_until(
        lambda: (
            session_id in {s.id for s in manager.sessions()}
            and manager.existing(session_id).kernel is not None
        ),
        "the session's kernel",
    )
    return manager.existing(session_id).kernel


async def test_a_kernel_whose_supervisor_task_ended_fails_fast_and_still_shuts_down(
    manager: SessionManager,
) -> None:
    # Were the supervisor's task to end under it, requests queued to it would wait forever
    # (a server's shutdown included); they must fail at once instead.
    from kernel_mcp.errors import KernelClosed

    await manager.execute("s1", "x = 1")
    supervisor = manager.existing("s1").kernel
    assert supervisor is not None
    pid = (await manager.kernel_info("s1")).pid
    assert pid is not None
    supervisor._task.cancel()  # it ends while idle, with a request queued in the same tick
    with pytest.raises(KernelClosed):
        await supervisor.restart()
    with contextlib.suppress(asyncio.CancelledError):
        await supervisor._task
    with pytest.raises(KernelClosed):
        await supervisor.restart()  # asked afterwards: refused at once
    after = await manager.execute("s1", "print('on', 'a', 'kernel')")
    assert text_of(after.outputs) == "on a kernel\n"
    await manager.close()
    await wait_for_exit(pid)
