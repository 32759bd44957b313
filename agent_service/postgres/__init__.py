"""PostgreSQL behind the service: transcripts, turn locks, and the replicas' shared state.

The only package that imports psycopg, psycopg_pool, alembic and sqlalchemy (an optional
extra: `pip install 'kernel-agent[postgres]'`). `open_postgres` migrates the database
(Alembic, at start-up, one replica at a time) and returns the store and the coordination.
"""

from __future__ import annotations

from ..config import Settings
from .migrate import upgrade
from .replicas import PostgresReplicas
from .store import PostgresStore


def open_postgres(settings: Settings, name: str) -> tuple[PostgresStore, PostgresReplicas]:
    """Migrate the database `settings.postgres_url` names, then open its store and replicas."""
    url = settings.postgres_url
    assert url is not None
    upgrade(url, settings.database_timeout)
    store = PostgresStore(
        url,
        settings.database_pool_size,
        settings.database_timeout,
        settings.database_statement_timeout,
    )
    try:
        replicas = PostgresReplicas(url, name, store, settings)
    except BaseException:
        store.close()
        raise
    return store, replicas


__all__ = ["PostgresReplicas", "PostgresStore", "open_postgres", "upgrade"]
