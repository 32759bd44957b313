"""Every skill in ``skills/`` is well-formed and its examples run in a live kernel.

Skills are discovered from the folder, so a new skill is covered without editing
this file. Each skill's ```python blocks run in order in one fresh ipykernel whose
working folder is ``tmp_path`` and whose ``PYTHONPATH`` is ``skills/``, as the
kernel layer sets it up for a session.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.manager import AsyncKernelManager, start_new_async_kernel

SKILLS_DIR = Path(__file__).resolve().parents[2] / "skills"
SKILL_DIRS = sorted(p for p in SKILLS_DIR.iterdir() if (p / "SKILL.md").is_file())

NAME_RE = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
FRONT_MATTER_RE = re.compile(r"\A---\n(.*?)\n---\n", re.DOTALL)
PYTHON_BLOCK_RE = re.compile(r"^```python\n(.*?)^```\s*$", re.DOTALL | re.MULTILINE)
ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")

BLOCK_TIMEOUT = 60  # seconds per example block
# Output each skill's examples must produce besides "no errors": (msg type, mime type).
EXPECTED_OUTPUT = {
    "matplotlib-plotting": ("display_data", "image/png"),
    "pandas-data-analysis": ("display_data", "text/html"),
}

Outputs = list[dict[str, Any]]
StartKernel = Callable[[Path], Awaitable[AsyncKernelClient]]


def _front_matter(skill_md: Path) -> dict[str, Any]:
    match = FRONT_MATTER_RE.match(skill_md.read_text(encoding="utf-8"))
    assert match, f"{skill_md} must start with a '---' YAML front matter block"
    meta = yaml.safe_load(match.group(1))
    assert isinstance(meta, dict), f"{skill_md}: front matter is not a mapping"
    return meta


def _python_blocks(skill_md: Path) -> list[str]:
    return PYTHON_BLOCK_RE.findall(skill_md.read_text(encoding="utf-8"))


def _kernel_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    env["PYTHONPATH"] = str(SKILLS_DIR)
    return env


@pytest.fixture
async def start_kernel() -> AsyncIterator[StartKernel]:
    """Factory: start a python3 kernel in a folder; every kernel is shut down after."""
    started: list[tuple[AsyncKernelManager, AsyncKernelClient]] = []

    async def _start(cwd: Path) -> AsyncKernelClient:
        km, kc = await start_new_async_kernel(
            kernel_name="python3", cwd=str(cwd), env=_kernel_env()
        )
        started.append((km, kc))
        return kc

    try:
        yield _start
    finally:
        for km, kc in started:
            try:
                kc.stop_channels()
            finally:
                await km.shutdown_kernel(now=True)


async def _run(kc: AsyncKernelClient, code: str) -> tuple[dict[str, Any], Outputs]:
    outputs: Outputs = []

    def hook(msg: dict[str, Any]) -> None:
        kind = msg["header"]["msg_type"]
        if kind in {"stream", "display_data", "execute_result", "error"}:
            outputs.append({"output_type": kind, **msg["content"]})

    reply = await kc.execute_interactive(
        code, timeout=BLOCK_TIMEOUT, allow_stdin=False, output_hook=hook
    )
    return reply, outputs


def _describe(outputs: Outputs) -> str:
    parts = []
    for out in outputs:
        if out["output_type"] == "error":
            parts.append("\n".join(out["traceback"]))
        elif out["output_type"] == "stream":
            parts.append(out["text"])
    return ANSI_RE.sub("", "\n".join(parts))[-4000:]


@pytest.mark.parametrize("skill_dir", SKILL_DIRS, ids=lambda p: p.name)
def test_front_matter(skill_dir: Path) -> None:
    meta = _front_matter(skill_dir / "SKILL.md")
    name = meta.get("name")
    assert name == skill_dir.name, f"name {name!r} must equal the folder name"
    assert NAME_RE.match(name), f"{name!r} is not lowercase-hyphen"
    assert len(name) <= 64, f"{name!r} is longer than 64 characters"
    description = meta.get("description")
    assert isinstance(description, str), "description must be a string"
    assert description.strip(), "description must not be empty"
    assert len(description) <= 1024, "description is longer than 1024 characters"


def test_skills_found() -> None:
    assert {p.name for p in SKILL_DIRS} >= {
        "sympy-math",
        "pandas-data-analysis",
        "matplotlib-plotting",
        "data-files",
    }


@pytest.mark.kernel
@pytest.mark.timeout(300)
@pytest.mark.parametrize("skill_dir", SKILL_DIRS, ids=lambda p: p.name)
async def test_examples_run(skill_dir: Path, tmp_path: Path, start_kernel: StartKernel) -> None:
    blocks = _python_blocks(skill_dir / "SKILL.md")
    assert blocks, f"{skill_dir.name}/SKILL.md has no ```python examples"
    kc = await start_kernel(tmp_path)

    seen: set[tuple[str, str]] = set()
    for number, code in enumerate(blocks, start=1):
        reply, outputs = await _run(kc, code)
        where = f"{skill_dir.name} example {number}:\n{code}\n--- output ---\n"
        assert all(o["output_type"] != "error" for o in outputs), where + _describe(outputs)
        assert reply["content"]["status"] == "ok", where + _describe(outputs)
        seen.update((o["output_type"], mime) for o in outputs for mime in o.get("data", {}))

    expected = EXPECTED_OUTPUT.get(skill_dir.name)
    if expected:
        assert expected in seen, f"{skill_dir.name}: no {expected} output; got {sorted(seen)}"
