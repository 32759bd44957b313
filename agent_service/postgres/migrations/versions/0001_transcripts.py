"""Transcripts, the replicas' prompt caches and the shared link secret.

The tables of `sqlite_store` (sessions, events, outputs apart, live output), plus
`replicas` (what prompt each replica serves, for /admin/cache-stats) and
`service_secrets` (the link-signing secret every replica uses).

Revision ID: 0001
Revises:
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("created", sa.Double, nullable=False),
        sa.Column("updated", sa.Double, nullable=False),
        sa.Column("model", sa.Text),
        sa.Column("title", sa.Text),
        sa.Column("client_system", sa.Text, comment="JSON text: a string may hold NUL"),
        sa.Column("kernel_json", sa.Text),
        sa.Column("owner", sa.Text),
        sa.Column("turns", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_turn", sa.Integer, nullable=False, server_default="0"),
        sa.Column("kernel_identity", sa.Text),
        sa.Column("digest", sa.Text),
        sa.Column("last_event", sa.BigInteger, nullable=False, server_default="0"),
    )
    op.create_index("sessions_by_digest", "sessions", ["digest"])
    op.create_index("sessions_by_updated", "sessions", ["updated"])
    op.create_table(
        "events",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column(
            "session_id",
            sa.Text,
            sa.ForeignKey("sessions.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("turn", sa.Integer, nullable=False),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("data", sa.Text, nullable=False),
        sa.Column("created", sa.Double, nullable=False),
        sa.Column("tokens", sa.Integer),
        sa.Column("tokens_short", sa.Integer),
    )
    op.create_index("events_by_session", "events", ["session_id", "id"])
    op.create_table(
        "outputs",
        sa.Column(
            "event_id",
            sa.BigInteger,
            sa.ForeignKey("events.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("data", sa.Text, nullable=False),
    )
    op.create_table(
        "live_output",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column(
            "event_id",
            sa.BigInteger,
            sa.ForeignKey("events.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("text", sa.Text, nullable=False, comment="JSON text: output may hold NUL"),
    )
    op.create_index("live_output_by_event", "live_output", ["event_id", "id"])
    op.create_table(
        "replicas",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("started", sa.Double, nullable=False),
        sa.Column("seen", sa.Double, nullable=False),
        sa.Column("prompt", sa.Text, nullable=False, comment="JSON: the prompt cache's stats"),
    )
    op.create_table(
        "service_secrets",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )


def downgrade() -> None:
    for table in ("service_secrets", "replicas", "live_output", "outputs", "events", "sessions"):
        op.drop_table(table)
