"""Transcripts in SQLite (WAL): the only module that imports sqlite3.

Every event of a conversation is appended as it happens, so a crash, a dropped
client or a restart never loses what was said or computed. Heavy outputs live in
their own table, so the rows a turn reads stay small. Each thread has its own
connection: in WAL mode readers never wait, so a long read in a worker thread (a
notebook export, a session page) never holds up the event loop's short writes;
writes wait only for each other, and bulk writes go in bounded transactions.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .store import Event, NewEvent, SessionRecord, merge_heavy, split_heavy

_SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    model TEXT,
    title TEXT,
    client_system TEXT,
    kernel_json TEXT,
    owner TEXT,
    turns INTEGER NOT NULL DEFAULT 0,
    last_turn INTEGER NOT NULL DEFAULT 0,
    kernel_identity TEXT,
    digest TEXT,
    last_event INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    turn INTEGER NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    created REAL NOT NULL,
    tokens INTEGER,
    tokens_short INTEGER
);
CREATE INDEX IF NOT EXISTS events_by_session ON events(session_id, id);
CREATE TABLE IF NOT EXISTS outputs (
    event_id INTEGER PRIMARY KEY REFERENCES events(id) ON DELETE CASCADE,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS live_output (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id INTEGER NOT NULL REFERENCES events(id) ON DELETE CASCADE,
    text TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS live_output_by_event ON live_output(event_id, id);
CREATE INDEX IF NOT EXISTS sessions_by_digest ON sessions(digest);
CREATE INDEX IF NOT EXISTS sessions_by_updated ON sessions(updated);
"""
_SESSION_FIELDS = {
    "model",
    "title",
    "client_system",
    "kernel_json",
    "owner",
    "kernel_identity",
    "digest",
}
_PAGE = 256
_WRITE_BATCH = 500
_BUSY_TIMEOUT = 30.0


class SqliteStore:
    """Sessions and their events in one SQLite file (implements `TranscriptStore`)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._closed = False
        db = self._connection()
        db.execute("PRAGMA journal_mode=WAL")
        self._migrate()

    @property
    def _db(self) -> sqlite3.Connection:
        return self._connection()

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection (made on first use)."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            if self._closed:
                raise RuntimeError("the transcript store is closed")
            # check_same_thread=False only so close() may close them all from one thread.
            db = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=_BUSY_TIMEOUT
            )
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            self._local.db = db
            with self._connections_lock:
                self._connections.append(db)
        return db

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version >= _SCHEMA_VERSION:
            return
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master")}
        if "sessions" in tables:
            with self._transaction():
                if version < 1:
                    _upgrade_from_v0(self._db)
                _upgrade_to_v2(self._db)
        self._db.executescript(_SCHEMA)  # idempotent, like the upgrade: a rerun is safe
        self._db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction (the connection is in autocommit mode otherwise)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")  # take the write lock now: no upgrade deadlock later
        try:
            yield
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        self._closed = True
        with self._connections_lock:
            for db in self._connections:
                db.close()
            self._connections.clear()

    # -- sessions -------------------------------------------------------------

    def create_session(
        self, session_id: str, model: str | None, owner: str | None = None
    ) -> SessionRecord:
        now = time.time()
        self._db.execute(
            "INSERT OR IGNORE INTO sessions (id, created, updated, model, owner) "
            "VALUES (?, ?, ?, ?, ?)",
            (session_id, now, now, model, owner),
        )
        record = self.get_session(session_id)
        assert record is not None
        return record

    def get_session(self, session_id: str) -> SessionRecord | None:
        row = self._db.execute("SELECT * FROM sessions WHERE id = ?", (session_id,)).fetchone()
        return SessionRecord(**dict(row)) if row else None

    def list_sessions(
        self, limit: int = 100, owner: str | None = None, everyone: bool = True
    ) -> list[SessionRecord]:
        if everyone:
            rows = self._db.execute(
                "SELECT * FROM sessions ORDER BY updated DESC LIMIT ?", (limit,)
            ).fetchall()
        else:
            rows = self._db.execute(
                "SELECT * FROM sessions WHERE owner IS ? ORDER BY updated DESC LIMIT ?",
                (owner, limit),
            ).fetchall()
        return [SessionRecord(**dict(r)) for r in rows]

    def update_session(self, session_id: str, **fields: Any) -> None:
        if not fields or not set(fields) <= _SESSION_FIELDS:
            raise ValueError(f"unknown session fields: {set(fields) - _SESSION_FIELDS}")
        columns = ", ".join(f"{k} = ?" for k in fields)
        self._db.execute(
            f"UPDATE sessions SET {columns}, updated = ? WHERE id = ?",
            (*fields.values(), time.time(), session_id),
        )

    def delete_session(self, session_id: str) -> bool:
        cursor = self._db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
        return cursor.rowcount > 0

    def find_continued(self, owner: str | None, digest: str) -> str | None:
        row = self._db.execute(
            "SELECT id FROM sessions WHERE digest = ? AND owner IS ? ORDER BY updated DESC LIMIT 1",
            (digest, owner),
        ).fetchone()
        return str(row[0]) if row else None

    # -- events ---------------------------------------------------------------

    def append(
        self,
        session_id: str,
        turn: int,
        type_: str,
        data: dict[str, Any],
        *,
        tokens: int | None = None,
        tokens_short: int | None = None,
    ) -> int:
        now = time.time()
        light, heavy = split_heavy(data)
        payload = json.dumps(light, ensure_ascii=False)
        heavy_payload = json.dumps(heavy, ensure_ascii=False) if heavy is not None else None
        with self._transaction():
            cursor = self._db.execute(
                "INSERT INTO events (session_id, turn, type, data, created, tokens, tokens_short) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (session_id, turn, type_, payload, now, tokens, tokens_short),
            )
            event_id = cursor.lastrowid
            assert event_id is not None
            if heavy_payload is not None:
                self._db.execute(
                    "INSERT INTO outputs (event_id, data) VALUES (?, ?)", (event_id, heavy_payload)
                )
            self._touch(session_id, turn, type_, now, event_id)
        return event_id

    def append_many(self, session_id: str, events: list[NewEvent]) -> None:
        if not events:
            return
        now = time.time()
        rows = [
            (session_id, e.turn, e.type, json.dumps(e.data, ensure_ascii=False), now)
            for e in events
        ]
        users = sum(e.type == "user" for e in events)
        with self._transaction():
            self._db.executemany(
                "INSERT INTO events (session_id, turn, type, data, created) VALUES (?, ?, ?, ?, ?)",
                rows,
            )
            self._db.execute(
                "UPDATE sessions SET updated = ?, turns = turns + ?, "
                "last_turn = MAX(last_turn, ?), "
                "last_event = (SELECT MAX(id) FROM events WHERE session_id = ?) WHERE id = ?",
                (now, users, max(e.turn for e in events), session_id, session_id),
            )

    def _touch(self, session_id: str, turn: int, type_: str, now: float, event_id: int) -> None:
        self._db.execute(
            "UPDATE sessions SET updated = ?, turns = turns + ?, last_turn = MAX(last_turn, ?), "
            "last_event = ? WHERE id = ?",
            (now, 1 if type_ == "user" else 0, turn, event_id, session_id),
        )

    def append_output(self, event_id: int, text: str) -> None:
        self._db.execute("INSERT INTO live_output (event_id, text) VALUES (?, ?)", (event_id, text))

    def drop_output(self, event_id: int) -> None:
        self._db.execute("DELETE FROM live_output WHERE event_id = ?", (event_id,))

    def set_tokens(self, costs: list[tuple[int, int, int]]) -> None:
        for start in range(0, len(costs), _WRITE_BATCH):  # short transactions: others write too
            batch = costs[start : start + _WRITE_BATCH]
            with self._transaction():
                self._db.executemany(
                    "UPDATE events SET tokens = ?, tokens_short = ? WHERE id = ?",
                    [(full, short, event_id) for event_id, full, short in batch],
                )

    def events(self, session_id: str, *, heavy: bool = True) -> list[Event]:
        with self._snapshot():
            return self._events(session_id, heavy)

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[None]:
        """Several reads that see one state of the file (WAL: writers are not held up)."""
        db = self._db
        db.execute("BEGIN")
        try:
            yield
        finally:
            db.execute("COMMIT")

    def _events(self, session_id: str, heavy: bool) -> list[Event]:
        rows = self._db.execute(
            "SELECT * FROM events WHERE session_id = ? ORDER BY id", (session_id,)
        ).fetchall()
        if not heavy:
            return [_event(r) for r in rows]
        outputs = dict(
            self._db.execute(
                "SELECT o.event_id, o.data FROM outputs o JOIN events e ON e.id = o.event_id "
                "WHERE e.session_id = ?",
                (session_id,),
            ).fetchall()
        )
        live = self._live_output(session_id)
        return [_event(r, outputs.get(r["id"]), live.get(r["id"])) for r in rows]

    def event(self, session_id: str, event_id: int, *, heavy: bool = True) -> Event | None:
        row = self._db.execute(
            "SELECT * FROM events WHERE session_id = ? AND id = ?", (session_id, event_id)
        ).fetchone()
        if row is None:
            return None
        if not heavy:
            return _event(row)
        output = self._db.execute(
            "SELECT data FROM outputs WHERE event_id = ?", (event_id,)
        ).fetchone()
        live = self._db.execute(
            "SELECT group_concat(text, '') FROM "
            "(SELECT text FROM live_output WHERE event_id = ? ORDER BY id)",
            (event_id,),
        ).fetchone()[0]
        return _event(row, output[0] if output else None, live)

    def newest_events(self, session_id: str, before_turn: int) -> Iterator[Event]:
        last_id: int | None = None
        while True:
            rows = self._db.execute(
                "SELECT * FROM events WHERE session_id = ? AND turn < ? AND id < ? "
                "ORDER BY id DESC LIMIT ?",
                (session_id, before_turn, last_id if last_id is not None else 2**62, _PAGE),
            ).fetchall()
            started = [r["id"] for r in rows if r["type"] == "tool_started"]
            live = self._live_output_of(started)
            for row in rows:
                yield _event(row, None, live.get(row["id"]))
            if len(rows) < _PAGE:
                return
            last_id = rows[-1]["id"]

    def _live_output(self, session_id: str) -> dict[int, str]:
        rows = self._db.execute(
            "SELECT l.event_id, l.text FROM live_output l JOIN events e ON e.id = l.event_id "
            "WHERE e.session_id = ? ORDER BY l.id",
            (session_id,),
        ).fetchall()
        live: dict[int, str] = {}
        for event_id, text in rows:
            live[event_id] = live.get(event_id, "") + text
        return live

    def _live_output_of(self, event_ids: list[int]) -> dict[int, str]:
        live: dict[int, str] = {}
        for event_id in event_ids:
            rows = self._db.execute(
                "SELECT text FROM live_output WHERE event_id = ? ORDER BY id", (event_id,)
            ).fetchall()
            if rows:
                live[event_id] = "".join(r[0] for r in rows)
        return live


def _event(row: sqlite3.Row, heavy: str | None = None, live: str | None = None) -> Event:
    data = json.loads(row["data"])
    if heavy is not None:
        data = merge_heavy(data, json.loads(heavy))
    if live is not None:
        data["live_output"] = live
    return Event(
        id=row["id"],
        session_id=row["session_id"],
        turn=row["turn"],
        type=row["type"],
        data=data,
        created=row["created"],
        tokens=row["tokens"],
        tokens_short=row["tokens_short"],
    )


def _upgrade_to_v2(db: sqlite3.Connection) -> None:
    """Sessions get `last_event`, the version a replica checks its kept history against."""
    present = {r[1] for r in db.execute("PRAGMA table_info(sessions)")}
    if "last_event" not in present:
        db.execute("ALTER TABLE sessions ADD COLUMN last_event INTEGER NOT NULL DEFAULT 0")
    db.execute(
        "UPDATE sessions SET last_event = COALESCE("
        "(SELECT MAX(id) FROM events e WHERE e.session_id = sessions.id), 0)"
    )


def _upgrade_from_v0(db: sqlite3.Connection) -> None:
    """Transcripts of the first schema: new columns, counters, outputs moved apart."""
    columns = {
        "sessions": {
            "owner": "TEXT",
            "turns": "INTEGER NOT NULL DEFAULT 0",
            "last_turn": "INTEGER NOT NULL DEFAULT 0",
            "kernel_identity": "TEXT",
            "digest": "TEXT",
        },
        "events": {"tokens": "INTEGER", "tokens_short": "INTEGER"},
    }
    for table, wanted in columns.items():
        present = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
        for name, kind in wanted.items():
            if name not in present:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
    db.execute(
        "UPDATE sessions SET "
        "turns = (SELECT COUNT(*) FROM events e WHERE e.session_id = sessions.id "
        "AND e.type = 'user'), "
        "last_turn = COALESCE((SELECT MAX(turn) FROM events e WHERE e.session_id = sessions.id), 0)"
    )
    db.execute(
        "CREATE TABLE IF NOT EXISTS outputs (event_id INTEGER PRIMARY KEY "
        "REFERENCES events(id) ON DELETE CASCADE, data TEXT NOT NULL)"
    )
    for event_id, payload in db.execute(
        "SELECT id, data FROM events WHERE type = 'tool_result'"
    ).fetchall():
        light, heavy = split_heavy(json.loads(payload))
        if heavy is not None:
            db.execute(
                "UPDATE events SET data = ? WHERE id = ?",
                (json.dumps(light, ensure_ascii=False), event_id),
            )
            db.execute(
                "INSERT OR REPLACE INTO outputs (event_id, data) VALUES (?, ?)",
                (event_id, json.dumps(heavy, ensure_ascii=False)),
            )
