"""A session's title: a short readable line taken from its first prompt or code."""

from __future__ import annotations

import re

MAX_TITLE_CHARS = 60

_FENCE = re.compile(r"^\s*(```|~~~)")
_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
# Emphasis marks only at word edges: snake_case names and **kwargs keep theirs.
_EMPHASIS = re.compile(r"(?<![\w*_~])(\*\*|\*|__|_|~~)(?=[^\s*_~])(.+?)(?<=[^\s*_~])\1(?![\w*_~])")
_CODE = re.compile(r"`+([^`]*)`+")
_TAG = re.compile(r"</?[A-Za-z][^>]*>")
_LEAD = re.compile(r"^\s*(?:#{1,6}\s+|>\s*|[-*+]\s+|\d+[.)]\s+)+")


def _plain(line: str) -> str:
    """A line of markdown without its markup."""
    line = _LEAD.sub("", line)
    line = _IMAGE.sub(r"\1", line)
    line = _LINK.sub(r"\1", line)
    line = _CODE.sub(r"\1", line)
    line = _EMPHASIS.sub(r"\2", line)
    line = _TAG.sub("", line)
    return " ".join(line.split())


def session_title(text: str, *, markdown: bool = True, limit: int = MAX_TITLE_CHARS) -> str:
    """The first non-empty line of `text`, cut at a word past `limit` characters.

    For a prompt (`markdown`), code fence lines are skipped (the code inside them counts as
    text) and markup is removed; code is taken as it is. Empty: nothing to name it by.
    """
    for raw in text.splitlines():
        if markdown and _FENCE.match(raw):
            continue
        line = _plain(raw) if markdown else " ".join(raw.split())
        if not line:
            continue
        if len(line) <= limit:
            return line
        cut = line[: limit + 1].rsplit(" ", 1)[0] if " " in line[: limit + 1] else ""
        if len(cut) < limit // 2:  # one long word: cut inside it
            cut = line[:limit]
        return cut.rstrip(" ,.;:-") + "…"
    return ""
