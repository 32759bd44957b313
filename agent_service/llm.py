"""The model adapter: the only module that imports litellm.

litellm is imported in the background at start-up (it takes seconds) with its
network look-ups off, so start-up never waits on the network and the first user
does not wait for the import. Every litellm call runs on an event loop of its own,
in a thread: litellm does synchronous work per call (request transformation, its
logging payloads) that takes most of a second for a request of thousands of
messages, and on the service's loop that would stall every other client. Token
counts come from litellm's offline counter. Provider failures become `ProviderError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, TypeVar

from .config import Settings
from .errors import ProviderError

logger = logging.getLogger(__name__)

_import_lock = threading.Lock()
_module: ModuleType | None = None
DEFAULT_MAX_INPUT_TOKENS = 128_000


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


T = TypeVar("T")
_END = object()


class _ModelLoop:
    """The event loop, in a daemon thread, where every litellm call runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    def get(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="litellm-loop", daemon=True).start()
                self._loop = loop
            return self._loop


_MODEL_LOOP = _ModelLoop()


async def _on_model_loop(items: Callable[[], AsyncIterator[T]]) -> AsyncIterator[T]:
    """Iterate `items()` on the model loop; its items (and its exception) arrive here."""
    caller = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[Any, BaseException | None]] = asyncio.Queue()

    def deliver(item: Any, error: BaseException | None = None) -> None:
        with contextlib.suppress(RuntimeError):  # the caller's loop is gone: nobody listens
            caller.call_soon_threadsafe(queue.put_nowait, (item, error))

    async def pump() -> None:
        try:
            async for item in items():
                deliver(item)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            deliver(_END, exc)
        else:
            deliver(_END)

    future = asyncio.run_coroutine_threadsafe(pump(), _MODEL_LOOP.get())
    try:
        while True:
            item, error = await queue.get()
            if item is _END:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        future.cancel()  # the caller stopped listening: stop the call too


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


@dataclass(frozen=True)
class ModelParams:
    """Sampling parameters a request may set, passed to the provider when set."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None

    def kwargs(self, settings: Settings) -> dict[str, Any]:
        """litellm keyword arguments; AGENT_MAX_TOKENS caps what the request asks."""
        values: dict[str, Any] = {}
        caps = [t for t in (self.max_tokens, settings.max_tokens) if t is not None]
        if caps:
            values["max_tokens"] = min(caps)
        temperature = self.temperature if self.temperature is not None else settings.temperature
        if temperature is not None:
            values["temperature"] = temperature
        for name in ("top_p", "stop", "seed"):
            value = getattr(self, name)
            if value is not None:
                values[name] = value
        return values


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
    if isinstance(exc, litellm.ContextWindowExceededError):
        return ProviderError(
            f"The request exceeds the model's context window (lower AGENT_MAX_INPUT_TOKENS): "
            f"{message}",
            code="context_length_exceeded",
        )
    return ProviderError(f"The model provider failed: {message}")


class ModelAdapter:
    """Streams chat completions with tools from any litellm model; counts tokens."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.warm = False

    async def warm_up(self) -> None:
        """Import litellm and load the default model's tokenizer, in a thread."""
        try:
            await asyncio.to_thread(self._warm)
        except Exception:
            logger.exception("warming up the model adapter failed; the first turn will retry")
            return
        self.warm = True
        logger.info("litellm loaded: the service is warm")

    async def ready(self) -> None:
        """Wait for litellm's import off the event loop (a no-op once it is loaded).

        Counting tokens or calling the model imports litellm; done inline, the event loop
        would wait seconds on the start-up import's lock.
        """
        if _module is None:
            await asyncio.to_thread(load_litellm)

    def _warm(self) -> None:
        load_litellm()
        if self._settings.model:
            self.count_tokens(self._settings.model, [{"role": "user", "content": "warm"}])
            self.max_input_tokens(self._settings.model)

    def _base_kwargs(self, model: str) -> dict[str, Any]:
        settings = self._settings
        kwargs: dict[str, Any] = {
            "model": model,
            "timeout": settings.llm_timeout,
            "num_retries": settings.llm_retries,
        }
        if settings.api_base:
            kwargs["api_base"] = settings.api_base
        if settings.api_key is not None:
            kwargs["api_key"] = settings.api_key.get_secret_value()
        return kwargs

    async def stream(
        self,
        model: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        params: ModelParams | None = None,
    ) -> AsyncIterator[TextDelta | ModelReply]:
        """Yield text deltas as they arrive, then one ModelReply."""
        await self.ready()
        async for item in _on_model_loop(lambda: self._stream(model, messages, tools, params)):
            yield item

    async def _stream(
        self,
        model: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        params: ModelParams | None,
    ) -> AsyncIterator[TextDelta | ModelReply]:
        litellm = load_litellm()
        kwargs = self._base_kwargs(model)
        kwargs.update(messages=messages, stream=True, stream_options={"include_usage": True})
        kwargs.update((params or ModelParams()).kwargs(self._settings))
        if tools:
            kwargs["tools"] = tools
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

    async def complete(
        self, model: str, messages: list[dict[str, Any]], params: ModelParams | None = None
    ) -> ModelReply:
        """One plain completion, no tools (requests that are not turns of a conversation)."""
        reply: ModelReply | None = None
        async for item in self.stream(model, messages, [], params):
            if isinstance(item, ModelReply):
                reply = item
        assert reply is not None
        return reply

    # -- tokens -----------------------------------------------------------------------

    def count_tokens(
        self,
        model: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
    ) -> int:
        """litellm's offline count for a request (CPU-bound: call from a thread when large).

        A model whose tokenizer cannot load offline is counted with litellm's default one.
        """
        litellm = load_litellm()
        try:
            return int(litellm.token_counter(model=model, messages=messages, tools=tools))
        except Exception as exc:  # a tokenizer litellm would have to download
            logger.debug("no offline tokenizer for %s (%s); using the default", model, exc)
            return int(litellm.token_counter(model="", messages=messages, tools=tools))

    def max_input_tokens(self, model: str) -> int:
        """The token budget of one request to `model`."""
        if self._settings.max_input_tokens is not None:
            return self._settings.max_input_tokens
        return _known_max_input_tokens(model)

    def tools_tokens(self, model: str, system: list[dict[str, Any]], tools: list[Any]) -> int:
        """What the fixed part of a request costs (system messages and tool definitions)."""
        return _fixed_cost(self, model, json.dumps(system), json.dumps(tools))


@functools.lru_cache(maxsize=64)
def _known_max_input_tokens(model: str) -> int:
    litellm = load_litellm()
    try:
        info = litellm.get_model_info(model)
    except Exception:
        return DEFAULT_MAX_INPUT_TOKENS
    value = info.get("max_input_tokens") or info.get("max_tokens")
    return int(value) if value else DEFAULT_MAX_INPUT_TOKENS


@functools.lru_cache(maxsize=32)
def _fixed_cost(adapter: ModelAdapter, model: str, system: str, tools: str) -> int:
    return adapter.count_tokens(model, json.loads(system), json.loads(tools) or None)
