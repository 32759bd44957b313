"""ServerThread: a server slow to stop says what it still waits for."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
from collections.abc import AsyncIterator

import pytest
from starlette.applications import Starlette

from kernel_agent_pytest import ServerThread


def test_a_slow_shutdown_logs_the_tasks_it_waits_for(caplog: pytest.LogCaptureFixture) -> None:
    released = threading.Event()

    async def closing_the_pool() -> None:
        while not released.is_set():  # released by the test, from its own thread
            await asyncio.sleep(0.05)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await asyncio.create_task(closing_the_pool(), name="closing-the-pool")

    server = ServerThread(Starlette(lifespan=lifespan), "slow", 0, 60, report_after=0.5).start()

    def release_once_reported() -> None:
        while "closing-the-pool" not in caplog.text:
            released.wait(0.05)
        released.set()

    watcher = threading.Thread(target=release_once_reported, daemon=True)
    with caplog.at_level(logging.WARNING, logger="kernel_agent_pytest.servers"):
        watcher.start()
        server.stop()  # returns once the shutdown, released after the report, ends
    watcher.join(60)
    assert released.is_set()
    assert re.search(r"slow still stopping after \d+\.\d s; its tasks:", caplog.text)
    assert "in closing_the_pool" in caplog.text, "the stack shows where the task waits"
    assert not server.running


def test_a_blocked_loop_reports_where_its_thread_is(caplog: pytest.LogCaptureFixture) -> None:
    released = threading.Event()

    def closing_synchronously() -> None:
        released.wait(60)  # blocks the server's loop: its tasks cannot be asked for

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        closing_synchronously()

    server = ServerThread(Starlette(lifespan=lifespan), "blocked", 0, 60, report_after=0.5).start()

    def release_once_reported() -> None:
        while "closing_synchronously" not in caplog.text:
            released.wait(0.05)
        released.set()

    watcher = threading.Thread(target=release_once_reported, daemon=True)
    with caplog.at_level(logging.WARNING, logger="kernel_agent_pytest.servers"):
        watcher.start()
        server.stop()
    watcher.join(60)
    assert "its loop did not answer; the thread is at" in caplog.text
    assert "in closing_synchronously" in caplog.text
    assert not server.running
