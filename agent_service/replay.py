"""Re-execute a transcript notebook in a fresh kernel and compare outputs cell by cell.

A deterministic session must replay clean: the proof that the notebook is a
faithful record. Volatile details are ignored: memory addresses, timings,
execution counts, image bytes (only their presence and type are compared), and
traceback frames (only the exception's name and value). Where the transcript
records a kernel restart, the replay kernel is restarted too.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellTimeoutError, DeadKernelError

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")
_TIMING = re.compile(r"\b\d+(\.\d+)?\s?(ns|µs|us|ms|s)\b")
_SKIPPED_STATUSES = {"timeout_interrupted", "restarted_state_lost", "kernel_died", "unknown"}


@dataclass
class CellReport:
    index: int
    """The cell's position in the notebook (`cells[index]`), as Jupyter tools count it."""
    status: str  # "match", "differs", "skipped", "restarted"
    detail: str = ""


def _normal_text(text: str) -> str:
    text = _ANSI.sub("", text)
    text = _ADDRESS.sub("0x…", text)
    text = _TIMING.sub("<time>", text)
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def _signature(outputs: list[Any]) -> list[tuple[str, ...]]:
    """What must match: stream text per name, results' text, image types, error names."""
    streams: dict[str, str] = {}
    items: list[tuple[str, ...]] = []
    for output in outputs:
        kind = output.get("output_type")
        if kind == "stream":
            streams[output["name"]] = streams.get(output["name"], "") + output["text"]
        elif kind in ("execute_result", "display_data"):
            data = output.get("data", {})
            images = sorted(m for m in data if m.startswith("image/"))
            text = "" if images else _normal_text(str(data.get("text/plain", "")))
            items.append((kind, ",".join(images), text))
        elif kind == "error":
            items.append(("error", output.get("ename", ""), _normal_text(output.get("evalue", ""))))
    for name in sorted(streams):
        items.append(("stream", name, _normal_text(streams[name])))
    return items


def _difference(expected: list[tuple[str, ...]], actual: list[tuple[str, ...]]) -> str:
    for want, got in zip(expected, actual, strict=False):
        if want != got:
            return f"expected {want!r}, got {got!r}"
    if len(expected) != len(actual):
        return f"expected {len(expected)} outputs, got {len(actual)}"
    return ""


async def replay(
    path: Path,
    *,
    cwd: Path | None = None,
    timeout: float = 120,
    env: dict[str, str] | None = None,
) -> list[CellReport]:
    """Execute every code cell of the notebook at `path` and report how each compares."""
    notebook = nbformat.read(path, as_version=4)
    # Positions of the code cells in the notebook; reports name cells by these.
    positions = [i for i, c in enumerate(notebook.cells) if c.cell_type == "code"]
    recorded = [notebook.cells[i] for i in positions]
    # Where the transcript notes a new kernel, the replay kernel is restarted before this cell.
    restart_before: set[int] = set()
    code_seen = 0
    for cell in notebook.cells:
        if cell.cell_type == "code":
            code_seen += 1
        elif cell.metadata.get("kernel_agent", {}).get("kernel_changed"):
            restart_before.add(code_seen)
    expected = [_signature(c.outputs) for c in recorded]
    fresh = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(c.source) for c in recorded],
        metadata=notebook.metadata,
    )
    workdir = cwd or Path(tempfile.mkdtemp(prefix="kernel-agent-replay-"))
    client = NotebookClient(
        fresh,
        timeout=timeout,
        kernel_name="python3",
        allow_errors=True,
        resources={"metadata": {"path": str(workdir)}},
    )
    # IPC, as our kernels run: no TCP ports, and no "running over TCP without encryption".
    sockets = Path(tempfile.mkdtemp(prefix="ka-replay-"))
    km: Any = client.create_kernel_manager()
    km.transport = "ipc"
    km.ip = str(sockets / "kernel")
    kernel_env = {**os.environ, **(env or {})}
    reports: list[CellReport] = []
    try:
        async with client.async_setup_kernel(env=kernel_env):
            for index, (cell, original) in enumerate(zip(fresh.cells, recorded, strict=True)):
                position = positions[index]
                if index in restart_before and index > 0:
                    await _restart(client, timeout)
                    reports.append(
                        CellReport(position, "restarted", "the transcript notes a new kernel")
                    )
                meta = original.metadata.get("kernel_agent", {})
                if meta.get("status") in _SKIPPED_STATUSES:
                    reports.append(CellReport(position, "skipped", f"recorded {meta['status']}"))
                    if meta.get("kernel_restarted"):
                        await _restart(client, timeout)
                    continue
                try:
                    await client.async_execute_cell(cell, index)
                except (CellTimeoutError, DeadKernelError) as exc:
                    reports.append(CellReport(position, "differs", f"{type(exc).__name__}: {exc}"))
                    continue
                detail = _difference(expected[index], _signature(cell.outputs))
                reports.append(CellReport(position, "differs" if detail else "match", detail))
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
    return reports


async def _restart(client: NotebookClient, timeout: float) -> None:
    """Restart the replay kernel, as the transcript's kernel was restarted."""
    km: Any = client.km
    kc: Any = client.kc
    await km.restart_kernel(now=True)
    await kc.wait_for_ready(timeout=timeout)


def replay_sync(path: Path, **kwargs: Any) -> list[CellReport]:
    return asyncio.run(replay(path, **kwargs))
