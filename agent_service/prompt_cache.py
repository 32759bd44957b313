"""The agent_system_prompt from kernel_mcp, cached with a TTL (cachetools).

One entry shared by all sessions. If kernel_mcp is unreachable the fallback
prompt from settings is used, logged, and not cached. `on_change` hears of every
change of what is served (replicas report it to each other).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cachetools import TTLCache

logger = logging.getLogger(__name__)

_KEY = "agent_system_prompt"


class PromptCache:
    """Fetches the prompt on a miss; counts hits and misses."""

    def __init__(self, fetch: Callable[[], Awaitable[str]], ttl: float, fallback: str) -> None:
        self._fetch = fetch
        self._ttl = ttl
        self._fallback = fallback
        self._cache: TTLCache[str, tuple[str, float]] = TTLCache(
            maxsize=1, ttl=ttl, timer=time.monotonic
        )
        self._lock = asyncio.Lock()
        self.hits = 0
        self.misses = 0
        self.fallbacks = 0
        self._in_use: str | None = None
        self.on_change: Callable[[], None] = lambda: None

    async def get(self) -> str:
        """The cached prompt, fetched on a miss; the fallback if kernel_mcp is down."""
        entry = self._cache.get(_KEY)
        if entry is not None:
            self.hits += 1
            return entry[0]
        async with self._lock:
            entry = self._cache.get(_KEY)
            if entry is not None:  # fetched while we waited
                self.hits += 1
                return entry[0]
            self.misses += 1
            try:
                prompt = await self._fetch()
            except Exception as exc:
                self.fallbacks += 1
                logger.warning("agent_system_prompt unavailable, using the fallback: %s", exc)
                self._in_use = self._fallback
                self.on_change()
                return self._fallback
            self._cache[_KEY] = (prompt, time.monotonic())
            self._in_use = prompt
            self.on_change()
            return prompt

    def clear(self) -> None:
        """Drop the cached prompt: the next turn fetches it again."""
        self._cache.clear()
        self.on_change()

    def stats(self) -> dict[str, Any]:
        entry = self._cache.get(_KEY)
        in_use = entry[0] if entry is not None else self._in_use
        return {
            "hits": self.hits,
            "misses": self.misses,
            "fallbacks": self.fallbacks,
            "cached": entry is not None,
            "age_seconds": round(time.monotonic() - entry[1], 3) if entry else None,
            "ttl_seconds": self._ttl,
            "prompt_hash": hashlib.sha256(in_use.encode()).hexdigest()[:8] if in_use else None,
            "source": "fallback"
            if in_use == self._fallback
            else ("kernel_mcp" if in_use else None),
        }
