"""Running turns: one at a time per session, each as its own task.

A turn feeds its events into a queue that the HTTP response drains. The task
belongs to the registry, not to the request: a client that disconnects does not
cut an execution in half; the turn finishes and is saved.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from .agent import Failed, Finished, TurnEvent
from .errors import SessionBusy

logger = logging.getLogger(__name__)


class TurnRegistry:
    """Tracks the running turn of each session."""

    def __init__(self) -> None:
        self._running: dict[str, asyncio.Task[None]] = {}

    def busy(self, session_id: str) -> bool:
        return session_id in self._running

    def start(
        self, session_id: str, run: Callable[[Callable[[TurnEvent], None]], Awaitable[None]]
    ) -> asyncio.Queue[TurnEvent]:
        """Start `run(emit)` for the session; its events arrive on the returned queue."""
        if session_id in self._running:
            raise SessionBusy(
                f"session {session_id} is already running a turn; wait for it to finish"
            )
        queue: asyncio.Queue[TurnEvent] = asyncio.Queue()

        async def main() -> None:
            try:
                await run(queue.put_nowait)
            except asyncio.CancelledError:
                queue.put_nowait(Failed(SessionBusy("the turn was cancelled at shutdown")))
                raise
            finally:
                self._running.pop(session_id, None)
                queue.put_nowait(Finished("end"))  # sentinel if the turn ended without one

        self._running[session_id] = asyncio.create_task(main(), name=f"turn-{session_id}")
        return queue

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
