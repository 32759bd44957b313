"""The transcript store itself, against SQLite and PostgreSQL alike (no servers)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from agent_service.config import Settings
from agent_service.postgres import PostgresStore, upgrade
from agent_service.postgres.migrate import VERSION_TABLE
from agent_service.sqlite_store import SqliteStore
from agent_service.store import NewEvent, TranscriptStore

pytestmark = pytest.mark.both_stores

ODD = "tab\there, NUL \x00 inside, emoji \U0001f600, RTL \u202e, CR\r\n"


@pytest.fixture
def transcripts(
    store_kind: str, database_url: Callable[[], str | None], tmp_path: Path
) -> Iterator[TranscriptStore]:
    url = database_url()
    store: TranscriptStore
    if url is None:
        store = SqliteStore(tmp_path / "t.sqlite3")
    else:
        upgrade(url)
        store = PostgresStore(url, pool_size=2, timeout=10)
    yield store
    store.close()


def test_odd_text_round_trips(transcripts: TranscriptStore) -> None:
    transcripts.create_session("s", "m", owner="key-1")
    transcripts.update_session("s", title=ODD, client_system=ODD)
    transcripts.append("s", 1, "user", {"content": ODD})
    started = transcripts.append("s", 1, "tool_started", {"call_id": "c", "name": "execute_code"})
    transcripts.append_output(started, ODD)
    transcripts.append_output(started, "and more")
    outputs = [{"output_type": "stream", "name": "stdout", "text": ODD}]
    result = transcripts.append(
        "s", 1, "tool_result", {"text": ODD, "structured": {"status": "ok", "outputs": outputs}}
    )
    record = transcripts.get_session("s")
    assert record is not None
    assert record.client_system == ODD
    assert record.title is not None
    assert record.title.startswith("tab\there, NUL ")
    events = transcripts.events("s")
    assert events[0].data == {"content": ODD}
    assert events[1].data["live_output"] == ODD + "and more"
    assert events[2].data["structured"]["outputs"] == outputs
    light = transcripts.event("s", result, heavy=False)
    assert light is not None
    assert "outputs" not in light.data["structured"]
    newest = list(transcripts.newest_events("s", 2))
    assert [e.id for e in newest] == [result, started, events[0].id]
    assert newest[1].data["live_output"] == ODD + "and more", "a started call keeps its output"
    assert "outputs" not in newest[0].data["structured"], "history reads stay light"


def test_last_event_is_a_version_that_never_comes_back(transcripts: TranscriptStore) -> None:
    transcripts.create_session("v", "m")
    first = transcripts.append("v", 1, "user", {"content": "a"})
    record = transcripts.get_session("v")
    assert record is not None
    assert record.last_event == first
    transcripts.append_many("v", [NewEvent(2, "user", {"content": "b"}), NewEvent(2, "x", {})])
    record = transcripts.get_session("v")
    assert record is not None
    assert record.last_event > first
    assert (record.turns, record.last_turn) == (2, 2)
    kept = record.last_event
    assert transcripts.delete_session("v")
    assert transcripts.get_session("v") is None
    transcripts.create_session("v", "m")
    again = transcripts.get_session("v")
    assert again is not None
    assert again.last_event == 0
    transcripts.append("v", 1, "user", {"content": "a"})
    again = transcripts.get_session("v")
    assert again is not None
    assert again.last_event > kept, "a re-made session has new versions"


def test_history_reads_page_lazily_newest_first(transcripts: TranscriptStore) -> None:
    transcripts.create_session("p", "m")
    transcripts.append_many("p", [NewEvent(i // 2 + 1, "user", {"n": i}) for i in range(600)])
    transcripts.set_tokens([(e.id, 3, 2) for e in transcripts.events("p", heavy=False)])
    newest = transcripts.newest_events("p", 301)
    first = [next(newest) for _ in range(10)]
    assert [e.data["n"] for e in first] == list(range(599, 589, -1))
    assert (first[0].tokens, first[0].tokens_short) == (3, 2)
    assert len(list(transcripts.newest_events("p", 101))) == 200


def test_owners_keep_their_sessions_apart(transcripts: TranscriptStore) -> None:
    transcripts.create_session("o1", "m", owner="key-1")
    transcripts.create_session("o2", "m", owner=None)
    transcripts.update_session("o1", digest="d")
    transcripts.update_session("o2", digest="d")
    assert [r.id for r in transcripts.list_sessions(owner="key-1", everyone=False)] == ["o1"]
    assert [r.id for r in transcripts.list_sessions(owner=None, everyone=False)] == ["o2"]
    assert {r.id for r in transcripts.list_sessions()} == {"o1", "o2"}
    assert transcripts.find_continued("key-1", "d") == "o1"
    assert transcripts.find_continued(None, "d") == "o2"
    assert transcripts.find_continued("key-2", "d") is None
    again = transcripts.create_session("o1", "other", owner="key-2")
    assert (again.model, again.owner) == ("m", "key-1"), "creating twice keeps the first"


def test_migrations_bring_an_older_schema_up(
    store_kind: str, database_url: Callable[[], str | None], tmp_path: Path
) -> None:
    """SQLite: a version 1 file gains `last_event`; PostgreSQL: replicas migrate at once."""
    url = database_url()
    if url is None:
        path = tmp_path / "v1.sqlite3"
        SqliteStore(path).close()
        with sqlite3.connect(path) as db:  # what version 1 had
            db.execute("ALTER TABLE sessions DROP COLUMN last_event")
            db.execute("INSERT INTO sessions (id, created, updated) VALUES ('old', 0, 0)")
            db.execute(
                "INSERT INTO events (session_id, turn, type, data, created) "
                "VALUES ('old', 1, 'user', '{}', 0)"
            )
            db.execute("PRAGMA user_version = 1")
        store = SqliteStore(path)
        record = store.get_session("old")
        store.close()
        assert record is not None
        assert record.last_event == 1
        return
    errors: list[BaseException] = []

    def start() -> None:
        try:
            upgrade(url)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [], "replicas starting together all come up"
    with psycopg.connect(url) as db:
        versions = db.execute(f"SELECT version_num FROM {VERSION_TABLE}").fetchall()  # type: ignore[arg-type]
    assert versions == [("0001",)]


def test_database_url_forms(tmp_path: Path) -> None:
    default = Settings(data_dir=tmp_path)
    assert default.postgres_url is None
    assert default.sqlite_path == tmp_path / "transcripts.sqlite3"
    assert Settings(database_url=f"sqlite:///{tmp_path}/t.db").sqlite_path == tmp_path / "t.db"
    url = "postgresql://u:p@db:5432/agent?sslmode=require"
    assert Settings(database_url=url).postgres_url == url
    assert Settings(database_url="postgres://db/agent").postgres_url == "postgres://db/agent"
    with pytest.raises(ValueError, match="AGENT_DATABASE_URL"):
        Settings(database_url="mysql://db/agent")
