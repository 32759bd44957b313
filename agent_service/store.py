"""Transcripts: the records and the small interface every store implements.

A transcript is a sequence of events per session (user message, model reply, tool
start, live output, tool result, note, error), appended as each happens. Heavy tool
outputs (nbformat outputs with their images) are kept apart from the event text, so
building the next model request reads only small rows, and only the newest ones.

Two implementations: `SqliteStore` (`sqlite_store`, the only module that imports
sqlite3), the embedded default, and `PostgresStore` (`postgres.store`), which replicas
share. The same tests run against both.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

HEAVY_KEYS = ("outputs", "background_outputs")
"""Keys of a tool result's structured content stored apart from the event."""


@dataclass(frozen=True)
class Event:
    id: int
    session_id: str
    turn: int
    type: str
    data: dict[str, Any]
    created: float
    tokens: int | None = None
    """What the event's model message costs, counted once (None: not counted yet)."""
    tokens_short: int | None = None
    """The same with its tool output elided (equal to `tokens` when nothing can be elided)."""


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
    last_turn: int = 0
    owner: str | None = None
    kernel_identity: str | None = None
    digest: str | None = None
    last_event: int = 0
    """The id of the session's newest event: its version. Event ids only grow and are never
    reused (a deleted and re-made session included), so a different value means some
    replica wrote to the session since."""

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


@dataclass(frozen=True)
class NewEvent:
    """An event to append (see `TranscriptStore.append_many`)."""

    turn: int
    type: str
    data: dict[str, Any]


class TranscriptStore(Protocol):
    """What the service needs of a transcript store. Calls are short and thread-safe."""

    def close(self) -> None: ...

    # sessions
    def create_session(
        self, session_id: str, model: str | None, owner: str | None = None
    ) -> SessionRecord: ...
    def get_session(self, session_id: str) -> SessionRecord | None: ...
    def list_sessions(
        self, limit: int = 100, owner: str | None = None, everyone: bool = True
    ) -> list[SessionRecord]: ...
    def update_session(self, session_id: str, **fields: Any) -> None: ...
    def delete_session(self, session_id: str) -> bool: ...
    def find_continued(self, owner: str | None, digest: str) -> str | None:
        """The session of `owner` whose conversation so far has this digest."""
        ...

    # events
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
        """Append one event durably (a tool result's heavy outputs apart); returns its id."""
        ...

    def append_many(self, session_id: str, events: list[NewEvent]) -> None:
        """Append several events in one transaction (history imports)."""
        ...

    def append_output(self, event_id: int, text: str) -> None:
        """Keep a piece of live output of the tool call that event `event_id` started."""
        ...

    def drop_output(self, event_id: int) -> None:
        """Forget the live output of a call once its whole result is stored."""
        ...

    def set_tokens(self, costs: list[tuple[int, int, int]]) -> None:
        """Record (event id, tokens, tokens_short) counted after the fact."""
        ...

    def events(self, session_id: str, *, heavy: bool = True) -> list[Event]:
        """The whole transcript; `heavy` merges outputs and live output back in."""
        ...

    def event(self, session_id: str, event_id: int, *, heavy: bool = True) -> Event | None: ...
    def newest_events(self, session_id: str, before_turn: int) -> Iterator[Event]:
        """Events of turns before `before_turn`, newest first, without heavy outputs.

        Lazy: a caller that stops early reads only what it consumed (plus one page).
        """
        ...


def split_heavy(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """An event's data without the heavy outputs of its structured result, and those outputs."""
    structured = data.get("structured")
    if not isinstance(structured, dict) or not any(k in structured for k in HEAVY_KEYS):
        return data, None
    light = {k: v for k, v in structured.items() if k not in HEAVY_KEYS}
    heavy = {k: structured[k] for k in HEAVY_KEYS if k in structured}
    return {**data, "structured": light}, heavy


def merge_heavy(data: dict[str, Any], heavy: dict[str, Any] | None) -> dict[str, Any]:
    """The inverse of `split_heavy`."""
    if not heavy:
        return data
    return {**data, "structured": {**(data.get("structured") or {}), **heavy}}
