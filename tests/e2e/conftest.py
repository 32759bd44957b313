"""The whole stack, as the agent_service tests build it."""

from tests.agent_service.conftest import database_url, stack, start_stack, store_kind

__all__ = ["database_url", "stack", "start_stack", "store_kind"]
