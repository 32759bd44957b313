"""The whole stack, as the agent_service tests build it."""

from tests.agent_service.conftest import stack, start_stack

__all__ = ["stack", "start_stack"]
