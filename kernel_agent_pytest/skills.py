"""Skill folders as tests: `SKILL.md` checked against the Agent Skills format, and each
fenced `python` example run in a live kernel as a test item of its own.

A skill's examples share one kernel and run in the order they appear, as an agent would
run them: an example may use what an earlier one defined. Selecting one example runs the
earlier ones first; once an example fails, the later ones of that skill are skipped.
The kernel runs with the skills folder as its `skills_dir`, so helper modules there
import as they do for the agent.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import _pytest
import pluggy
import pytest
import yaml

if TYPE_CHECKING:
    from collections.abc import Callable

    from _pytest._code.code import ExceptionInfo, TerminalRepr, Traceback, TracebackStyle

    from .kernels import Kernel, KernelResult

# https://agentskills.io/specification
FIELDS = frozenset({"name", "description", "license", "compatibility", "metadata", "allowed-tools"})
NAME_MAX, DESCRIPTION_MAX, COMPATIBILITY_MAX = 64, 1024, 500

KERNEL_FOR_SKILL: pytest.StashKey[Callable[[Path], Kernel]] = pytest.StashKey()
"""Set by the plugin: starts the kernel for the skill of a SKILL.md path."""

_INTERNAL = tuple(str(Path(path).parent) for path in (_pytest.__file__, pluggy.__file__, __file__))
_FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})\s*(?P<info>[^\s`]*)")


@dataclass(frozen=True)
class Example:
    """One fenced `python` block: its code and the line its code starts on (1-based)."""

    code: str
    line: int


@dataclass
class Skill:
    """A parsed `SKILL.md`: front matter, problems with it, and the python examples."""

    path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    examples: list[Example] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def name(self) -> str:
        return self.folder.name


def read_skill(path: Path) -> Skill:
    """Parse `path` (a SKILL.md) and check it against the Agent Skills format."""
    text = path.read_text(encoding="utf-8")
    skill = Skill(path)
    lines = text.splitlines()
    body_start = 0
    if lines and lines[0].strip() == "---":
        end = next((i for i in range(1, len(lines)) if lines[i].strip() == "---"), None)
        if end is None:
            skill.problems.append("the front matter has no closing '---' line")
        else:
            body_start = end + 1
            try:
                meta = yaml.safe_load("\n".join(lines[1:end]))
            except yaml.YAMLError as exc:
                skill.problems.append(f"the front matter is not valid YAML: {exc}")
            else:
                if isinstance(meta, dict):
                    skill.meta = meta
                    skill.problems += check_front_matter(meta, path.parent.name)
                else:
                    skill.problems.append("the front matter is not a mapping of fields")
    else:
        skill.problems.append("SKILL.md must start with YAML front matter between '---' lines")
    skill.examples = list(_python_blocks(lines, body_start))
    return skill


def check_front_matter(meta: dict[str, Any], folder: str) -> list[str]:
    """Problems of a skill's front matter under the Agent Skills specification."""
    problems = []
    unknown = sorted(str(k) for k in meta if k not in FIELDS)
    if unknown:
        problems.append(f"unknown fields {unknown}; the format allows {sorted(FIELDS)}")
    name = meta.get("name")
    if not isinstance(name, str) or not name.strip():
        problems.append("'name' is required: a non-empty string")
    else:
        name = unicodedata.normalize("NFKC", name.strip())
        if len(name) > NAME_MAX:
            problems.append(f"'name' is longer than {NAME_MAX} characters")
        if name != name.lower() or not all(c.isalnum() or c == "-" for c in name):
            problems.append(f"'name' {name!r} must be lowercase letters, digits and hyphens")
        if name.startswith("-") or name.endswith("-") or "--" in name:
            problems.append(f"'name' {name!r} must not start or end with '-' nor contain '--'")
        if name != unicodedata.normalize("NFKC", folder):
            problems.append(f"'name' {name!r} must equal the folder name {folder!r}")
    description = meta.get("description")
    if not isinstance(description, str) or not description.strip():
        problems.append("'description' is required: what the skill does and when to use it")
    elif len(description) > DESCRIPTION_MAX:
        problems.append(f"'description' is longer than {DESCRIPTION_MAX} characters")
    if "license" in meta and not isinstance(meta["license"], str):
        problems.append("'license' must be a string")
    if "compatibility" in meta:
        value = meta["compatibility"]
        if not isinstance(value, str) or not value.strip() or len(value) > COMPATIBILITY_MAX:
            problems.append(f"'compatibility' must be a string of 1-{COMPATIBILITY_MAX} characters")
    if "metadata" in meta:
        value = meta["metadata"]
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            problems.append("'metadata' must map strings to strings")
    if "allowed-tools" in meta and not isinstance(meta["allowed-tools"], str):
        problems.append("'allowed-tools' must be a space-separated string of tool names")
    return problems


def _python_blocks(lines: list[str], start: int) -> Iterator[Example]:
    """Fenced blocks whose info string is `python`, skipping fences nested in other blocks."""
    i = start
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence = opening.group("fence")
        close = re.compile(rf"^{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        if opening.group("info").lower() == "python":
            yield Example("\n".join(lines[i + 1 : j]) + "\n", i + 2)
        i = j + 1


class ExampleFailed(Exception):
    """A skill example did not run cleanly in the kernel."""

    def __init__(self, result: KernelResult, number: int, why: str = "") -> None:
        super().__init__(f"example {number}: {result.status}")
        self.result = result
        self.number = number
        """The example whose code failed."""
        self.why = why


class SkillFile(pytest.File):
    """A `SKILL.md`: one item for its format, one per python example, one kernel for all."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kernel: Kernel | None = None
        self.ran: set[int] = set()
        self.failed: int | None = None

    def collect(self) -> Iterator[pytest.Item]:
        skill = read_skill(self.path)
        yield SkillFormat.from_parent(self, name="format", skill=skill)
        for number in range(1, len(skill.examples) + 1):
            yield SkillExample.from_parent(
                self, name=f"example-{number}", skill=skill, number=number
            )

    def teardown(self) -> None:
        kernel, self.kernel = self.kernel, None
        self.ran.clear()
        self.failed = None
        if kernel is not None:
            kernel.shutdown()


class SkillFormat(pytest.Item):
    """The skill's `SKILL.md` follows the Agent Skills format."""

    def __init__(self, *, skill: Skill, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.skill = skill

    def runtest(self) -> None:
        if self.skill.problems:
            problems = "\n".join(f"  - {p}" for p in self.skill.problems)
            raise pytest.fail.Exception(
                f"{self.skill.name}/SKILL.md breaks the Agent Skills format:\n{problems}",
                pytrace=False,
            )

    def reportinfo(self) -> tuple[Path, int, str]:
        return self.path, 0, f"{self.skill.name} SKILL.md format"


class SkillExample(pytest.Item):
    """Example `number` of a skill, run in the skill's kernel after the examples before it."""

    parent: SkillFile

    def __init__(self, *, skill: Skill, number: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.skill = skill
        self.number = number
        self.example = skill.examples[number - 1]
        self.add_marker("kernel")

    @property
    def code(self) -> str:
        return self.example.code

    def runtest(self) -> None:
        skill_file = self.parent
        if skill_file.failed is not None:
            pytest.skip(f"example {skill_file.failed} of {self.skill.name} failed before it")
        if skill_file.kernel is None:
            skill_file.kernel = self.config.stash[KERNEL_FOR_SKILL](self.skill.path)
        kernel = skill_file.kernel
        for number in range(1, self.number):  # earlier examples a selection left out
            if number not in skill_file.ran:
                earlier = self.skill.examples[number - 1]
                result = kernel.execute(earlier.code)
                skill_file.ran.add(number)
                if result.status != "ok":
                    skill_file.failed = number
                    why = f"example {number}, run first: this one continues its state"
                    raise ExampleFailed(result, number, why)
        result = kernel.execute(self.code)
        skill_file.ran.add(self.number)
        if result.status != "ok":
            skill_file.failed = self.number
            raise ExampleFailed(result, self.number)
        self.ihook.pytest_kernel_agent_skill_example(item=self, result=result)

    def repr_failure(
        self, excinfo: ExceptionInfo[BaseException], style: TracebackStyle | None = None
    ) -> str | TerminalRepr:
        if not isinstance(excinfo.value, ExampleFailed):
            return super().repr_failure(excinfo, style)
        failure = excinfo.value
        result = failure.result
        example = self.skill.examples[failure.number - 1]
        where = (
            f"{self.skill.name} example {failure.number} ({self.path.name}, line {example.line})"
        )
        header = f"{where} failed in the kernel: {result.status}"
        if failure.why:
            header += f"\n(the failing code is {failure.why})"
        parts = [header, "--- code ---", example.code.rstrip()]
        parts += ["--- kernel output ---", result.text.rstrip()]
        if result.message:
            parts.append(f"--- note ---\n{result.message}")
        return "\n".join(parts)

    def reportinfo(self) -> tuple[Path, int, str]:
        return self.path, self.example.line - 1, f"{self.skill.name} example {self.number}"

    def _traceback_filter(self, excinfo: ExceptionInfo[BaseException]) -> Traceback:
        # A check of a conftest hook failed: show its frames, not pytest's, pluggy's or ours.
        full = excinfo.traceback
        return full.filter(lambda entry: not str(entry.path).startswith(_INTERNAL)) or full
