"""Alembic migrations of the PostgreSQL schema (see `agent_service.postgres.migrate`)."""
