"""Turn IOPub messages into nbformat v4 outputs under a byte cap.

The kernel caps its output at the source (`_kernel_launcher.py`) and says what it left
out in a truncation note; this collector turns that note into the visible marker and is
the second line: it keeps the first half of the cap (head) and the most recent half
(tail) of text, and images whole on a budget of their own, so memory stays bounded
whatever arrives. Rich outputs are kept or dropped whole, never cut; stream text is cut
at character boundaries.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

Output = dict[str, Any]

_RICH_TYPES = ("execute_result", "display_data")
TRUNCATION_MIME = "application/vnd.kernel-agent.truncation+json"
"""The kernel's note of what its output cap left out (see `_kernel_launcher.py`)."""


def _text_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _output_size(output: Output) -> int:
    """Bytes of an output's text (images are counted by `_image_size`)."""
    if output["output_type"] == "stream":
        return _text_size(output["text"])
    if output["output_type"] == "error":
        return sum(_text_size(line) for line in output["traceback"]) + 64
    size = 0
    for mime, value in output.get("data", {}).items():
        if not mime.startswith("image/"):
            size += _text_size(value) if isinstance(value, str) else len(json.dumps(value))
    return size


def _image_size(output: Output) -> int:
    return sum(
        len(value)
        for mime, value in output.get("data", {}).items()
        if mime.startswith("image/") and isinstance(value, str)
    )


def shrink(outputs: list[Output], cap: int) -> tuple[list[Output], int]:
    """`outputs` bounded again to `cap` bytes; returns them and the bytes dropped."""
    # Mostly head: whole images are kept in order as far as they fit.
    collector = OutputCollector(cap, head_share=0.75, image_cap=cap)
    for output in outputs:
        collector.add_output(output)
    return collector.outputs(), collector.dropped_bytes


def truncation_marker(
    name: str, dropped_bytes: int, dropped_outputs: int, path: str | None = None
) -> Output:
    """The stream output that stands where output was dropped."""
    parts = [f"{dropped_bytes:,} bytes truncated"]
    if dropped_outputs:
        parts.append(f"{dropped_outputs:,} outputs omitted")
    if path:
        parts.append(f"full text in {path}")
    return {
        "output_type": "stream",
        "name": name,
        "text": f"\n[... {'; '.join(parts)} ...]\n",
    }


class OutputCollector:
    """Accumulates one execution's outputs, bounded by `cap` bytes."""

    def __init__(self, cap: int, head_share: float = 0.5, image_cap: int | None = None) -> None:
        self._image_left = 8 * cap if image_cap is None else image_cap
        self._head_budget = int(cap * head_share)
        self._tail_budget = cap - self._head_budget
        self._head: list[Output] = []
        self._head_bytes = 0
        self._head_full = False
        self._tail: deque[Output] = deque()
        self._tail_bytes = 0
        self.dropped_bytes = 0
        self.dropped_outputs = 0
        self.kernel_dropped_bytes = 0
        self.kernel_dropped_outputs = 0
        self._dropped_stream = "stdout"
        self._clear_on_next = False
        self._displays: dict[str, list[Output]] = {}
        self._display_of: dict[int, str] = {}  # id(output) -> display_id, to forget dropped ones
        self.execution_count: int | None = None
        self.output_file: str | None = None
        """Where the kernel kept the full text of output it cut (relative to its folder)."""

    # -- message intake -------------------------------------------------

    def add_message(self, msg: dict[str, Any]) -> None:
        """Take one IOPub message (any type; irrelevant ones are ignored)."""
        msg_type = msg["header"]["msg_type"]
        content = msg["content"]
        if msg_type == "stream":
            self._before_output()
            self._add_stream(content.get("name", "stdout"), content.get("text", ""))
        elif msg_type in _RICH_TYPES and TRUNCATION_MIME in content.get("data", {}):
            self._kernel_truncated(content["data"][TRUNCATION_MIME])
        elif msg_type in _RICH_TYPES:
            self._before_output()
            output: Output = {
                "output_type": msg_type,
                "data": content.get("data", {}),
                "metadata": content.get("metadata", {}),
            }
            if msg_type == "execute_result":
                output["execution_count"] = content.get("execution_count")
            display_id = (content.get("transient") or {}).get("display_id")
            if display_id:
                self._displays.setdefault(display_id, []).append(output)
                self._display_of[id(output)] = display_id
            self._add(output)
        elif msg_type == "error":
            self._before_output()
            self._add(
                {
                    "output_type": "error",
                    "ename": content.get("ename", ""),
                    "evalue": content.get("evalue", ""),
                    "traceback": list(content.get("traceback", [])),
                }
            )
        elif msg_type == "update_display_data":
            display_id = (content.get("transient") or {}).get("display_id")
            for output in self._displays.get(display_id or "", []):
                output["data"] = content.get("data", {})
                output["metadata"] = content.get("metadata", {})
        elif msg_type == "clear_output":
            if content.get("wait"):
                self._clear_on_next = True
            else:
                self._clear()
        elif msg_type == "execute_input":
            self.execution_count = content.get("execution_count")

    def _kernel_truncated(self, note: dict[str, Any]) -> None:
        """The kernel's cap left output out here: stand a marker in its place."""
        dropped_bytes, dropped_outputs = int(note.get("bytes", 0)), int(note.get("outputs", 0))
        self.output_file = note.get("path") or self.output_file
        self.kernel_dropped_bytes += dropped_bytes
        self.kernel_dropped_outputs += dropped_outputs
        marker = truncation_marker("stdout", dropped_bytes, dropped_outputs, note.get("path"))
        self._add(marker)

    def add_output(self, output: Output) -> None:
        """Take an output that is already in nbformat shape."""
        if output["output_type"] == "stream":
            self._add_stream(output["name"], output["text"])
        else:
            self._add(dict(output))

    # -- results ----------------------------------------------------------

    @property
    def truncated(self) -> bool:
        return (
            self.total_dropped_bytes > 0 or self.dropped_outputs + self.kernel_dropped_outputs > 0
        )

    @property
    def total_dropped_bytes(self) -> int:
        """Bytes left out here and by the kernel's own cap."""
        return self.dropped_bytes + self.kernel_dropped_bytes

    def outputs(self) -> list[Output]:
        """The kept outputs in order, with a marker where output was dropped."""
        if not (self.dropped_bytes or self.dropped_outputs):
            return [*self._head, *self._tail]
        marker = truncation_marker(self._dropped_stream, self.dropped_bytes, self.dropped_outputs)
        return [*self._head, marker, *self._tail]

    # -- internals ----------------------------------------------------------

    def _before_output(self) -> None:
        if self._clear_on_next:
            self._clear()

    def _clear(self) -> None:
        self._head.clear()
        self._tail.clear()
        self._head_bytes = self._tail_bytes = 0
        self._head_full = False
        self.dropped_bytes = self.dropped_outputs = 0
        self.kernel_dropped_bytes = self.kernel_dropped_outputs = 0
        self._displays.clear()
        self._display_of.clear()
        self._clear_on_next = False

    def _add_stream(self, name: str, text: str) -> None:
        if not text:
            return
        if not self._head_full:
            room = self._head_budget - self._head_bytes
            size = _text_size(text)
            if size <= room:
                self._append_stream(self._head, name, text)
                self._head_bytes += size
                return
            # Split at a character boundary that fits (approximate for non-ASCII).
            cut = room if text.isascii() else len(text.encode()[:room].decode("utf-8", "ignore"))
            if cut:
                self._append_stream(self._head, name, text[:cut])
                self._head_bytes += _text_size(text[:cut])
            self._head_full = True
            text = text[cut:]
        self._append_stream(self._tail, name, text)
        self._tail_bytes += _text_size(text)
        self._trim_tail()

    @staticmethod
    def _append_stream(outputs: list[Output] | deque[Output], name: str, text: str) -> None:
        if outputs:
            last = outputs[-1]
            if last["output_type"] == "stream" and last["name"] == name:
                last["text"] += text
                return
        outputs.append({"output_type": "stream", "name": name, "text": text})

    def _add(self, output: Output) -> None:
        image = _image_size(output)
        if image:
            if image > self._image_left:
                self.dropped_outputs += 1
                self._forget_display(output)
                return
            self._image_left -= image
        size = _output_size(output)
        if not self._head_full and self._head_bytes + size <= self._head_budget:
            self._head.append(output)
            self._head_bytes += size
            return
        self._head_full = True
        self._tail.append(output)
        self._tail_bytes += size
        self._trim_tail()

    def _forget_display(self, output: Output) -> None:
        display_id = self._display_of.pop(id(output), None)
        if display_id is not None:
            kept = [o for o in self._displays.get(display_id, []) if o is not output]
            self._displays[display_id] = kept

    def _trim_tail(self) -> None:
        while self._tail_bytes > self._tail_budget and self._tail:
            first = self._tail[0]
            excess = self._tail_bytes - self._tail_budget
            if first["output_type"] == "stream" and len(self._tail) == 1:
                # A single huge stream: keep its end.
                text = first["text"]
                keep = text[excess:] if text.isascii() else text[-self._tail_budget :]
                dropped = _text_size(text) - _text_size(keep)
                first["text"] = keep
                self._tail_bytes -= dropped
                self.dropped_bytes += dropped
                self._dropped_stream = first["name"]
                break
            self._tail.popleft()
            self._forget_display(first)
            size = _output_size(first)
            self._tail_bytes -= size
            self.dropped_bytes += size
            if first["output_type"] == "stream":
                self._dropped_stream = first["name"]
            else:
                self.dropped_outputs += 1
