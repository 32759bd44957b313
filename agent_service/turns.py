"""Running turns: one at a time per session, each as its own task.

A turn feeds its events into a queue that the HTTP response drains. The task
belongs to the registry, not to the request: a client that disconnects does not
cut an execution in half; the turn finishes and is saved.

A turn holds its session's lock from `Replicas` (a PostgreSQL advisory lock when
replicas share a database) from before it starts until after it ends: the final
event reaches the client only once the lock is released, so a client that sends
its next turn as soon as it hears the end never finds its own session busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from .agent import Failed, Finished, TurnEvent
from .errors import ServiceError, SessionBusy, ShuttingDown
from .replicas import Replicas, TurnLease

logger = logging.getLogger(__name__)


class TurnRegistry:
    """Tracks the running turn of each session."""

    def __init__(self, replicas: Replicas) -> None:
        self._replicas = replicas
        self._running: dict[str, asyncio.Task[None]] = {}
        self._stops: dict[str, asyncio.Event] = {}
        self._reserved: set[str] = set()

    def busy(self, session_id: str) -> bool:
        """Whether this replica runs (or is starting) a turn of the session."""
        return session_id in self._running or session_id in self._reserved

    async def busy_anywhere(self, session_id: str) -> bool:
        """Whether any replica runs a turn of the session."""
        return self.busy(session_id) or await self._replicas.held(session_id)

    async def _lock(self, session_id: str, busy: str) -> TurnLease:
        """The session's lock, or SessionBusy with the `busy` message."""
        if self.busy(session_id):
            raise SessionBusy(busy)
        self._reserved.add(session_id)  # no second request of ours asks meanwhile
        try:
            lease = await self._replicas.lock_turn(session_id)
        finally:
            self._reserved.discard(session_id)
        if lease is None:
            raise SessionBusy(busy)
        return lease

    @contextlib.asynccontextmanager
    async def reserve(self, session_id: str) -> AsyncIterator[None]:
        """Keep turns off the session meanwhile (e.g. while it is being deleted)."""
        lease = await self._lock(
            session_id, f"session {session_id} is busy; try again when its turn ends"
        )
        self._reserved.add(session_id)
        try:
            yield
        finally:
            self._reserved.discard(session_id)
            await lease.release()

    def stop(self, session_id: str) -> bool:
        """Ask the session's running turn to stop (its `stop` event); False if none runs."""
        stop = self._stops.get(session_id)
        if stop is None:
            return False
        stop.set()
        return True

    async def start(
        self,
        session_id: str,
        run: Callable[[Callable[[TurnEvent], None]], Awaitable[None]],
        stop: asyncio.Event | None = None,
    ) -> asyncio.Queue[TurnEvent]:
        """Start `run(emit)` for the session; its events arrive on the returned queue.

        `stop` is set when someone asks the turn to stop; `run` decides what that means.

        Raises:
            SessionBusy: a turn of the session runs here or on another replica.
        """
        lease = await self._lock(
            session_id, f"session {session_id} is already running a turn; wait for it to finish"
        )
        queue: asyncio.Queue[TurnEvent] = asyncio.Queue()
        final: TurnEvent | None = None

        def emit(event: TurnEvent) -> None:
            nonlocal final
            if final is not None:
                return
            if isinstance(event, Finished | Failed):
                final = event  # sent once the lock is released
            else:
                queue.put_nowait(event)

        async def main() -> None:
            try:
                await run(emit)
            except asyncio.CancelledError:
                emit(Failed(ShuttingDown("the turn was stopped: the service is shutting down")))
                raise
            except ServiceError as exc:  # refused before the turn began (e.g. not the caller's)
                emit(Failed(exc))
            except Exception:
                logger.exception("session %s: the turn crashed", session_id)
                emit(Failed(ServiceError("the turn failed unexpectedly; the transcript is kept")))
            finally:
                emit(Failed(ServiceError("the turn ended without an answer")))  # if none came
                try:
                    await asyncio.shield(lease.release())
                finally:
                    self._running.pop(session_id, None)
                    self._stops.pop(session_id, None)
                    assert final is not None
                    queue.put_nowait(final)

        self._stops[session_id] = stop if stop is not None else asyncio.Event()
        self._running[session_id] = asyncio.create_task(main(), name=f"turn-{session_id}")
        return queue

    @property
    def running(self) -> int:
        return len(self._running)

    async def close(self, grace: float = 10.0) -> None:
        """Let running turns finish for `grace` seconds, then cancel them."""
        tasks = list(self._running.values())
        if not tasks:
            return
        logger.info("waiting for %d running turns", len(tasks))
        _done, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
