"""Hooks the plugin calls; implement them in a `conftest.py` (or a plugin of yours)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .kernels import KernelResult
    from .skills import SkillExample


@pytest.hookspec
def pytest_kernel_agent_skill_example(item: SkillExample, result: KernelResult) -> None:
    """A skill example ran without error; raise (or `assert`) to fail its test item.

    `item.skill` is the parsed skill (`name`, `meta`, `examples`), `item.number` the
    example's position (1-based) and `item.code` its code; `result` is what it produced.
    Called through the conftest files that apply to the skill's folder.
    """
