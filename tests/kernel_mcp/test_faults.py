"""Faults on live kernels: timeouts, deaths, memory, and recovery."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from kernel_mcp.sessions import SessionManager

from .conftest import LiveText, kernel_cwd, plain_of, text_of, wait_until

# A cell that says it is running, then runs until stopped.
RUNNING = "import time\nprint('running', flush=True)\ntime.sleep(3600)"

pytestmark = pytest.mark.kernel


@pytest.mark.gateway
async def test_busy_loop_timeout_interrupts_and_keeps_state(manager: SessionManager) -> None:
    await manager.execute("s1", "kept = 'yes'")
    result = await manager.execute("s1", "print('before', flush=True)\nwhile True: pass", timeout=2)
    assert result.status == "timeout_interrupted"
    assert not result.kernel_restarted
    assert "interrupted" in (result.message or "")
    assert "before" in text_of(result.outputs), "output before the timeout is returned"
    assert plain_of((await manager.execute("s1", "kept")).outputs) == "'yes'"


@pytest.mark.gateway
async def test_sleep_is_interrupted(manager: SessionManager) -> None:
    await manager.execute("s1", "kept = 1")
    result = await manager.execute("s1", "import time; time.sleep(3600)", timeout=1)
    assert result.status == "timeout_interrupted"
    assert result.outputs[-1]["ename"] == "KeyboardInterrupt"
    assert plain_of((await manager.execute("s1", "kept")).outputs) == "1"


@pytest.mark.gateway
async def test_code_ignoring_sigint_is_restarted(manager: SessionManager) -> None:
    await manager.execute("s1", "kept = 1")
    result = await manager.execute("s1", "sum(range(10**12))", timeout=1)
    assert result.status == "restarted_state_lost"
    assert result.kernel_restarted
    assert result.state_lost
    assert "restarted" in (result.message or "")
    after = await manager.execute("s1", "kept")
    assert after.status == "error"
    assert after.outputs[-1]["ename"] == "NameError"


async def test_os_exit_is_detected_and_kernel_restarted(manager: SessionManager) -> None:
    await manager.execute("s1", "kept = 1")
    # A death missed would end at the 300 s deadline with a timeout status instead.
    result = await manager.execute("s1", "import os; os._exit(1)", timeout=300)
    assert result.status == "kernel_died"
    assert result.kernel_restarted
    assert "exited with code 1" in (result.message or "")
    assert "gone" in (result.message or "")
    after = await manager.execute("s1", "print('alive')")
    assert text_of(after.outputs) == "alive\n"
    assert (await manager.execute("s1", "kept")).outputs[-1]["ename"] == "NameError"


async def test_sigkill_from_outside_is_detected(
    manager: SessionManager,
) -> None:
    info = await manager.kernel_info("s1")
    assert info.pid
    live = LiveText()
    task = asyncio.create_task(manager.execute("s1", RUNNING, timeout=300, on_output=live))
    await live.wait_for("running")
    os.kill(info.pid, signal.SIGKILL)
    result = await task
    # Seen as a death, not at the 300 s deadline (that would be a timeout status).
    assert result.status == "kernel_died"
    assert "SIGKILL" in (result.message or "")
    new_info = await manager.kernel_info("s1")
    assert new_info.pid != info.pid
    assert new_info.generation == info.generation + 1
    assert (await manager.execute("s1", "1 + 1")).status == "ok"


async def test_segfault_is_reported(manager: SessionManager) -> None:
    result = await manager.execute("s1", "import ctypes; ctypes.string_at(0)", timeout=30)
    assert result.status == "kernel_died"
    assert "SIGSEGV" in (result.message or "")
    assert (await manager.execute("s1", "2 * 21")).status == "ok"


@pytest.mark.gateway
async def test_memory_bomb_is_a_memory_error_in_a_surviving_kernel(start_manager) -> None:
    manager: SessionManager = await start_manager(memory_limit_bytes=2 * 1024**3)
    await manager.execute("s1", "kept = 'still here'")
    big = await manager.execute("s1", "x = bytearray(8 * 1024**3)")
    assert big.status == "error"
    assert big.outputs[-1]["ename"] == "MemoryError"
    growing = await manager.execute(
        "s1", "chunks = []\nwhile True: chunks.append(bytearray(64 * 1024**2))", timeout=60
    )
    assert growing.status == "error"
    assert growing.outputs[-1]["ename"] == "MemoryError"
    assert plain_of((await manager.execute("s1", "del chunks; kept")).outputs) == "'still here'"


@pytest.mark.gateway
async def test_interrupt_from_another_call(manager: SessionManager) -> None:
    live = LiveText()
    task = asyncio.create_task(manager.execute("s1", RUNNING, timeout=300, on_output=live))
    await live.wait_for("running")
    assert await manager.interrupt("s1")
    result = await task
    assert result.status == "error"
    assert result.outputs[-1]["ename"] == "KeyboardInterrupt"


async def test_restart_on_request_loses_state(manager: SessionManager) -> None:
    await manager.execute("s1", "kept = 1")
    before = await manager.kernel_info("s1")
    await manager.restart("s1")
    after = await manager.kernel_info("s1")
    assert after.kernel_id == before.kernel_id, "the connection file stays valid"
    assert after.pid != before.pid
    result = await manager.execute("s1", "import os; print(os.getcwd()); kept")
    assert text_of(result.outputs).strip() == kernel_cwd(manager, "s1")
    assert result.outputs[-1]["ename"] == "NameError"


@pytest.mark.gateway
async def test_cancelled_caller_interrupts_the_kernel(manager: SessionManager) -> None:
    await manager.execute("s1", "kept = 1")
    live = LiveText()
    task = asyncio.create_task(manager.execute("s1", RUNNING, timeout=300, on_output=live))
    await live.wait_for("running")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Had the sleeping cell not been interrupted, this would wait for it and time out.
    result = await manager.execute("s1", "kept", timeout=30)
    assert result.status == "ok"
    assert plain_of(result.outputs) == "1"
    assert not result.state_lost


async def test_kernel_dead_while_idle_is_reported_and_code_never_runs_twice(
    manager: SessionManager,
) -> None:
    info = await manager.kernel_info("s1")
    kernel = manager.existing("s1").kernel
    assert kernel is not None
    os.kill(info.pid or 0, signal.SIGKILL)
    await wait_until(lambda: kernel.state == "dead", "the death to be seen")
    result = await manager.execute("s1", "ran = 'yes'", timeout=300)
    assert result.status == "kernel_died"
    assert "not run" in (result.message or "")
    after = await manager.execute("s1", "'ran' in globals()")
    assert plain_of(after.outputs) == "False", "the unsent code never ran on the new kernel"


async def test_dead_pool_kernel_is_not_handed_out(start_manager) -> None:
    manager: SessionManager = await start_manager(pool_size=1)
    await wait_until(lambda: manager.stats()["pool_ready"] == 1, "the pool to fill")
    pooled = manager._pool._ready[0]
    os.kill(pooled.info().pid or 0, signal.SIGKILL)
    await wait_until(lambda: pooled.exit_code is not None, "the pooled kernel's death to be seen")
    result = await manager.execute("s1", "21 * 2", timeout=30)
    assert result.status == "ok"
    assert plain_of(result.outputs) == "42"


async def test_shutdown_while_a_call_is_queued_leaks_nothing(manager: SessionManager) -> None:
    await manager.execute("s1", "x = 'old kernel'")
    # Tasks start in creation order and the session lock is FIFO: running, queued, close.
    running = asyncio.create_task(manager.execute("s1", "import time; time.sleep(0.5)"))
    queued = asyncio.create_task(manager.execute("s1", "'fresh' if 'x' not in globals() else x"))
    closing = asyncio.create_task(manager.close_session("s1"))
    assert await closing
    assert (await running).status == "ok"
    result = await queued
    assert result.status == "ok"
    assert plain_of(result.outputs) == "'old kernel'", "a call queued before the close runs first"
    assert manager.stats()["kernels_running"] == 0
    again = await manager.execute("s1", "2 + 2")
    assert plain_of(again.outputs) == "4"
    assert manager.stats()["kernels_running"] == 1, "a later call gets a new, tracked kernel"
