"""Reading a chat completion stream (the openai SDK's) up to an event."""

from __future__ import annotations

from typing import Any

LONG_CELL = "x = 41\nimport time\nprint('sleeping', 'now', flush=True)\ntime.sleep(600)"
"""A cell that runs until stopped; its output "sleeping now" (not in its code, which the
stream also carries) says it has begun."""


async def read_until(stream: Any, text: str, content: str = "") -> str:
    """Read `stream`'s content until `text` has arrived; returns the content so far."""
    async for chunk in stream:
        content += "".join(c.delta.content or "" for c in chunk.choices)
        if text in content:
            return content
    raise AssertionError(f"the stream ended without {text!r}: {content}")


async def read_all(stream: Any, content: str = "") -> str:
    """Read the rest of `stream`'s content; returns all of it."""
    async for chunk in stream:
        content += "".join(c.delta.content or "" for c in chunk.choices)
    return content
