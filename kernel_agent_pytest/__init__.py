"""kernel-agent's pytest plugin: live kernels, kernel_mcp, the agent and a scripted LLM in tests.

Installed with kernel-agent and loaded by pytest through the `pytest11` entry point
`kernel_agent` (`kernel_agent_pytest.plugin`); see docs/testing.md. The names below are for
type annotations and scripting; they are imported on first use, so loading the plugin
imports neither the kernel layer nor the agent.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .kernels import Kernel, KernelFactory, KernelResult
    from .processes import KernelProcess
    from .scripted_llm import (
        Error,
        Gate,
        Hold,
        MidStreamError,
        ScriptedLLM,
        Stall,
        Step,
        Text,
        ToolCall,
        ToolCalls,
    )
    from .servers import AgentStack, KernelMcpServer, ServerThread
    from .skills import Skill, SkillExample

_WHERE = {
    "Kernel": "kernels",
    "KernelFactory": "kernels",
    "KernelResult": "kernels",
    "KernelProcess": "processes",
    "AgentStack": "servers",
    "KernelMcpServer": "servers",
    "ServerThread": "servers",
    "Skill": "skills",
    "SkillExample": "skills",
    **dict.fromkeys(
        [
            "Error",
            "Gate",
            "Hold",
            "MidStreamError",
            "ScriptedLLM",
            "Stall",
            "Step",
            "Text",
            "ToolCall",
            "ToolCalls",
        ],
        "scripted_llm",
    ),
}

__all__ = [
    "AgentStack",
    "Error",
    "Gate",
    "Hold",
    "Kernel",
    "KernelFactory",
    "KernelMcpServer",
    "KernelProcess",
    "KernelResult",
    "MidStreamError",
    "ScriptedLLM",
    "ServerThread",
    "Skill",
    "SkillExample",
    "Stall",
    "Step",
    "Text",
    "ToolCall",
    "ToolCalls",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
