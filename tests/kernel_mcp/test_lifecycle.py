"""Kernel lifecycle: pool, culling, shutdown hygiene, stale files."""

from __future__ import annotations

import json
import os

import psutil
import pytest

from kernel_mcp.sessions import SessionManager

from .conftest import kernel_cwd, plain_of, text_of, wait_for_exit, wait_until

pytestmark = pytest.mark.kernel


async def _pool_ready(manager: SessionManager, count: int) -> None:
    await wait_until(lambda: manager.stats()["pool_ready"] >= count, "the pool to fill")


async def test_pool_kernels_are_claimed_once_and_refilled(start_manager) -> None:
    manager: SessionManager = await start_manager(pool_size=2)
    await _pool_ready(manager, 2)
    pooled = {k.kernel_id for k in manager._pool._ready}
    first = await manager.execute("a", "import os; print(os.getcwd()); open('f', 'w').close()")
    assert text_of(first.outputs).strip() == kernel_cwd(manager, "a")
    assert (manager.settings.workspace / "a" / "f").exists()
    # The claim's speed is measured in bench/kernel_layer.py; here: it was a pooled kernel.
    assert (await manager.kernel_info("a")).kernel_id in pooled
    await manager.execute("b", "x = 'b'")
    infos = [await manager.kernel_info(s) for s in ("a", "b")]
    assert len({i.kernel_id for i in infos}) == 2
    for info in infos:  # claimed kernels are listed with the session kernels
        assert info.connection_file
        assert os.path.dirname(info.connection_file) == str(manager.settings.connection_dir)
        assert os.path.exists(info.connection_file)
    await _pool_ready(manager, 2)
    assert manager.stats()["kernels_running"] == 2
    result = await manager.execute("a", "'x' in globals()")
    assert plain_of(result.outputs) == "False"


async def test_idle_kernel_is_culled_and_the_next_call_is_told(start_manager) -> None:
    manager: SessionManager = await start_manager(idle_timeout=0.6, cull_interval=0.1)
    await manager.execute("s1", "kept = 1")
    old = await manager.kernel_info("s1")
    assert old.pid is not None
    await wait_for_exit(old.pid)
    result = await manager.execute("s1", "'kept' in globals()")
    assert plain_of(result.outputs) == "False"
    assert result.state_lost
    assert "idle" in (result.message or "")
    follow_up = await manager.execute("s1", "1")
    assert not follow_up.state_lost


async def test_busy_kernel_is_not_culled(start_manager) -> None:
    manager: SessionManager = await start_manager(idle_timeout=0.3, cull_interval=0.1)
    result = await manager.execute("s1", "import time; time.sleep(1.5); kept = 1", timeout=10)
    assert result.status == "ok"
    assert plain_of((await manager.execute("s1", "kept")).outputs) == "1"


async def test_shutdown_kills_kernels_and_their_children(start_manager) -> None:
    manager: SessionManager = await start_manager()
    result = await manager.execute(
        "s1", "import subprocess\np = subprocess.Popen(['sleep', '1000'])"
    )
    assert result.status == "ok"
    kernel_pid = (await manager.kernel_info("s1")).pid
    assert kernel_pid is not None
    # The pid the kernel sees is of its own PID namespace; find the child from outside.
    children = psutil.Process(kernel_pid).children()
    assert [c.name() for c in children] == ["sleep"]
    child = children[0].pid
    await manager.close()
    for pid in (child, kernel_pid):
        await wait_for_exit(pid)


async def test_close_session_shuts_its_kernel(manager: SessionManager) -> None:
    pid = (await manager.kernel_info("s1")).pid
    assert await manager.close_session("s1")
    assert not await manager.close_session("s1")
    assert pid is not None
    await wait_for_exit(pid)  # the sandbox's kernel exits just after bwrap is stopped


async def test_stale_connection_files_are_cleaned_at_start(start_manager, make_settings) -> None:
    runtime = make_settings().runtime_dir
    runtime.mkdir(parents=True)
    stale = runtime / "kernels" / "kernel-0000-dead.json"
    stale.parent.mkdir()
    stale.write_text(json.dumps({"shell_port": 1}))
    manager: SessionManager = await start_manager()
    assert not stale.exists()
    assert oct(runtime.stat().st_mode & 0o777) == "0o700"
    info = await manager.kernel_info("s1")
    assert info.connection_file
    assert info.connection_file.startswith(str(runtime / "kernels"))


async def test_a_second_server_on_the_same_runtime_keeps_live_files(
    start_manager, make_settings
) -> None:
    first: SessionManager = await start_manager()
    connection_file = (await first.kernel_info("s1")).connection_file
    assert connection_file
    second: SessionManager = await start_manager(workspace=make_settings().workspace / "other")
    assert second.settings.runtime_dir == first.settings.runtime_dir
    assert os.path.exists(connection_file), "a live server's connection file was deleted"
