"""Replicas on one PostgreSQL database: turn locks, prompt cache clears, who serves what.

- **Turn lock.** A session-level advisory lock (`pg_try_advisory_lock` on a 64-bit key
  hashed from the session id) taken on a pooled connection that the turn keeps to itself
  until it ends. A replica that dies closes its connections and PostgreSQL releases the
  lock with the backend; a host that vanished without closing them is found by TCP
  keepalives set on each lock connection (about a minute). A connection goes back to the
  pool only after `pg_advisory_unlock_all()`, so no lock outlives its turn. The pool runs
  that reset in a task of its own after `putconn`, so "every connection is taken" counts
  the turns holding one, not the pool's idle connections: a turn that just ended is not
  refused to the next one while its connection is being reset.
- **Prompt cache.** A clear is a `NOTIFY` on one channel; every replica `LISTEN`s on a
  connection of its own and drops its prompt when told, and again whenever it had to
  reconnect (it may have missed a notification meanwhile).
- **Stop.** `POST .../interrupt` on a replica whose turn registry does not run the session,
  while some replica holds its turn lock, is a `NOTIFY` on a second channel with the session
  id; the replica running that turn stops it (the others find nothing to stop).
- **Members.** Each replica writes its prompt cache's state to `replicas` when it changes
  and every `AGENT_REPLICA_HEARTBEAT` seconds; `/admin/cache-stats` lists the rows written
  within three heartbeats, by the database's clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ..config import Settings
from ..errors import DatabaseUnavailable, TooManyTurns
from ..replicas import PromptStats, TurnLease
from .store import PostgresStore

logger = logging.getLogger(__name__)

CHANNEL = "kernel_agent_prompt_cache"
STOP_CHANNEL = "kernel_agent_stop_turn"
_KEEPALIVES = (
    # Server side: a lock held by a host that vanished is freed within about a minute.
    "SET tcp_keepalives_idle = 30",
    "SET tcp_keepalives_interval = 10",
    "SET tcp_keepalives_count = 3",
)
_RECONNECT_DELAY = (0.5, 10.0)
"""First and longest wait between attempts to listen again."""


def turn_key(session_id: str) -> int:
    """The advisory lock key of a session's turns (a signed 64-bit integer)."""
    digest = hashlib.sha256(b"kernel-agent turn\0" + session_id.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def _configure_lock_connection(conn: psycopg.AsyncConnection[Any]) -> None:
    for statement in _KEEPALIVES:
        await conn.execute(statement)


async def _unlock_all(conn: psycopg.AsyncConnection[Any]) -> None:
    await conn.execute("SELECT pg_advisory_unlock_all()")


class _Lease:
    """One turn's lock: its connection stays out of the pool until release."""

    def __init__(
        self,
        replicas: PostgresReplicas,
        conn: psycopg.AsyncConnection[Any],
        key: int,
        session_id: str,
    ) -> None:
        self._replicas = replicas
        self._conn = conn
        self._key = key
        self._session_id = session_id

    async def release(self) -> None:
        try:
            cursor = await self._conn.execute("SELECT pg_advisory_unlock(%s)", (self._key,))
            row = await cursor.fetchone()
            if not (row and row[0]):
                logger.warning("session %s: its turn lock was already gone", self._session_id)
        except psycopg.Error as exc:
            # The connection broke: the server frees the lock with it; never reuse it.
            logger.warning("session %s: turn lock not released (%s)", self._session_id, exc)
            await self._conn.close()
        finally:
            await self._replicas.give_back(self._conn)


class PostgresReplicas:
    """`Replicas` on PostgreSQL: advisory locks, LISTEN/NOTIFY and a `replicas` table."""

    def __init__(self, url: str, name: str, store: PostgresStore, settings: Settings) -> None:
        self.name = name
        self._url = url
        self._store = store
        self._timeout = settings.database_timeout
        self._heartbeat = settings.replica_heartbeat
        connect = {"autocommit": True, "connect_timeout": max(1, int(self._timeout))}
        self._locks: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            url,
            min_size=0,
            max_size=settings.database_max_turns,
            kwargs=connect,
            configure=_configure_lock_connection,
            reset=_unlock_all,
            check=AsyncConnectionPool.check_connection,
            timeout=self._timeout,
            name="turn-locks",
            open=False,
        )
        self._misc: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=2,
            kwargs=connect,
            check=AsyncConnectionPool.check_connection,
            timeout=self._timeout,
            name="replicas",
            open=False,
        )
        self._started = time.time()
        self._clear_local: Callable[[], None] = lambda: None
        self._stop_local: Callable[[str], bool] = lambda session_id: False
        self._stats: PromptStats = dict
        self._dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._taken = 0
        """Lock connections out of the pool: held by turns, or asking for their lock."""

    async def start(
        self,
        clear_local: Callable[[], None],
        stats: PromptStats,
        stop_local: Callable[[str], bool],
    ) -> None:
        self._clear_local = clear_local
        self._stop_local = stop_local
        self._stats = stats
        await self._locks.open(wait=False)
        await self._misc.open(wait=True, timeout=self._timeout)
        listener = await self._listen_on()  # before serving: no clear can be missed
        await self._report()
        self._tasks = [
            asyncio.create_task(self._listen(listener), name="replicas-listen"),
            asyncio.create_task(self._beat(), name="replicas-heartbeat"),
        ]
        logger.info("replica %s joined (PostgreSQL)", self.name)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            async with self._misc.connection() as conn:
                await conn.execute("DELETE FROM replicas WHERE name = %s", (self.name,))
        except (psycopg.Error, PoolTimeout) as exc:
            logger.warning("replica %s: not removed from the list: %s", self.name, exc)
        await self._locks.close()
        await self._misc.close()

    # -- turn locks -------------------------------------------------------------

    def _all_taken(self) -> bool:
        """Whether every lock connection is held by a running turn (or one asking)."""
        return self._taken >= self._locks.max_size

    async def give_back(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Return a lock connection; the pool's reset unlocks whatever it may hold."""
        self._taken -= 1
        await self._locks.putconn(conn)

    async def lock_turn(self, session_id: str) -> TurnLease | None:
        busy = TooManyTurns(
            f"this replica already runs {self._locks.max_size} turns "
            "(AGENT_DATABASE_MAX_TURNS); try again shortly"
        )
        if self._all_taken():
            raise busy  # at once: waiting would only delay the same answer
        try:
            conn = await self._locks.getconn()
        except PoolTimeout as exc:
            if self._all_taken():
                raise busy from exc
            raise DatabaseUnavailable(f"the database is unreachable: {exc}") from exc
        except psycopg.Error as exc:
            raise DatabaseUnavailable(f"the database is unreachable: {exc}") from exc
        self._taken += 1
        key = turn_key(session_id)
        try:
            cursor = await conn.execute("SELECT pg_try_advisory_lock(%s)", (key,))
            row = await cursor.fetchone()
        except BaseException as exc:
            await self.give_back(conn)
            if isinstance(exc, psycopg.Error):
                raise DatabaseUnavailable(f"the database is unreachable: {exc}") from exc
            raise
        if not (row and row[0]):
            await self.give_back(conn)
            return None
        return _Lease(self, conn, key, session_id)

    async def held(self, session_id: str) -> bool:
        key = turn_key(session_id)
        async with self._db() as conn:
            cursor = await conn.execute(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                "AND classid = %s::bigint::oid AND objid = %s::bigint::oid AND objsubid = 1 "
                "AND granted)",
                ((key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF),
            )
            row = await cursor.fetchone()
        return bool(row and row[0])

    # -- prompt cache -----------------------------------------------------------

    async def clear_prompts(self) -> None:
        async with self._db() as conn:
            await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, self.name))

    async def stop_turn(self, session_id: str) -> None:
        async with self._db() as conn:
            await conn.execute("SELECT pg_notify(%s, %s)", (STOP_CHANNEL, session_id))

    def changed(self) -> None:
        self._dirty.set()

    async def members(self) -> list[dict[str, Any]]:
        await self._report()  # this replica's row is current
        async with self._db() as conn:
            cursor = await conn.execute(
                "SELECT name, started, prompt, "
                "extract(epoch FROM clock_timestamp())::float8 - seen AS silent "
                "FROM replicas WHERE seen > extract(epoch FROM clock_timestamp())::float8 - %s "
                "ORDER BY name <> %s, name",
                (3 * self._heartbeat, self.name),
            )
            rows = await cursor.fetchall()
        return [
            {
                "replica": name,
                "started": started,
                "reported_seconds_ago": round(max(0.0, silent), 3),
                **json.loads(prompt),
            }
            for name, started, prompt, silent in rows
        ]

    def shared_secret(self) -> str | None:
        return self._store.shared_secret()

    # -- background -------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _db(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        try:
            async with self._misc.connection() as conn:
                yield conn
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise DatabaseUnavailable(f"the database is unreachable: {exc}") from exc

    async def _report(self) -> None:
        async with self._db() as conn:
            await conn.execute(
                "INSERT INTO replicas (name, started, seen, prompt) "
                "VALUES (%s, %s, extract(epoch FROM clock_timestamp()), %s) "
                "ON CONFLICT (name) DO UPDATE SET started = EXCLUDED.started, "
                "seen = EXCLUDED.seen, prompt = EXCLUDED.prompt",
                (self.name, self._started, json.dumps(self._stats())),
            )

    async def _beat(self) -> None:
        """Report the prompt cache's state when it changes, and every heartbeat."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._heartbeat):
                    await self._dirty.wait()
            self._dirty.clear()
            try:
                await self._report()
            except DatabaseUnavailable as exc:
                logger.warning("replica %s: state not reported: %s", self.name, exc.message)

    async def _listen_on(self) -> psycopg.AsyncConnection[Any]:
        conn = await psycopg.AsyncConnection.connect(
            self._url, autocommit=True, connect_timeout=max(1, int(self._timeout))
        )
        try:
            await conn.execute(f"LISTEN {CHANNEL}")
            await conn.execute(f"LISTEN {STOP_CHANNEL}")
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _listen(self, conn: psycopg.AsyncConnection[Any] | None) -> None:
        """Drop the local prompt whenever another replica clears; reconnect when cut off."""
        delay = _RECONNECT_DELAY[0]
        while True:
            try:
                if conn is None:
                    conn = await self._listen_on()
                    logger.info("replica %s: listening again; dropping the prompt", self.name)
                    self._clear_local()  # a clear may have come while we were away
                    delay = _RECONNECT_DELAY[0]
                async for note in conn.notifies():
                    if note.channel == STOP_CHANNEL:
                        if self._stop_local(note.payload):
                            logger.info(
                                "session %s: stop asked through another replica", note.payload
                            )
                    elif note.payload != self.name:
                        logger.info("prompt cache cleared by replica %s", note.payload)
                        self._clear_local()
            except psycopg.Error as exc:
                logger.warning("replica %s: prompt cache channel lost: %s", self.name, exc)
                if conn is not None:
                    await conn.close()
                conn = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RECONNECT_DELAY[1])
            except asyncio.CancelledError:
                if conn is not None:
                    await conn.close()
                raise
