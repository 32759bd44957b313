"""Execution on live kernels: state, rich outputs, limits, concurrency."""

from __future__ import annotations

import asyncio

import pytest

from kernel_mcp.errors import CapacityError, InvalidSessionId
from kernel_mcp.sessions import SessionManager

from .conftest import LiveText, kernel_cwd, plain_of, text_of, wait_for_exit, wait_until

pytestmark = pytest.mark.kernel


@pytest.mark.gateway
async def test_state_persists_across_executions(manager: SessionManager) -> None:
    first = await manager.execute("s1", "x = 41")
    second = await manager.execute("s1", "x + 1")
    assert first.status == "ok"
    assert second.status == "ok"
    assert plain_of(second.outputs) == "42"
    assert second.execution_count == first.execution_count + 1


@pytest.mark.gateway
async def test_user_exception_is_an_error_result(manager: SessionManager) -> None:
    result = await manager.execute("s1", "1 / 0")
    assert result.status == "error"
    error = result.outputs[-1]
    assert error["output_type"] == "error"
    assert error["ename"] == "ZeroDivisionError"
    assert any("ZeroDivisionError" in line for line in error["traceback"])
    assert (await manager.execute("s1", "print('still here')")).status == "ok"


@pytest.mark.gateway
async def test_streams_are_merged_per_name(manager: SessionManager) -> None:
    code = "import sys\nfor i in range(3): print(i)\nsys.stderr.write('warn\\n')\nprint('end')"
    result = await manager.execute("s1", code)
    # ipykernel flushes each stream on its own schedule: order within a stream is kept.
    assert text_of(result.outputs) == "0\n1\n2\nend\n"
    assert text_of(result.outputs, "stderr") == "warn\n"


@pytest.mark.gateway
async def test_matplotlib_figure_arrives_as_png(manager: SessionManager) -> None:
    code = "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()"
    result = await manager.execute("s1", code, timeout=60)
    assert result.status == "ok", result.outputs
    images = [o for o in result.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1
    assert images[0]["output_type"] == "display_data"
    import base64

    assert base64.b64decode(images[0]["data"]["image/png"]).startswith(b"\x89PNG")


async def test_dataframe_arrives_as_html(manager: SessionManager) -> None:
    code = "import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})"
    result = await manager.execute("s1", code, timeout=60)
    assert result.status == "ok", result.outputs
    data = result.outputs[-1]["data"]
    assert "<table" in data["text/html"]
    assert "text/plain" in data


@pytest.mark.gateway
async def test_display_update_and_clear_output(manager: SessionManager) -> None:
    code = (
        "from IPython.display import display, clear_output\n"
        "h = display('first', display_id=True)\n"
        "h.update('second')\n"
        "print('gone'); clear_output(); print('kept')"
    )
    result = await manager.execute("s1", code)
    assert text_of(result.outputs) == "kept\n"
    code = "h = display('a', display_id=True)\nh.update('b')"
    result = await manager.execute("s1", code)
    assert result.outputs[0]["data"]["text/plain"] == "'b'"


# The 120 s execution deadline under test must fire before pytest-timeout's backstop.
@pytest.mark.timeout(300)
@pytest.mark.gateway
async def test_huge_print_is_truncated_with_head_tail_and_marker(manager: SessionManager) -> None:
    code = "print('<head>' + 'y' * 50_000_000 + '<tail>')"
    result = await manager.execute("s1", code, timeout=120)
    assert result.status == "ok"
    assert result.truncated
    text = "".join(o["text"] for o in result.outputs)
    cap = manager.settings.output_cap_bytes
    assert len(text) < cap + 200
    assert text.startswith("<head>")
    assert text.rstrip().endswith("<tail>")
    assert f"{result.truncated_bytes:,} bytes truncated" in text
    assert result.output_file
    marker = f"\n[... {result.truncated_bytes:,} bytes truncated; full text in "
    assert f"{marker}{result.output_file} ...]\n" in text
    marker_size = len(marker) + len(result.output_file) + len(" ...]\n")
    printed = len("<head>") + 50_000_000 + len("<tail>\n")
    assert len(text) - marker_size + result.truncated_bytes == printed, "every byte accounted for"
    assert result.truncated_bytes > 40_000_000
    # The whole text was kept in the session folder, where read_file and the user find it.
    full = (manager.settings.workspace / "s1" / result.output_file).read_text()
    assert full == "<head>" + "y" * 50_000_000 + "<tail>\n"


# The 120 s execution deadline under test must fire before pytest-timeout's backstop.
@pytest.mark.timeout(300)
async def test_twenty_thousand_displays_are_all_accounted_for(manager: SessionManager) -> None:
    code = "from IPython.display import display\nfor i in range(20_000): display(i)"
    result = await manager.execute("s1", code, timeout=120)
    assert result.status == "ok"
    shown = [o for o in result.outputs if o["output_type"] == "display_data"]
    if result.truncated:
        marker = next(o for o in result.outputs if "outputs omitted" in o.get("text", ""))
        omitted = int(
            marker["text"].split("bytes truncated; ")[1].split(" outputs")[0].replace(",", "")
        )
    else:
        omitted = 0
    assert len(shown) + omitted == 20_000
    values = [int(o["data"]["text/plain"]) for o in shown]
    assert values == sorted(values)
    assert values[0] == 0
    assert values[-1] == 19_999


# The 120 s execution deadline under test must fire before pytest-timeout's backstop.
@pytest.mark.timeout(300)
@pytest.mark.gateway
async def test_truncated_displays_are_counted_in_the_marker(
    start_manager,
) -> None:
    manager = await start_manager(output_cap_bytes=4096)
    code = "from IPython.display import display\nfor i in range(5_000): display(i)"
    result = await manager.execute("s1", code, timeout=120)
    assert result.truncated
    shown = [o for o in result.outputs if o["output_type"] == "display_data"]
    marker = next(o for o in result.outputs if "outputs omitted" in o.get("text", ""))
    omitted = int(
        marker["text"].split("bytes truncated; ")[1].split(" outputs")[0].replace(",", "")
    )
    assert len(shown) + omitted == 5_000
    assert shown[-1]["data"]["text/plain"] == "4999"


@pytest.mark.gateway
async def test_input_fails_at_once(manager: SessionManager) -> None:
    result = await manager.execute("s1", "input('name? ')", timeout=300)
    assert result.status == "error"
    # Answered by the kernel at once, not cut by the 300 s deadline.
    assert result.outputs[-1]["ename"] == "StdinNotImplementedError"


@pytest.mark.gateway
async def test_background_thread_output_is_reported_with_the_next_call(
    manager: SessionManager,
) -> None:
    code = (
        "import threading, time\n"
        "def late():\n    time.sleep(0.3)\n    print('from the thread')\n"
        "threading.Thread(target=late).start()\nprint('cell done')"
    )
    first = await manager.execute("s1", code)
    assert text_of(first.outputs) == "cell done\n"
    session = manager.existing("s1")
    await wait_until(lambda: bool(session.background.outputs()), "the thread's late output")
    second = await manager.execute("s1", "print('next')")
    assert text_of(second.outputs) == "next\n"
    assert text_of(second.background_outputs) == "from the thread\n"


@pytest.mark.gateway
async def test_sessions_are_isolated(manager: SessionManager) -> None:
    await manager.execute("alice", "secret = 'a'\nopen('mine.txt', 'w').write('a')")
    result = await manager.execute(
        "bob", "import os\nprint('secret' in globals(), os.listdir('.'))"
    )
    assert text_of(result.outputs) == "False []\n"
    cwd_a = text_of((await manager.execute("alice", "import os; print(os.getcwd())")).outputs)
    cwd_b = text_of((await manager.execute("bob", "import os; print(os.getcwd())")).outputs)
    assert cwd_a.strip() == kernel_cwd(manager, "alice")
    assert cwd_b.strip() == kernel_cwd(manager, "bob")
    assert (manager.settings.workspace / "alice" / "mine.txt").read_text() == "a"


async def test_kernel_environment_holds_no_secrets(
    start_manager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-live-should-not-leak")
    monkeypatch.setenv("KERNEL_MCP_TOKEN", "server-token")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    manager = await start_manager()
    code = "import os\nprint(sorted(os.environ))\nprint(repr(dict(os.environ)))"
    text = text_of((await manager.execute("s1", code)).outputs)
    for secret in ("sk-live-should-not-leak", "server-token", "aws-secret", "OPENAI_API_KEY"):
        assert secret not in text


async def test_ten_sessions_start_concurrently(manager: SessionManager) -> None:
    ids = [f"c{i}" for i in range(10)]
    results = await asyncio.gather(*(manager.execute(s, f"print({i})") for i, s in enumerate(ids)))
    assert [r.status for r in results] == ["ok"] * 10, [r.message for r in results]
    assert [int(text_of(r.outputs)) for r in results] == list(range(10))
    # Host pids: inside its sandbox every kernel has the same pid of its own namespace.
    pids = {(await manager.kernel_info(s)).pid for s in ids}
    assert len(pids) == 10, "each session has its own kernel process"
    assert manager.stats()["kernels_running"] == 10


@pytest.mark.gateway
async def test_concurrent_calls_on_one_session_queue_in_order(manager: SessionManager) -> None:
    await manager.execute("s1", "log = []")
    codes = [
        f"import time; time.sleep(0.05); log.append({i}); print('call', {i})" for i in range(8)
    ]
    results = await asyncio.gather(*(manager.execute("s1", c) for c in codes))
    for i, result in enumerate(results):
        assert text_of(result.outputs) == f"call {i}\n"
    final = await manager.execute("s1", "log")
    assert plain_of(final.outputs) == str(list(range(8)))


async def test_at_capacity_the_least_recently_used_idle_kernel_is_evicted(
    start_manager,
) -> None:
    manager = await start_manager(max_kernels=2)
    await manager.execute("old", "kept = 1")
    await manager.execute("recent", "kept = 2")
    old_pid = (await manager.kernel_info("old")).pid
    third = await manager.execute("third", "1 + 1")
    assert third.status == "ok"
    assert not third.state_lost
    assert manager.stats()["kernels_running"] == 2
    assert old_pid is not None
    await wait_for_exit(old_pid)
    # The evicted session is told on its next call; the other one kept its state.
    told = await manager.execute("old", "'kept' in globals()")
    assert plain_of(told.outputs) == "False"
    assert told.state_lost
    assert "make room" in (told.message or "")
    assert plain_of((await manager.execute("third", "2")).outputs) == "2"


@pytest.mark.gateway
async def test_at_capacity_with_every_kernel_busy_is_a_clear_error(start_manager) -> None:
    manager = await start_manager(max_kernels=1)
    live = LiveText()
    running = asyncio.create_task(
        manager.execute(
            "one",
            "import time\nprint('running', flush=True)\ntime.sleep(3600)",
            timeout=300,
            on_output=live,
        )
    )
    await live.wait_for("running")
    with pytest.raises(CapacityError, match="KERNEL_MCP_MAX_KERNELS"):
        await manager.execute("two", "1")
    assert await manager.interrupt("one")
    assert (await running).outputs[-1]["ename"] == "KeyboardInterrupt"


async def test_invalid_session_ids_are_refused(manager: SessionManager) -> None:
    for bad in ("../etc", "", ".hidden", "a/b", "x" * 200):
        with pytest.raises(InvalidSessionId):
            await manager.execute(bad, "1")


async def test_list_variables_and_kernel_info(manager: SessionManager) -> None:
    await manager.execute("s1", "import numpy as np\nn = 3\narr = np.zeros((2, 5))\n_private = 1")
    rows = {r["name"]: r for r in await manager.list_variables("s1")}
    assert set(rows) == {"n", "arr"}
    assert rows["n"] == {"name": "n", "type": "int", "repr": "3"}
    assert rows["arr"]["shape"] == [2, 5]
    info = await manager.kernel_info("s1")
    assert info.language_info["name"] == "python"
    assert info.connection_file
    assert info.connection_file.endswith(".json")
    assert info.console_command == f"jupyter console --existing {info.connection_file}"
