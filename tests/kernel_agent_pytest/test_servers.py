"""ServerThread: a server slow to stop says what it still waits for."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from starlette.applications import Starlette

from kernel_agent_pytest import ServerThread


def _stop_slow_server(
    caplog: pytest.LogCaptureFixture,
    name: str,
    closing: Callable[[], Awaitable[None] | None],
    released: threading.Event,
    reported: str,
) -> ServerThread:
    """Serve an app whose shutdown runs `closing`; stop it, releasing `released` once the
    log shows `reported` (so the stop returns only if the report came first)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        waiting = closing()
        if waiting is not None:
            await waiting

    server = ServerThread(Starlette(lifespan=lifespan), name, 0, 60, report_after=0.5).start()

    def release_once_reported() -> None:
        while reported not in caplog.text:
            released.wait(0.05)
        released.set()

    watcher = threading.Thread(target=release_once_reported, daemon=True)
    with caplog.at_level(logging.WARNING, logger="kernel_agent_pytest.servers"):
        watcher.start()
        server.stop()
    watcher.join(60)
    assert released.is_set()
    assert not server.running
    return server


def test_a_slow_shutdown_logs_the_tasks_it_waits_for(caplog: pytest.LogCaptureFixture) -> None:
    released = threading.Event()

    async def closing_the_pool() -> None:
        await asyncio.to_thread(released.wait, 60)  # released by the test, once reported

    def closing() -> Awaitable[None]:
        return asyncio.create_task(closing_the_pool(), name="closing-the-pool")

    _stop_slow_server(caplog, "slow", closing, released, "closing-the-pool")
    assert re.search(r"slow still stopping after \d+\.\d s; its tasks:", caplog.text)
    assert "in closing_the_pool" in caplog.text, "the stack shows where the task waits"


def test_a_blocked_loop_reports_where_its_thread_is(caplog: pytest.LogCaptureFixture) -> None:
    released = threading.Event()

    def closing_synchronously() -> None:
        released.wait(60)  # blocks the server's loop: its tasks cannot be asked for

    _stop_slow_server(caplog, "blocked", closing_synchronously, released, "closing_synchronously")
    assert "its loop did not answer; the thread is at" in caplog.text
    assert "in closing_synchronously" in caplog.text
