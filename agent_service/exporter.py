"""Keeps notebooks/<session>.ipynb current, off the turn's critical path.

After a turn the export is scheduled, not awaited: the client hears the turn is
over at once. Exports of one session run one at a time and each reads the
transcript when it starts, so the file on disk always ends at the latest turn;
requests that arrive while one is pending are coalesced into it.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from .notebook import build_notebook, write_atomic
from .store import TranscriptStore

logger = logging.getLogger(__name__)


class NotebookExporter:
    """Background notebook writer, one lock per session."""

    def __init__(self, store: TranscriptStore, folder: Path) -> None:
        self._store = store
        self._folder = folder
        self._locks: dict[str, asyncio.Lock] = {}
        self._pending: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def path(self, session_id: str) -> Path:
        return self._folder / f"{session_id}.ipynb"

    def schedule(self, session_id: str) -> None:
        """Export the session soon; a no-op if an export is already waiting to start."""
        if session_id in self._pending:
            return
        self._pending.add(session_id)
        task = asyncio.create_task(self._export(session_id), name=f"export-{session_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _export(self, session_id: str) -> None:
        lock = self._locks.setdefault(session_id, asyncio.Lock())
        async with lock:
            self._pending.discard(session_id)  # later requests need a new export
            await asyncio.to_thread(self.export_now, session_id)

    def export_now(self, session_id: str) -> Path | None:
        """Write the notebook from the transcript; logs and returns None on failure."""
        try:
            record = self._store.get_session(session_id)
            if record is None:
                return None
            path = self.path(session_id)
            write_atomic(build_notebook(record, self._store.events(session_id)), path)
            return path
        except Exception:
            logger.exception("session %s: notebook export failed", session_id)
            return None

    async def flush(self) -> None:
        """Wait for every scheduled export (shutdown, tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
