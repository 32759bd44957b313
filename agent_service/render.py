"""Tool activity as chat content: what clients that render only text see.

Executions become a fenced python block, then a fenced output block (live output
streams into it), then markdown image links served by this service. Open WebUI
users may opt into its `<details type="code_interpreter">` blocks instead. Never
`delta.tool_calls`: clients would try to run those themselves.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable
from typing import Any

from .kernel_client import ToolOutcome

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
# kernel_mcp's live output marks a displayed image with a line such as `[image/png]`; the
# image itself follows the output block, so the marker would show the same thing twice.
_IMAGE_MARKER = re.compile(r"^\[image/[\w.+-]+\]\n", re.MULTILINE)
# A line shaped like an error's one-line summary (`ZeroDivisionError: division by zero`),
# which live output sends before the traceback that ends with the same line. Exception-like
# names only, so that progress lines (`loss: 0.5`) are never held back.
_SUMMARY = re.compile(
    r"(?:^|\n)((?:\w+\.)*[A-Z]\w*(?:Error|Exception|Interrupt|Exit|Iteration|Warning|Group)"
    r": [^\n]*\n)\Z"
)
_IMAGE_TYPES = {"image/png": "png", "image/jpeg": "jpg"}

ImageUrl = Callable[[str], str]
"""Maps an output file name (`<event>-<index>.<ext>`) to its URL."""


def _fence(text: str) -> str:
    """A backtick fence longer than any run of backticks in `text`."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


_MODEL_NOTES = ("image shown below]", "[an HTML table was also displayed to the user]")


def _for_people(text: str) -> str:
    """Tool text without the notes kernel_mcp writes for the model."""
    return "\n".join(line for line in text.splitlines() if not line.endswith(_MODEL_NOTES))


def _clean(text: str) -> str:
    # Output streams into an open ``` fence: keep it from closing early.
    return _ANSI.sub("", text).replace("```", "`\u200b``")


def image_names(event_id: int, outputs: list[dict[str, Any]]) -> list[str]:
    """Names of the image outputs of a tool-result event, as served under /outputs/."""
    names = []
    for index, output in enumerate(outputs):
        for mime, ext in _IMAGE_TYPES.items():
            if mime in output.get("data", {}):
                names.append(f"{event_id}-{index}.{ext}")
                break
    return names


def _tail_text(outputs: list[dict[str, Any]], message: str | None) -> str:
    """What live output did not show: results, tracebacks, status messages."""
    parts = []
    for output in outputs:
        if output["output_type"] == "execute_result":
            parts.append(str(output.get("data", {}).get("text/plain", "")))
        elif output["output_type"] == "error":
            parts.append("\n".join(output.get("traceback", [])))
    if message:
        parts.append(message)
    return "\n".join(p for p in parts if p)


class ContentRenderer:
    """Turns one turn's text and tool activity into content deltas."""

    def __init__(self, mode: str, image_url: ImageUrl) -> None:
        self._mode = mode
        self._image_url = image_url
        self._last = "\n"
        self._fence_open = False
        self._live_sent = False
        self._held = ""

    def _out(self, text: str) -> str:
        if text:
            self._last = text[-1]
        return text

    def _gap(self) -> str:
        return "" if self._last == "\n" else "\n\n"

    def text(self, text: str) -> str:
        return self._out(text)

    def note(self, text: str) -> str:
        """A notice from the service (not the model), as a quote."""
        return self._out(f"{self._gap()}> **Note:** {text}\n\n")

    def tool_start(self, name: str, arguments: dict[str, Any]) -> str:
        self._fence_open = False
        self._live_sent = False
        self._held = ""
        if self._mode == "openwebui":
            return ""
        if name == "execute_code":
            code = str(arguments.get("code", ""))
            fence = _fence(code)
            return self._out(f"{self._gap()}{fence}python\n{code.rstrip()}\n{fence}\n")
        args = json.dumps(arguments, ensure_ascii=False)
        if len(args) > 200:
            args = args[:197] + "..."
        return self._out(f"{self._gap()}`{name}` {args}\n")

    def live(self, text: str) -> str:
        """A piece of a running cell's output, into the open output block.

        Image markers are left out (the image follows the block). A last line shaped like an
        error summary is held until more output comes: if the cell ends with that error,
        its traceback (which ends with the same line) shows it once.
        """
        if self._mode == "openwebui":
            return ""
        self._live_sent = True
        text = _IMAGE_MARKER.sub("", self._held + _ANSI.sub("", text))
        held = _SUMMARY.search(text)
        self._held = held.group(1) if held else ""
        return self._open(text[: held.start(1)] if held else text)

    def _open(self, text: str) -> str:
        """`text` into the output block, opened first if need be."""
        if not text:
            return ""
        prefix = "" if self._fence_open else "```text\n"
        self._fence_open = True
        return self._out(prefix + _clean(text))

    def _release(self, outputs: list[dict[str, Any]]) -> str:
        """The held line, unless it is the summary of the error the traceback will show."""
        held, self._held = self._held, ""
        summaries = {
            f"{o.get('ename')}: {o.get('evalue')}\n"
            for o in outputs
            if o.get("output_type") == "error" and o.get("traceback")
        }
        return "" if held in summaries else self._open(held)

    def tool_end(
        self, name: str, arguments: dict[str, Any], outcome: ToolOutcome, event_id: int
    ) -> str:
        structured = outcome.structured or {}
        outputs: list[dict[str, Any]] = (
            structured.get("outputs", []) if name == "execute_code" else []
        )
        images = "".join(
            f"\n![output {i + 1}]({self._image_url(n)})\n"
            for i, n in enumerate(image_names(event_id, outputs))
        )
        if self._mode == "openwebui":
            return self._out(self._details(name, arguments, outcome) + images)
        if name != "execute_code" and not outcome.is_error:
            return ""
        text = self._release(outputs if not outcome.is_error else [])
        if self._live_sent and not outcome.is_error:
            body = _tail_text(outputs, structured.get("message"))
        else:
            body = _for_people(outcome.text)
        if body.strip() or self._fence_open:
            if not self._fence_open:
                text += "```text\n"
            elif self._last != "\n":
                text += "\n"
            text += _clean(body).rstrip("\n") + ("\n" if body.strip() else "")
            text += "```\n"
        self._fence_open = False
        return self._out(text + images)

    def _details(self, name: str, arguments: dict[str, Any], outcome: ToolOutcome) -> str:
        code = str(arguments.get("code", "")) if name == "execute_code" else json.dumps(arguments)
        output = _for_people(outcome.text)
        attrs = f'type="code_interpreter" done="true" output="{html.escape(output, quote=True)}"'
        code_fence, out_fence = _fence(code), _fence(output)
        return self._out(
            f"{self._gap()}<details {attrs}>\n<summary>Analyzed</summary>\n\n"
            f"{code_fence}python\n{code.rstrip()}\n{code_fence}\n\n"
            f"{out_fence}text\n{_ANSI.sub('', output).rstrip()}\n{out_fence}\n</details>\n"
        )
