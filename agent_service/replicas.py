"""What replicas of the service share besides transcripts: turn locks and the prompt cache.

`Replicas` is the small interface the service needs to run as one of several copies:

- a lock per session held for the whole of a turn (`lock_turn`): the one-turn-at-a-time rule
  across replicas; a replica that dies mid-turn must lose it with its process;
- a prompt cache clear that reaches every replica (`clear_prompts`), and the state of every
  replica's prompt cache for `/admin/cache-stats` (`report`, `members`);
- a Stop that reaches the replica running the session's turn (`stop_turn`);
- the link-signing secret, when no `AGENT_SECRET_KEY` is set (`shared_secret`).

`LocalReplicas` is the one-process implementation used with SQLite: the turn registry's
own map is the lock, a clear is local, and the only member is this process. With
PostgreSQL, `agent_service.postgres.PostgresReplicas` keeps all of it in the database.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

PromptStats = Callable[[], dict[str, Any]]


class TurnLease(Protocol):
    """A held session lock; `release` gives it back (and never raises)."""

    async def release(self) -> None: ...


class Replicas(Protocol):
    """What one replica needs to know of, and tell, the others."""

    name: str
    """This replica's name, as `/admin/cache-stats` lists it."""

    async def start(
        self,
        clear_local: Callable[[], None],
        stats: PromptStats,
        stop_local: Callable[[str], bool],
    ) -> None:
        """Begin listening: `clear_local` drops this replica's prompt, `stats` describes it,
        `stop_local(session_id)` stops a turn running here."""
        ...

    async def close(self) -> None: ...

    async def lock_turn(self, session_id: str) -> TurnLease | None:
        """The session's lock for one turn, or None while any replica holds it."""
        ...

    async def held(self, session_id: str) -> bool:
        """Whether some replica holds the session's lock right now."""
        ...

    async def clear_prompts(self) -> None:
        """Make every other replica drop its cached prompt (this one clears its own)."""
        ...

    async def stop_turn(self, session_id: str) -> None:
        """Ask the other replicas to stop the session's turn (the one running it does)."""
        ...

    def changed(self) -> None:
        """This replica's prompt cache changed: tell the others soon (no wait)."""
        ...

    async def members(self) -> list[dict[str, Any]]:
        """Every live replica's prompt cache state, this one's first."""
        ...

    def shared_secret(self) -> str | None:
        """A link-signing secret all replicas share, or None to use the data folder's."""
        ...


def default_name() -> str:
    """A replica's default name: host, process id and a few random characters (unique even
    for several services in one process)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class _NoLease:
    async def release(self) -> None:
        return None


class LocalReplicas:
    """One replica alone (SQLite): locks live in the turn registry, clears stay local."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._stats: PromptStats = dict
        self._started = time.time()

    async def start(
        self,
        clear_local: Callable[[], None],
        stats: PromptStats,
        stop_local: Callable[[str], bool],
    ) -> None:
        self._stats = stats

    async def close(self) -> None:
        return None

    async def lock_turn(self, session_id: str) -> TurnLease | None:
        return _NoLease()  # the registry already refused a second turn of this process

    async def held(self, session_id: str) -> bool:
        return False

    async def clear_prompts(self) -> None:
        return None

    async def stop_turn(self, session_id: str) -> None:
        return None

    def changed(self) -> None:
        return None

    async def members(self) -> list[dict[str, Any]]:
        return [{"replica": self.name, "started": self._started, **self._stats()}]

    def shared_secret(self) -> str | None:
        return None
