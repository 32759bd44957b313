"""Alembic's environment: migrate on the connection `migrate.upgrade` passes, or on a URL.

By hand: `alembic_config(url)` from `agent_service.postgres.migrate` gives a configuration
for `alembic.command` (history, current, downgrade, revision).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

config = context.config
version_table = config.attributes.get("version_table", "agent_schema_version")


def _run(connection: Connection) -> None:
    context.configure(connection=connection, version_table=version_table, transactional_ddl=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported; pass a database")

given = config.attributes.get("connection")
if given is not None:
    _run(given)
else:
    with config.attributes["engine"].begin() as connection:
        _run(connection)
