"""What the examples of our skills must show besides running without error.

The kernel_agent plugin runs every python example of `skills/` in a live kernel
(`kernel_agent_skills` in pyproject.toml) and calls this hook after each that ran cleanly.
"""

from __future__ import annotations

from typing import Any

# Output a skill's examples must produce between them: (output type, MIME type).
EXPECTED_OUTPUT = {
    "matplotlib-plotting": ("display_data", "image/png"),
    "pandas-data-analysis": ("display_data", "text/html"),
}

_seen: dict[str, dict[int, set[tuple[str, str]]]] = {}


def pytest_kernel_agent_skill_example(item: Any, result: Any) -> None:
    name = item.skill.name
    seen = _seen.setdefault(name, {})
    seen[item.number] = {(o["output_type"], m) for o in result.outputs for m in o.get("data", {})}
    expected = EXPECTED_OUTPUT.get(name)
    # Checked at the last example, when every example ran here (not when some were deselected).
    if expected and len(seen) == len(item.skill.examples):
        shown = set().union(*seen.values())
        assert expected in shown, f"{name}: no {expected} output; got {sorted(shown)}"
