"""Transcripts in SQLite (WAL): the only module that imports sqlite3.

Every event of a conversation is appended as it happens, so a crash, a dropped
client or a restart never loses what was said or computed. Calls are short local
writes; they run on the event loop on purpose (a thread hop costs more).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    model TEXT,
    title TEXT,
    client_system TEXT,
    kernel_json TEXT
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    turn INTEGER NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_session ON events(session_id, id);
"""


@dataclass(frozen=True)
class Event:
    id: int
    session_id: str
    turn: int
    type: str
    data: dict[str, Any]
    created: float


@dataclass(frozen=True)
class SessionRecord:
    id: str
    created: float
    updated: float
    model: str | None
    title: str | None
    client_system: str | None
    kernel_json: str | None = None
    turns: int = 0

    @property
    def kernel(self) -> dict[str, Any]:
        """What kernel_info reported for this session's kernel (empty if never asked)."""
        return json.loads(self.kernel_json) if self.kernel_json else {}

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "session",
            "created": int(self.created),
            "updated": int(self.updated),
            "model": self.model,
            "title": self.title,
            "turns": self.turns,
        }


class TranscriptStore:
    """Sessions and their events in one SQLite file."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- sessions -------------------------------------------------------------

    def create_session(self, session_id: str, model: str | None) -> SessionRecord:
        now = time.time()
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO sessions (id, created, updated, model) VALUES (?, ?, ?, ?)",
                (session_id, now, now, model),
            )
        record = self.get_session(session_id)
        assert record is not None
        return record

    def get_session(self, session_id: str) -> SessionRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT s.*, (SELECT COUNT(*) FROM events e WHERE e.session_id = s.id "
                "AND e.type = 'user') AS turns FROM sessions s WHERE s.id = ?",
                (session_id,),
            ).fetchone()
        return SessionRecord(**dict(row)) if row else None

    def list_sessions(self, limit: int = 100) -> list[SessionRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT s.*, (SELECT COUNT(*) FROM events e WHERE e.session_id = s.id "
                "AND e.type = 'user') AS turns FROM sessions s ORDER BY updated DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [SessionRecord(**dict(r)) for r in rows]

    def update_session(self, session_id: str, **fields: Any) -> None:
        allowed = {"model", "title", "client_system", "kernel_json"}
        if not fields or not set(fields) <= allowed:
            raise ValueError(f"unknown session fields: {set(fields) - allowed}")
        columns = ", ".join(f"{k} = ?" for k in fields)
        with self._lock:
            self._db.execute(
                f"UPDATE sessions SET {columns}, updated = ? WHERE id = ?",
                (*fields.values(), time.time(), session_id),
            )

    def delete_session(self, session_id: str) -> bool:
        with self._lock:
            cursor = self._db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
        return cursor.rowcount > 0

    # -- events ---------------------------------------------------------------

    def append(self, session_id: str, turn: int, type_: str, data: dict[str, Any]) -> int:
        """Append one event durably; returns its id."""
        now = time.time()
        payload = json.dumps(data, ensure_ascii=False)
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO events (session_id, turn, type, data, created) VALUES (?, ?, ?, ?, ?)",
                (session_id, turn, type_, payload, now),
            )
            self._db.execute("UPDATE sessions SET updated = ? WHERE id = ?", (now, session_id))
        event_id = cursor.lastrowid
        assert event_id is not None
        return event_id

    def events(self, session_id: str) -> list[Event]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM events WHERE session_id = ? ORDER BY id", (session_id,)
            ).fetchall()
        return [_event(r) for r in rows]

    def event(self, session_id: str, event_id: int) -> Event | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM events WHERE session_id = ? AND id = ?", (session_id, event_id)
            ).fetchone()
        return _event(row) if row else None

    def last_turn(self, session_id: str) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT MAX(turn) FROM events WHERE session_id = ?", (session_id,)
            ).fetchone()
        return int(row[0] or 0)


def _event(row: sqlite3.Row) -> Event:
    return Event(
        id=row["id"],
        session_id=row["session_id"],
        turn=row["turn"],
        type=row["type"],
        data=json.loads(row["data"]),
        created=row["created"],
    )
