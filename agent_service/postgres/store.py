"""Transcripts in PostgreSQL: `TranscriptStore` over a psycopg connection pool.

The same tables and the same semantics as `sqlite_store`, so any number of replicas can
serve one conversation after another. Each call takes a pooled connection for one short
transaction (psycopg_pool commits when the block ends, rolls back on an error) and gives
it back; a connection the server dropped is replaced before it is used. Calls are
synchronous like the protocol; the service runs the long ones (whole transcripts,
history reads) in threads, as it does for SQLite.

PostgreSQL text cannot hold NUL characters, which kernel output and user messages may:
live output and the client's system prompt are stored as JSON text (which escapes them),
as events and outputs already are, and a title shows NUL as U+FFFD.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import Iterable, Iterator
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from ..errors import DatabaseUnavailable
from ..store import Event, NewEvent, SessionRecord, merge_heavy, split_heavy

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


class PostgresStore:
    """Sessions and their events in PostgreSQL (implements `TranscriptStore`)."""

    def __init__(
        self, url: str, pool_size: int, timeout: float, statement_timeout: float = 30.0
    ) -> None:
        self._statement_timeout = statement_timeout
        # Calls run on the event loop: a statement waiting on a lock, or a server gone
        # silent, must fail in bounded time (statement_timeout, TCP keepalives), not hang.
        connection = {
            "row_factory": dict_row,
            "connect_timeout": max(1, int(timeout)),
            "options": f"-c statement_timeout={max(1, int(statement_timeout * 1000))}",
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
        }
        self._pool: ConnectionPool[psycopg.Connection[dict[str, Any]]] = ConnectionPool(
            url,
            connection_class=psycopg.Connection[dict[str, Any]],
            min_size=1,
            max_size=pool_size,
            kwargs=connection,
            check=ConnectionPool.check_connection,
            timeout=timeout,
            name="transcripts",
            open=False,
        )
        self._pool.open(wait=True, timeout=timeout)

    def close(self) -> None:
        self._pool.close()

    @contextlib.contextmanager
    def _conn(self) -> Iterator[psycopg.Connection[dict[str, Any]]]:
        """A pooled connection for one transaction: `with self._conn() as db: ...`."""
        try:
            with self._pool.connection() as db:
                yield db
        except psycopg.errors.QueryCanceled as exc:
            raise DatabaseUnavailable(
                f"the transcript database did not answer within {self._statement_timeout:g} s "
                f"(AGENT_DATABASE_STATEMENT_TIMEOUT): {exc}"
            ) from exc
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise DatabaseUnavailable(f"the transcript database is unreachable: {exc}") from exc

    # -- sessions -------------------------------------------------------------

    def create_session(
        self, session_id: str, model: str | None, owner: str | None = None
    ) -> SessionRecord:
        now = time.time()
        with self._conn() as db:
            db.execute(
                "INSERT INTO sessions (id, created, updated, model, owner) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
                (session_id, now, now, model, owner),
            )
        record = self.get_session(session_id)
        assert record is not None
        return record

    def get_session(self, session_id: str) -> SessionRecord | None:
        with self._conn() as db:
            row = db.execute("SELECT * FROM sessions WHERE id = %s", (session_id,)).fetchone()
        return _record(row) if row else None

    def list_sessions(
        self, limit: int = 100, owner: str | None = None, everyone: bool = True
    ) -> list[SessionRecord]:
        with self._conn() as db:
            if everyone:
                rows = db.execute(
                    "SELECT * FROM sessions ORDER BY updated DESC LIMIT %s", (limit,)
                ).fetchall()
            else:
                rows = db.execute(
                    "SELECT * FROM sessions WHERE owner IS NOT DISTINCT FROM %s "
                    "ORDER BY updated DESC LIMIT %s",
                    (owner, limit),
                ).fetchall()
        return [_record(r) for r in rows]

    def update_session(self, session_id: str, **fields: Any) -> None:
        if not fields or not set(fields) <= _SESSION_FIELDS:
            raise ValueError(f"unknown session fields: {set(fields) - _SESSION_FIELDS}")
        values = dict(fields)
        if values.get("title") is not None:
            values["title"] = values["title"].replace("\x00", "\ufffd")
        if values.get("client_system") is not None:
            values["client_system"] = json.dumps(values["client_system"], ensure_ascii=False)
        columns = ", ".join(f"{k} = %s" for k in values)  # names from _SESSION_FIELDS only
        with self._conn() as db:
            db.execute(
                f"UPDATE sessions SET {columns}, updated = %s WHERE id = %s",
                (*values.values(), time.time(), session_id),
            )

    def delete_session(self, session_id: str) -> bool:
        with self._conn() as db:
            cursor = db.execute("DELETE FROM sessions WHERE id = %s", (session_id,))
            return bool(cursor.rowcount > 0)

    def find_continued(self, owner: str | None, digest: str) -> str | None:
        with self._conn() as db:
            row = db.execute(
                "SELECT id FROM sessions WHERE digest = %s AND owner IS NOT DISTINCT FROM %s "
                "ORDER BY updated DESC LIMIT 1",
                (digest, owner),
            ).fetchone()
        return str(row["id"]) if row else None

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
        with self._conn() as db:
            row = db.execute(
                "INSERT INTO events (session_id, turn, type, data, created, tokens, tokens_short) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id",
                (session_id, turn, type_, payload, now, tokens, tokens_short),
            ).fetchone()
            assert row is not None
            event_id = int(row["id"])
            if heavy_payload is not None:
                db.execute(
                    "INSERT INTO outputs (event_id, data) VALUES (%s, %s)",
                    (event_id, heavy_payload),
                )
            db.execute(
                "UPDATE sessions SET updated = %s, turns = turns + %s, "
                "last_turn = GREATEST(last_turn, %s), last_event = GREATEST(last_event, %s) "
                "WHERE id = %s",
                (now, 1 if type_ == "user" else 0, turn, event_id, session_id),
            )
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
        with self._conn() as db:
            with db.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO events (session_id, turn, type, data, created) "
                    "VALUES (%s, %s, %s, %s, %s)",
                    rows,
                )
            db.execute(
                "UPDATE sessions SET updated = %s, turns = turns + %s, "
                "last_turn = GREATEST(last_turn, %s), "
                "last_event = (SELECT MAX(id) FROM events WHERE session_id = %s) WHERE id = %s",
                (now, users, max(e.turn for e in events), session_id, session_id),
            )

    def append_output(self, event_id: int, text: str) -> None:
        with self._conn() as db:
            db.execute(
                "INSERT INTO live_output (event_id, text) VALUES (%s, %s)",
                (event_id, json.dumps(text, ensure_ascii=False)),
            )

    def drop_output(self, event_id: int) -> None:
        with self._conn() as db:
            db.execute("DELETE FROM live_output WHERE event_id = %s", (event_id,))

    def set_tokens(self, costs: list[tuple[int, int, int]]) -> None:
        for start in range(0, len(costs), _WRITE_BATCH):  # short transactions: others write too
            batch = costs[start : start + _WRITE_BATCH]
            with self._conn() as db, db.cursor() as cursor:
                cursor.executemany(
                    "UPDATE events SET tokens = %s, tokens_short = %s WHERE id = %s",
                    [(full, short, event_id) for event_id, full, short in batch],
                )

    def events(self, session_id: str, *, heavy: bool = True) -> list[Event]:
        with self._conn() as db:
            # One snapshot for the three reads, as SQLite's read transaction gives.
            db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            rows = db.execute(
                "SELECT * FROM events WHERE session_id = %s ORDER BY id", (session_id,)
            ).fetchall()
            if not heavy:
                return [_event(r) for r in rows]
            outputs = {
                r["event_id"]: r["data"]
                for r in db.execute(
                    "SELECT o.event_id, o.data FROM outputs o JOIN events e ON e.id = o.event_id "
                    "WHERE e.session_id = %s",
                    (session_id,),
                )
            }
            live = _joined(
                db.execute(
                    "SELECT l.event_id, l.text FROM live_output l "
                    "JOIN events e ON e.id = l.event_id WHERE e.session_id = %s ORDER BY l.id",
                    (session_id,),
                )
            )
        return [_event(r, outputs.get(r["id"]), live.get(r["id"])) for r in rows]

    def event(self, session_id: str, event_id: int, *, heavy: bool = True) -> Event | None:
        with self._conn() as db:
            row = db.execute(
                "SELECT * FROM events WHERE session_id = %s AND id = %s", (session_id, event_id)
            ).fetchone()
            if row is None:
                return None
            if not heavy:
                return _event(row)
            output = db.execute(
                "SELECT data FROM outputs WHERE event_id = %s", (event_id,)
            ).fetchone()
            live = _joined(
                db.execute(
                    "SELECT event_id, text FROM live_output WHERE event_id = %s ORDER BY id",
                    (event_id,),
                )
            )
        return _event(row, output["data"] if output else None, live.get(event_id))

    def newest_events(self, session_id: str, before_turn: int) -> Iterator[Event]:
        last_id = 2**62
        while True:
            with self._conn() as db:
                rows = db.execute(
                    "SELECT * FROM events WHERE session_id = %s AND turn < %s AND id < %s "
                    "ORDER BY id DESC LIMIT %s",
                    (session_id, before_turn, last_id, _PAGE),
                ).fetchall()
                started = [r["id"] for r in rows if r["type"] == "tool_started"]
                live = (
                    _joined(
                        db.execute(
                            "SELECT event_id, text FROM live_output WHERE event_id = ANY(%s) "
                            "ORDER BY id",
                            (started,),
                        )
                    )
                    if started
                    else {}
                )
            for row in rows:
                yield _event(row, None, live.get(row["id"]))
            if len(rows) < _PAGE:
                return
            last_id = rows[-1]["id"]

    # -- beyond the protocol --------------------------------------------------

    def shared_secret(self, name: str = "image_links") -> str:
        """A secret all replicas share, made by the first one that asks."""
        with self._conn() as db:
            db.execute(
                "INSERT INTO service_secrets (name, value) VALUES (%s, %s) "
                "ON CONFLICT (name) DO NOTHING",
                (name, secrets.token_urlsafe(48)),
            )
            row = db.execute(
                "SELECT value FROM service_secrets WHERE name = %s", (name,)
            ).fetchone()
        assert row is not None
        return str(row["value"])


def _joined(rows: Iterable[dict[str, Any]]) -> dict[int, str]:
    """Live output pieces (JSON text), joined per event in order."""
    pieces: dict[int, list[str]] = {}
    for row in rows:
        pieces.setdefault(row["event_id"], []).append(json.loads(row["text"]))
    return {event_id: "".join(texts) for event_id, texts in pieces.items()}


def _record(row: dict[str, Any]) -> SessionRecord:
    values = dict(row)
    if values.get("client_system") is not None:
        values["client_system"] = json.loads(values["client_system"])
    return SessionRecord(**values)


def _event(row: dict[str, Any], heavy: str | None = None, live: str | None = None) -> Event:
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
