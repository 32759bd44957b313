"""The service's records as the web page's markdown: executions, outputs, whole sessions."""

from __future__ import annotations

import html
import json
import re
from typing import Any

from .files import size_text

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def _fenced(text: str, lang: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text.rstrip()}\n{fence}"


def _data_uri(data: dict[str, Any]) -> str | None:
    """An image output as a data URI: it needs no request (nor API key) of the browser."""
    for mime in ("image/png", "image/jpeg"):
        if mime in data:
            return f"data:{mime};base64,{''.join(str(data[mime]).split())}"
    return None


def _outputs_md(outputs: list[dict[str, Any]]) -> str:
    """nbformat outputs as markdown: text in a fence, images inline, HTML (tables) as is."""
    parts: list[str] = []
    text: list[str] = []

    def flush() -> None:
        joined = _ANSI.sub("", "".join(text))
        if joined.strip():
            parts.append(_fenced(joined, "text"))
        text.clear()

    for output in outputs:
        kind, data = output.get("output_type"), output.get("data") or {}
        if kind == "stream":
            text.append(str(output.get("text", "")))
        elif kind == "error":
            lines = output.get("traceback") or [f"{output.get('ename')}: {output.get('evalue')}"]
            text.append("\n".join(lines) + "\n")
        elif image := _data_uri(data):
            flush()
            parts.append(f"![output]({image})")
        elif "text/html" in data:
            flush()  # blank lines would end markdown's HTML block early
            parts.append(re.sub(r"\n\s*\n", "\n", str(data["text/html"])).strip())
        elif "text/plain" in data:
            text.append(str(data["text/plain"]) + "\n")
    flush()
    return "\n\n".join(parts)


def _execution_md(event: dict[str, Any]) -> str:
    """One recorded tool call as the chat showed it: code, then its outputs."""
    arguments = event.get("arguments") or {}
    structured = event.get("structured") or {}
    if event.get("name") != "execute_code":
        return f"`{event.get('name')}` {json.dumps(arguments, ensure_ascii=False)[:200]}"
    outputs = structured.get("outputs")
    shown = _outputs_md(outputs) if outputs else _fenced(event.get("text", ""), "text")
    notes = f"\n\n*{structured['message']}*" if structured.get("message") else ""
    return f"{_fenced(str(arguments.get('code', '')), 'python')}\n\n{shown}{notes}"


def chat_messages(events: list[dict[str, Any]]) -> list[dict[str, str]]:
    """A session's recorded events as chat messages."""
    messages: list[dict[str, str]] = []

    def add(role: str, text: str) -> None:
        if role == "assistant" and messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + text
        elif text.strip():
            messages.append({"role": role, "content": text})

    for event in events:
        kind = event.get("type")
        if kind == "user":
            add("user", str(event.get("content", "")))
        elif kind == "assistant" and event.get("content"):
            add("assistant", str(event["content"]))
        elif kind == "tool_result" and event.get("direct"):
            add("user", "*Ran in the kernel:*\n\n" + _execution_md(event))
        elif kind == "tool_result":
            add("assistant", _execution_md(event))
        elif kind == "note":
            add("assistant", f"> **Note:** {html.escape(str(event.get('text')), quote=False)}")
        elif kind == "error":
            add("assistant", f"**Error:** {html.escape(str(event.get('message')), quote=False)}")
        elif kind == "files" and event.get("files"):
            # Names, not the reply's links: those may have expired; the panel lists them.
            names = ", ".join(
                f"`{f.get('path')}` ({size_text(int(f.get('size') or 0))})" for f in event["files"]
            )
            add("assistant", f"**Files written in this turn:** {names}, in the Files panel.")
    return messages


def result_md(result: dict[str, Any]) -> str:
    """The answer of POST /execute: status, then the outputs."""
    head = f"*[{result.get('execution_count') or ' '}] {result.get('status')}*"
    if result.get("message"):
        head += f" · {result['message']}"
    outputs = result.get("outputs") or []
    body = _outputs_md(outputs) if outputs else _fenced(str(result.get("text") or ""), "text")
    return f"{head}\n\n{body}"


def attach_md(info: dict[str, Any]) -> str:
    command = info.get("console_command")
    console = f"\n\nOr a terminal console:\n\n```sh\n.venv/bin/{command}\n```" if command else ""
    return (
        f"Kernel `{info.get('kernel_id')}`. In the repository, `make lab` opens JupyterLab "
        f"with this kernel among its running kernels.{console}"
    )
