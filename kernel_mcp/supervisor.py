"""One kernel's lifecycle: a state machine whose changes all run in one task.

::

    ready ──send──▶ busy ──reply+idle──▶ ready
      │               │
      │               ├─ deadline / cancel / interrupt_kernel ─▶ interrupting ─▶ busy
      │               └─ ignored interrupt, death, restart_kernel ─▶ restarting ─▶ ready
      ├─ process exits ─▶ dead ─▶ restarting ─▶ ready
      └─ shutdown (cull, evict, close) ─▶ closed   (final)

Interrupt, restart and shutdown are requests queued to the supervisor's own task: they
run one at a time, in order, and always to the end; a caller who is cancelled stops
waiting, never the work. A restart asked while another is queued or running joins it;
an interrupt likewise; shutdown is final and idempotent. Code is sent only when no
request is pending and no cancelled call is still settling, so an execution never meets
a kernel half-way through a change.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .backend import ExecutionListener, KernelConnection
from .errors import KernelClosed

logger = logging.getLogger(__name__)


class KernelState(enum.StrEnum):
    READY = "ready"
    BUSY = "busy"
    INTERRUPTING = "interrupting"
    RESTARTING = "restarting"
    DEAD = "dead"
    CLOSED = "closed"


class RunningCode(ExecutionListener, Protocol):
    """The listener of the execution in flight: tells whether the kernel has begun it."""

    started: asyncio.Event


@dataclass
class _Request:
    kind: str
    work: Callable[[], Awaitable[None]]
    future: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


def _retrieve(future: asyncio.Future[None]) -> None:
    # Callers may have stopped waiting; the outcome was logged where it happened.
    if not future.cancelled():
        future.exception()


class KernelSupervisor:
    """Owns one kernel connection: serializes its lifecycle and gates its executions."""

    def __init__(self, connection: KernelConnection, cwd: Path, *, start_wait: float) -> None:
        self.connection = connection
        self.cwd = cwd
        self._start_wait = start_wait
        self._state = KernelState.READY
        self._queue: deque[_Request] = deque()
        self._active: _Request | None = None
        self._settling: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._quiet = asyncio.Event()
        self._quiet.set()
        self._running: dict[str, RunningCode] = {}
        self._shut_down = False
        self._task = asyncio.create_task(self._serve(), name=f"kernel-{self.kernel_id[:8]}")

    @property
    def kernel_id(self) -> str:
        return self.connection.kernel_id

    @property
    def state(self) -> KernelState:
        if self._state in (KernelState.READY, KernelState.BUSY) and self.connection.dead:
            return KernelState.DEAD
        return self._state

    @property
    def closed(self) -> bool:
        return self._state is KernelState.CLOSED or self._closing

    @property
    def _closing(self) -> bool:
        requests = [*self._queue, self._active]
        return any(r is not None and r.kind == "shutdown" for r in requests)

    # -- executions -------------------------------------------------------------

    async def send(self, code: str, listener: RunningCode, *, silent: bool = False) -> str:
        """Send `code` once every pending change is done; returns its msg_id."""
        caught_up = False
        while True:
            while not self._quiet.is_set():
                await self._quiet.wait()
            if self.closed:
                raise KernelClosed(f"kernel {self.kernel_id} is shut down")
            if caught_up or not self.connection.changed_elsewhere():
                break
            # Restarted by another replica: a change like ours, so it runs in the same queue.
            caught_up = True
            await self._request("catch_up", self.connection.catch_up)
        msg_id = self.connection.execute(code, listener, silent=silent)
        self._running[msg_id] = listener
        self._state = KernelState.BUSY
        return msg_id

    def done(self, msg_id: str) -> None:
        """The execution `msg_id` is over (or abandoned): stop routing its messages."""
        self.connection.forget(msg_id)
        self._running.pop(msg_id, None)
        if not self._running and self._state is KernelState.BUSY:
            self._state = KernelState.READY

    def settle(self, work: Awaitable[None]) -> None:
        """Run `work` (stopping a cancelled call's code) before anything is sent again."""
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self._settling.add(task)
        self._quiet.clear()
        task.add_done_callback(self._settled)

    def _settled(self, task: asyncio.Task[None]) -> None:
        self._settling.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("kernel %s: settling failed", self.kernel_id, exc_info=task.exception())
        self._update_quiet()

    # -- lifecycle requests --------------------------------------------------------

    async def interrupt(self) -> None:
        """Interrupt the running code, once the kernel has begun it (an idle kernel drops it)."""
        if self.closed:
            return
        await self._request("interrupt", self._interrupt)

    async def restart(self) -> None:
        """Replace the kernel process (state is lost); joins a restart already asked for."""
        if self.closed:
            raise KernelClosed(f"kernel {self.kernel_id} is shut down")
        await self._request("restart", self._restart)

    async def shutdown(self) -> None:
        """Stop the kernel for good; later calls wait for the same shutdown."""
        if self._state is KernelState.CLOSED:
            return
        await self._request("shutdown", self._shutdown)

    async def _request(self, kind: str, work: Callable[[], Awaitable[None]]) -> None:
        if self._task.done():  # nothing would ever serve the request: never wait for it
            raise KernelClosed(f"kernel {self.kernel_id} is closed (its supervisor stopped)")
        pending = [r for r in self._queue if r.kind == kind]
        if kind != "interrupt" and self._active is not None and self._active.kind == kind:
            pending.append(self._active)
        if pending:
            request = pending[0]
        else:
            request = _Request(kind, work)
            request.future.add_done_callback(_retrieve)
            self._queue.append(request)
            self._quiet.clear()
            self._wake.set()
        await asyncio.shield(request.future)

    async def _serve(self) -> None:
        try:
            await self._serve_requests()
        except BaseException:
            # This task was cancelled (or a request's work raised CancelledError): whoever
            # waits for a request must hear of it, not wait forever, and nothing more is
            # sent to the kernel; aclose() still shuts it down.
            self._state = KernelState.CLOSED
            closed = KernelClosed(f"kernel {self.kernel_id}: its supervisor stopped")
            for stranded in self._queue:
                if not stranded.future.done():
                    stranded.future.set_exception(closed)
            self._queue.clear()
            self._update_quiet()
            raise

    async def _serve_requests(self) -> None:
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            request = self._active = self._queue.popleft()
            try:
                await request.work()
            except Exception as exc:
                logger.error("kernel %s: %s failed: %s", self.kernel_id, request.kind, exc)
                request.future.set_exception(exc)
            except BaseException:
                self._queue.appendleft(request)  # unanswered: _serve fails it
                raise
            else:
                request.future.set_result(None)
            finally:
                self._active = None
                self._update_quiet()
            if request.kind == "shutdown":
                for later in self._queue:  # nothing can follow a shutdown
                    later.future.set_exception(KernelClosed(f"kernel {self.kernel_id} is closed"))
                self._queue.clear()
                self._update_quiet()
                return

    def _update_quiet(self) -> None:
        if not self._queue and self._active is None and not self._settling:
            self._quiet.set()

    async def _interrupt(self) -> None:
        waiting = next((r for r in self._running.values() if not r.started.is_set()), None)
        if waiting is not None:
            # Sent before the kernel begins the code, SIGINT hits an idle kernel and is lost.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._start_wait):
                    await waiting.started.wait()
        self._state = KernelState.INTERRUPTING
        try:
            await self.connection.interrupt()
        finally:
            self._state = KernelState.BUSY if self._running else KernelState.READY

    async def _restart(self) -> None:
        self._state = KernelState.RESTARTING
        try:
            await self.connection.restart(self.cwd)
        finally:
            # On failure the connection reports itself dead; the next call restarts again.
            self._running.clear()
            self._state = KernelState.READY

    async def _shutdown(self) -> None:
        self._state = KernelState.CLOSED
        self._running.clear()
        await self.connection.shutdown()
        self._shut_down = True  # not before: cancelled half-way, aclose() shuts it down

    async def aclose(self) -> None:
        """Shut down and stop the supervisor's task."""
        if self._task.done():  # no task to serve the request: shut the kernel down here
            if not self._shut_down:
                self._state = KernelState.CLOSED
                self._shut_down = True
                await self.connection.shutdown()
            return
        await self.shutdown()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
