"""Schema migrations with Alembic, run at start-up.

Replicas may start together: the upgrade runs in one transaction that first takes a
transaction-scoped advisory lock, so one replica migrates and the others then find the
schema current. Alembic talks to the database through SQLAlchemy on a psycopg connection
made from the very URL the service uses (libpq's URL and key-value forms both work).
Its version table is `agent_schema_version`, so a database shared with another
Alembic-managed application keeps both histories apart.
"""

from __future__ import annotations

import logging
from pathlib import Path

import psycopg
import sqlalchemy
from alembic import command
from alembic.config import Config
from sqlalchemy.pool import NullPool

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "agent_schema_version"
_MIGRATION_LOCK = 0x6B61_6D69_6772_6174  # "kamigrat": one migration at a time


def alembic_config(url: str | None = None, timeout: float = 10.0) -> Config:
    """Alembic's configuration for our migrations (also for `alembic` commands by hand)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["version_table"] = VERSION_TABLE
    if url is not None:
        config.attributes["engine"] = engine(url, timeout)
    return config


def engine(url: str, timeout: float = 10.0) -> sqlalchemy.Engine:
    """A SQLAlchemy engine whose connections psycopg makes from `url` itself."""
    return sqlalchemy.create_engine(
        "postgresql+psycopg://",
        creator=lambda: psycopg.connect(url, connect_timeout=max(1, int(timeout))),
        poolclass=NullPool,
    )


def upgrade(url: str, timeout: float = 10.0) -> None:
    """Bring the schema to the newest revision (a no-op when it is current)."""
    db = engine(url, timeout)
    try:
        with db.begin() as connection:
            lock = sqlalchemy.text("SELECT pg_advisory_xact_lock(:key)")
            connection.execute(lock, {"key": _MIGRATION_LOCK})
            config = alembic_config()
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    finally:
        db.dispose()
