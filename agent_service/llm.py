"""The model adapter: the only module that imports litellm.

litellm is imported lazily (it takes seconds) with its network look-ups off, so
start-up never waits on the network. Provider failures become `ProviderError`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from .config import Settings
from .errors import ProviderError

logger = logging.getLogger(__name__)

_import_lock = threading.Lock()
_module: ModuleType | None = None


def load_litellm() -> ModuleType:
    """Import litellm once, offline: no cost-map download, no tokenizer fetches."""
    global _module
    with _import_lock:
        if _module is None:
            os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            import litellm

            litellm.suppress_debug_info = True
            litellm.telemetry = False
            logging.getLogger("LiteLLM").setLevel(logging.WARNING)
            _module = litellm
    return _module


@dataclass
class TextDelta:
    text: str


@dataclass
class ToolCallRequest:
    id: str
    name: str
    arguments: str


@dataclass
class ModelReply:
    """The end of one model call: everything it said, reassembled."""

    text: str
    tool_calls: list[ToolCallRequest] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)


def _usage(raw: Any) -> dict[str, int]:
    if raw is None:
        return {}
    keys = ("prompt_tokens", "completion_tokens", "total_tokens")
    return {k: int(getattr(raw, k, 0) or 0) for k in keys}


def _provider_error(exc: Exception) -> ProviderError:
    """Translate a litellm (or underlying openai/httpx) failure, once, at this boundary."""
    litellm = load_litellm()
    status = getattr(exc, "status_code", None)
    message = str(getattr(exc, "message", None) or exc).strip() or type(exc).__name__
    if isinstance(exc, litellm.RateLimitError) or status == 429:
        return ProviderError(
            f"The model provider is rate limiting requests: {message}",
            status=429,
            code="rate_limit_exceeded",
        )
    timeouts = (litellm.Timeout, TimeoutError)
    if isinstance(exc, timeouts) or isinstance(exc.__cause__, timeouts) or status == 408:
        return ProviderError(
            f"The model provider did not answer in time: {message}",
            status=504,
            code="provider_timeout",
        )
    if isinstance(exc, litellm.AuthenticationError) or status in (401, 403):
        return ProviderError(
            f"The model provider rejected the credentials (set AGENT_API_KEY): {message}",
            code="provider_auth_failed",
        )
    return ProviderError(f"The model provider failed: {message}")


class ModelAdapter:
    """Streams chat completions with tools from any litellm model."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    async def warm_up(self) -> None:
        """Import litellm in a thread, so the first request does not pay for it."""
        await asyncio.to_thread(load_litellm)

    async def stream(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
    ) -> AsyncIterator[TextDelta | ModelReply]:
        """Yield text deltas as they arrive, then one ModelReply."""
        settings = self._settings
        litellm = await asyncio.to_thread(load_litellm) if _module is None else _module
        kwargs: dict[str, Any] = {
            "model": settings.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "timeout": settings.llm_timeout,
            "num_retries": settings.llm_retries,
        }
        if tools:
            kwargs["tools"] = tools
        if settings.api_base:
            kwargs["api_base"] = settings.api_base
        if settings.api_key is not None:
            kwargs["api_key"] = settings.api_key.get_secret_value()
        if settings.temperature is not None:
            kwargs["temperature"] = settings.temperature
        text: list[str] = []
        calls: dict[int, dict[str, str]] = {}
        finish: str | None = None
        usage: dict[str, int] = {}
        try:
            response = await litellm.acompletion(**kwargs)
            async for chunk in response:
                if getattr(chunk, "usage", None):
                    usage = _usage(chunk.usage) or usage
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                delta = choice.delta
                if delta.content:
                    text.append(delta.content)
                    yield TextDelta(delta.content)
                for piece in delta.tool_calls or []:
                    call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
                    if piece.id:
                        call["id"] = piece.id
                    if piece.function is not None:
                        call["name"] += piece.function.name or ""
                        call["arguments"] += piece.function.arguments or ""
                if choice.finish_reason:
                    finish = choice.finish_reason
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            error = _provider_error(exc)
            logger.warning("model call failed (%s): %s", type(exc).__name__, error.message)
            error.partial_text = "".join(text)  # type: ignore[attr-defined]
            raise error from exc
        tool_calls = [
            ToolCallRequest(
                id=c["id"] or f"call_{i}", name=c["name"], arguments=c["arguments"] or "{}"
            )
            for i, c in sorted(calls.items())
        ]
        yield ModelReply("".join(text), tool_calls, finish, usage)
