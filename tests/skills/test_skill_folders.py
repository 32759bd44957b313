"""The skills folder holds the skills the agent is built around.

Each skill's SKILL.md and its python examples are tested by the kernel_agent pytest plugin
(`kernel_agent_skills` in pyproject.toml; what the examples must show is checked in the
repository's conftest.py): `skills/<name>/SKILL.md::format`, `::example-1`, ...
"""

from __future__ import annotations

from pathlib import Path

SKILLS_DIR = Path(__file__).resolve().parents[2] / "skills"


def test_skills_found() -> None:
    found = {p.name for p in SKILLS_DIR.iterdir() if (p / "SKILL.md").is_file()}
    assert found >= {"sympy-math", "pandas-data-analysis", "matplotlib-plotting", "data-files"}
