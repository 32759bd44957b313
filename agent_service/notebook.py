"""Transcripts as Jupyter notebooks: the only module that imports nbformat.

The notebook is derived from the transcript alone (export never talks to a
kernel): markdown cells for who said what, a code cell with the kernel's real
outputs for every execution, and a note wherever a timeout, interrupt or restart
changed the kernel's state.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import tempfile
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nbformat
from nbformat import NotebookNode

from .store import Event, SessionRecord

MEDIA_TYPE = "application/x-ipynb+json"
_NOTE_STATUSES = {
    "timeout_interrupted": "Timeout: the code was interrupted",
    "restarted_state_lost": "Kernel restarted: earlier variables were lost",
    "kernel_died": "Kernel died and was restarted: earlier variables were lost",
    "unknown": "Result unknown: the service stopped while this code was running",
}
_UNKNOWN = (
    "The output above is what arrived before that; the code may have run further, so the "
    "kernel may hold more of its effects."
)
_OTHER_TOOL_TEXT = 3000
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}


Cell = dict[str, Any]


def new_markdown_cell(source: str) -> Cell:
    # Plain dicts: nbformat's own cell builders validate every cell (seconds per 1,000).
    return {"cell_type": "markdown", "metadata": {}, "source": source}


def new_code_cell(source: str, execution_count: int | None, outputs: list[Any]) -> Cell:
    return {
        "cell_type": "code",
        "metadata": {},
        "source": source,
        "execution_count": execution_count,
        "outputs": outputs,
    }


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat()


def _fenced(text: str, language: str = "text") -> str:
    longest = max((len(m) for m in re.findall(r"`{3,}", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text.rstrip()}\n{fence}"


# Characters markdown (or Jupyter's MathJax) would read as markup anywhere in a line.
_INLINE_MARKUP = re.compile(r"([\\`*_\[\]<>#|~$])")
# ... and at the start of a line (lists, quotes, headings, rules).
_LINE_START_MARKUP = re.compile(r"^(\s*)([-+=>]|\d+[.)])")
_CODE_LINE = re.compile(
    r"^\s*(import\s|from\s+\S+\s+import\s|def\s|class\s|for\s|while\s|if\s|elif\s|"
    r"else\s*:|try\s*:|except\b|with\s|return\b|print\(|@\w|#)"
    r"|^\s*[\w.\[\]'\"]+\s*([-+*/]?=|\()"
    r"|^\s+\S"
)


def _looks_like_code(lines: list[str]) -> bool:
    if not all(_CODE_LINE.match(line) for line in lines):
        return False
    try:
        ast.parse(textwrap.dedent("\n".join(lines)))
    except (SyntaxError, ValueError):
        return False
    return True


def _literal_line(line: str) -> str:
    line = _INLINE_MARKUP.sub(r"\\\1", line)
    return _LINE_START_MARKUP.sub(lambda m: m.group(1) + "\\" + m.group(2), line)


def user_markdown(text: str) -> str:
    """A user's message as markdown that renders as they wrote it.

    Line breaks are kept, markup characters are escaped (so `**` or `_` stay literal),
    fenced blocks the user wrote stay fenced, and runs of lines that are Python code are
    shown as code blocks. The words are not changed.
    """
    out: list[str] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.lstrip().startswith("```"):  # the user's own fence: verbatim to its end
            end = next(
                (j for j in range(index + 1, len(lines)) if lines[j].strip().startswith("```")),
                len(lines) - 1,
            )
            out += lines[index : end + 1]
            if not lines[end].strip().startswith("```") or end == index:
                out.append("```")
            index = end + 1
            continue
        if not line.strip():
            out.append("")
            index += 1
            continue
        end = index
        while end < len(lines) and lines[end].strip() and not lines[end].lstrip().startswith("```"):
            end += 1
        block = lines[index:end]
        start = 0
        while start < len(block):
            # The longest run of code lines from here, else one prose line.
            stop = next(
                (k for k in range(len(block), start, -1) if _looks_like_code(block[start:k])),
                None,
            )
            if stop is not None:
                code = textwrap.dedent("\n".join(block[start:stop]))
                out += ["", _fenced(code, "python"), ""]
                start = stop
            else:
                last = start + 1 == len(block) or _looks_like_code(block[start + 1 : start + 2])
                out.append(_literal_line(block[start]) + ("" if last else "<br>"))
                start += 1
        index = end
    return "\n".join(out).strip("\n")


def _output(raw: dict[str, Any]) -> dict[str, Any]:
    """An nbformat v4 output from a kernel_mcp output dict."""
    kind = raw.get("output_type")
    if kind == "stream":
        return {"output_type": "stream", "name": raw.get("name", "stdout"), "text": raw["text"]}
    if kind == "error":
        return {
            "output_type": "error",
            "ename": str(raw.get("ename", "")),
            "evalue": str(raw.get("evalue", "")),
            "traceback": [str(line) for line in raw.get("traceback", [])],
        }
    output = {
        "output_type": kind,
        "data": raw.get("data", {}),
        "metadata": raw.get("metadata") or {},
    }
    if kind == "execute_result":
        output["execution_count"] = raw.get("execution_count")
    return output


def _code_cells(event: Event) -> list[Cell]:
    data = event.data
    result: dict[str, Any] = data.get("structured") or {}
    if result.get("status") == "unknown" or event.type == "tool_started":
        # Cut short by a shutdown or a killed service: the live output is what is known.
        live = str(data.get("live_output") or "")
        result = {
            "status": "unknown",
            "outputs": [{"output_type": "stream", "name": "stdout", "text": live}] if live else [],
            "message": _UNKNOWN,
        }
    cells: list[Cell] = []
    background = result.get("background_outputs") or []
    if background:
        text = "".join(o.get("text", "") for o in background if o.get("output_type") == "stream")
        cells.append(
            new_markdown_cell(
                "_Output printed by background code since the previous execution:_\n\n"
                + _fenced(text or "(rich output)")
            )
        )
    if data.get("direct"):
        cells.append(new_markdown_cell("_Run by the user in the session's kernel:_"))
    cell = new_code_cell(
        source=str(data.get("arguments", {}).get("code", "")),
        execution_count=result.get("execution_count"),
        outputs=[_output(o) for o in result.get("outputs", [])],
    )
    cell["metadata"]["kernel_agent"] = {
        "status": result.get("status", "error" if data.get("is_error") else "ok"),
        "kernel_restarted": bool(result.get("kernel_restarted")),
        "truncated": bool(result.get("truncated")),
        "elapsed": result.get("elapsed"),
        "tool_call_id": data.get("call_id"),
    }
    cells.append(cell)
    status = result.get("status")
    if status in _NOTE_STATUSES or result.get("state_lost"):
        title = _NOTE_STATUSES.get(str(status), "Earlier kernel state was lost")
        cells.append(new_markdown_cell(f"> **{title}.** {result.get('message') or ''}".rstrip()))
    elif data.get("is_error") and not result:
        cells.append(new_markdown_cell(f"> **The execution failed:** {data.get('text', '')}"))
    return cells


def _note_cell(event: Event) -> Cell:
    data = event.data
    cell = new_markdown_cell(f"> **Note:** {data.get('text', '')}")
    if data.get("kind") == "kernel_changed":
        cell["metadata"]["kernel_agent"] = {"kernel_changed": True}  # replay restarts here
    return cell


def _tool_cell(event: Event) -> Cell:
    data = event.data
    args = json.dumps(data.get("arguments", {}), ensure_ascii=False)
    text = str(data.get("text", ""))
    if len(text) > _OTHER_TOOL_TEXT:
        text = text[:_OTHER_TOOL_TEXT] + f"\n[... {len(text) - _OTHER_TOOL_TEXT:,} characters]"
    label = "failed" if data.get("is_error") else "returned"
    cell = new_markdown_cell(f"**Tool** `{data.get('name')}` `{args}` {label}:\n\n{_fenced(text)}")
    if data.get("name") == "restart_kernel" and not data.get("is_error"):
        cell["metadata"]["kernel_agent"] = {"kernel_changed": True}
    return cell


def _files_cell(data: dict[str, Any]) -> Cell:
    """The files a turn wrote: paths and sizes (links in replies expire; paths do not)."""
    lines = [
        f"- `{f.get('path', '')}` ({int(f.get('size', 0)):,} bytes)" for f in data.get("files", [])
    ]
    cell = new_markdown_cell(
        "**Files written in this turn** (in the session folder):\n\n" + "\n".join(lines)
    )
    cell["metadata"]["kernel_agent"] = {
        "files_written": [f.get("path") for f in data.get("files", [])]
    }
    return cell


def build_notebook(record: SessionRecord, events: list[Event]) -> NotebookNode:
    """The session's notebook (nbformat v4)."""
    cells: list[Cell] = []
    answered = {(e.turn, e.data.get("call_id")) for e in events if e.type == "tool_result"}
    for event in events:
        data = event.data
        if event.type == "tool_started":
            if (event.turn, data.get("call_id")) not in answered and data.get("name") == (
                "execute_code"
            ):
                cells += _code_cells(event)  # the service stopped before the result
        elif event.type == "note":
            cells.append(_note_cell(event))
        elif event.type == "user":
            cells.append(new_markdown_cell(f"**User:**\n\n{user_markdown(data['content'])}"))
        elif event.type == "assistant" and data.get("content"):
            note = "\n\n_(the answer was cut off by an error)_" if data.get("partial") else ""
            cells.append(new_markdown_cell(f"**Assistant:**\n\n{data['content']}{note}"))
        elif event.type == "tool_result":
            if data.get("name") == "execute_code":
                cells += _code_cells(event)
            else:
                cells.append(_tool_cell(event))
        elif event.type == "error":
            cells.append(new_markdown_cell(f"> **Error:** {data.get('message', '')}"))
        elif event.type == "files":
            cells.append(_files_cell(data))
    # Ids from the transcript's event ids: the same transcript always gives the same file.
    for position, cell in enumerate(cells):
        cell["id"] = f"cell-{position}"
    kernel = record.kernel
    notebook = {
        "nbformat": 4,
        "nbformat_minor": 5,
        "cells": cells,
        "metadata": {
            "kernelspec": KERNELSPEC,
            "language_info": kernel.get("language_info") or {"name": "python"},
            "kernel_agent": {
                "session_id": record.id,
                "model": record.model,
                "title": record.title,
                "created": _iso(record.created),
                "updated": _iso(record.updated),
            },
        },
    }
    return nbformat.from_dict(notebook)


def dumps(notebook: NotebookNode) -> str:
    return nbformat.writes(notebook, version=4)


def validate(notebook: NotebookNode) -> None:
    """Raise nbformat.ValidationError if the notebook is not valid v4."""
    nbformat.validate(notebook, version=4)


def write_atomic(notebook: NotebookNode, path: Path) -> None:
    """Write the notebook so readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = dumps(notebook)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
