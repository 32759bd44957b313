"""Running turns: one at a time per session, each as its own task.

A turn feeds its events into a queue that the HTTP response drains. The task
belongs to the registry, not to the request: a client that disconnects does not
cut an execution in half; the turn finishes and is saved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator

from .agent import Failed, Finished, TurnEvent
from .errors import ServiceError, SessionBusy, ShuttingDown

logger = logging.getLogger(__name__)


class TurnRegistry:
    """Tracks the running turn of each session."""

    def __init__(self) -> None:
        self._running: dict[str, asyncio.Task[None]] = {}
        self._stops: dict[str, asyncio.Event] = {}
        self._reserved: set[str] = set()

    def busy(self, session_id: str) -> bool:
        return session_id in self._running or session_id in self._reserved

    @contextlib.contextmanager
    def reserve(self, session_id: str) -> Iterator[None]:
        """Keep turns off the session meanwhile (e.g. while it is being deleted)."""
        if self.busy(session_id):
            raise SessionBusy(f"session {session_id} is busy; try again when its turn ends")
        self._reserved.add(session_id)
        try:
            yield
        finally:
            self._reserved.discard(session_id)

    def stop(self, session_id: str) -> bool:
        """Ask the session's running turn to stop (its `stop` event); False if none runs."""
        stop = self._stops.get(session_id)
        if stop is None:
            return False
        stop.set()
        return True

    def start(
        self,
        session_id: str,
        run: Callable[[Callable[[TurnEvent], None]], Awaitable[None]],
        stop: asyncio.Event | None = None,
    ) -> asyncio.Queue[TurnEvent]:
        """Start `run(emit)` for the session; its events arrive on the returned queue.

        `stop` is set when someone asks the turn to stop; `run` decides what that means.
        """
        if self.busy(session_id):
            raise SessionBusy(
                f"session {session_id} is already running a turn; wait for it to finish"
            )
        queue: asyncio.Queue[TurnEvent] = asyncio.Queue()

        final_sent = False

        def emit(event: TurnEvent) -> None:
            nonlocal final_sent
            if final_sent:
                return
            final_sent = isinstance(event, Finished | Failed)
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
                self._running.pop(session_id, None)
                self._stops.pop(session_id, None)
                emit(Failed(ServiceError("the turn ended without an answer")))  # if none came

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
