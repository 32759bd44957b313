"""The tool loop: one turn of a conversation, from the user's message to the answer.

Each model call streams; its text goes to the client at once. Tool calls run on
the session's kernel through MCP, their activity rendered as content, and their
results go back to the model. Every step is appended to the transcript as it
happens (a tool's live output too), so a failure anywhere, even a killed process,
leaves a transcript that says what is known. Each model request is fitted to the
token budget (`context`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .config import Settings
from .context import (
    ContextTooSmall,
    Counter,
    History,
    Item,
    Message,
    TurnItems,
    assistant_message,
    fit,
    make_item,
    message_size,
    read_history,
    service_note,
    tool_item,
)
from .conversation import extend_digest
from .errors import ContextTooLarge, KernelServiceError, ProviderError, ServiceError
from .exporter import NotebookExporter
from .files import KernelFiles, SavedFile, SessionFile, size_text, upload_note
from .kernel_client import KernelClient, KernelSession, ProgressHandler, ToolOutcome
from .llm import ModelAdapter, ModelParams, ModelReply, TextDelta, ToolCallRequest
from .prompt_cache import PromptCache
from .render import ContentRenderer, ImageUrl
from .store import TranscriptStore

logger = logging.getLogger(__name__)

T = TypeVar("T")

_NO_KERNEL = (
    "The kernel service is unreachable right now, so no code can run this turn. Answer "
    "without computing, and tell the user that computation is unavailable if they need it."
)
UNAVAILABLE = (
    "Computation is unavailable: the kernel service cannot be reached, so no code can run "
    "in this turn. The answer below comes from the model alone."
)
_KERNEL_CHANGED = (
    "The session's kernel was replaced since the last turn (the kernel service restarted, or "
    "the kernel was shut down or culled): variables, imports and other state from earlier "
    "turns are gone; files in the session folder remain."
)
_KERNEL_CHANGED_FOR_MODEL = (
    "The session's kernel was replaced since the previous turn (the kernel service restarted, "
    "or the kernel was shut down or culled). Every variable, import and function defined "
    "earlier is gone; files in the session folder remain. Re-create what you need before "
    "using it."
)
_SHUT_DOWN = (
    "[interrupted: the service shut down while this call was running; the kernel was asked "
    "to stop it, and may hold part of its effects.{seen}]"
)
STOPPED = "Stopped: you stopped this turn. The kernel keeps its variables."
_STOPPED_FOR_MODEL = (
    "The user stopped the previous turn while it ran; code that was running got a "
    "KeyboardInterrupt and the kernel kept its variables. Do not resume that work unless asked."
)
_NOT_RUN = "[not executed: the user stopped the turn before this call ran]"
_STOP_INTERRUPTS = 3
"""Interrupts a stopped tool call gets (one may reach the kernel before the code starts)."""
_BUDGET_MARGIN = 0.02
"""Share of the input budget kept free: provider tokenizers may count a little more."""
_COUNT_INLINE_CHARS = 20_000
"""Messages larger than this are counted in a thread, off the event loop."""
_LIVE_KEPT_CHARS = 100_000
_CACHED_SESSIONS = 32
"""Sessions whose model-ready history is kept in memory between turns."""
_NOTED_SESSIONS = 4096
"""Sessions remembered as noted outside a turn (see `Agent.add_note`)."""
_WRITING_TOOLS = frozenset({"execute_code", "write_file"})
"""Tools that can write files: the session folder is listed before the first one runs."""


@dataclass(frozen=True)
class _FileState:
    """A listing of the session folder: its visible files (path: size, modified), and where
    a listing cut short at its entry limit stopped (None: it is complete)."""

    files: dict[str, tuple[int, str]]
    cut: tuple[str, ...] | None

    def covers(self, path: str) -> bool:
        """Whether this listing saw `path`'s place: a file past the cut may be old."""
        return self.cut is None or _walk_key(path) <= self.cut


def _walk_key(path: str) -> tuple[str, ...]:
    """A path's place in kernel_mcp's listing order (depth first, names sorted)."""
    return tuple(path.split("/"))


def _shown(entry: SessionFile) -> bool:
    """Files a turn reports: not symlinks, nothing hidden (`.outputs/`, dot files)."""
    return entry.type == "file" and not any(p.startswith(".") for p in entry.path.split("/"))


def _link_text(path: str) -> str:
    """A path as markdown link text ([ and ] escaped)."""
    return path.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]")


@dataclass
class Content:
    text: str


@dataclass
class Finished:
    finish_reason: str
    usage: dict[str, int] = field(default_factory=dict)


@dataclass
class Failed:
    error: ServiceError


TurnEvent = Content | Finished | Failed
Emit = Callable[[TurnEvent], None]


@dataclass
class TurnSpec:
    """What one request asks for."""

    session_id: str
    user_content: str
    render_mode: str
    image_url: ImageUrl
    model: str
    params: ModelParams = field(default_factory=ModelParams)
    file_url: Callable[[str], str] | None = None
    """Maps a session file's path to its download link (None: files written go unlisted)."""
    attachments: list[SavedFile] = field(default_factory=list)
    """Files the user message carried, saved in the session folder before the turn."""
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the user asks the turn to stop."""


async def _until_set(items: AsyncIterator[T], stop: asyncio.Event) -> AsyncGenerator[T, None]:
    """The items of `items` until `stop` is set; then `items` is closed (a model call behind
    it is cancelled)."""
    stopping = asyncio.ensure_future(stop.wait())
    step: asyncio.Future[T] | None = None
    try:
        while True:
            step = asyncio.ensure_future(anext(items))
            await asyncio.wait({step, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                return
            try:
                item = step.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        stopping.cancel()
        if step is not None and not step.done():
            step.cancel()
            await asyncio.wait({step})
        close = getattr(items, "aclose", None)
        if close is not None:
            await close()


def kernel_identity(info: dict[str, Any] | None) -> str | None:
    """Which kernel incarnation `kernel_info` names: the one place that knows where it comes from.

    kernel_mcp's `incarnation` changes whenever the process holding the state is replaced
    (restart, death, culling, a new kernel_mcp), on a gateway too, where kernels have no pid
    and a restart keeps the kernel id.
    """
    if info and info.get("running") is False:
        return NO_KERNEL
    if not info or not info.get("incarnation"):
        return None
    return str(info["incarnation"])


NO_KERNEL = "none"
"""The identity of a session kernel_mcp has no kernel for (restarted, culled): state is gone."""


def _model_text(outcome: ToolOutcome) -> str:
    return outcome.text.replace("image shown below]", "image shown to the user]")


def _restarted(name: str, outcome: ToolOutcome) -> bool:
    """Whether the tool result says the kernel was replaced (kernel_mcp reports it itself)."""
    structured = outcome.structured or {}
    return name == "restart_kernel" or bool(
        structured.get("kernel_restarted") or structured.get("state_lost")
    )


@dataclass
class _CachedHistory:
    """A session's older turns as the model sees them, ready for its next turn."""

    last_turn: int
    limit: int
    history: History
    version: int
    """The session's `last_event` when kept: another value means someone else wrote since."""


class _Turn:
    """The state of one running turn."""

    def __init__(
        self, spec: TurnSpec, turn: int, emit: Emit, counter: Counter, version: int = 0
    ) -> None:
        self.spec = spec
        self.sid = spec.session_id
        self.turn = turn
        self.version = version  # the session's last_event before this turn
        self.renderer = ContentRenderer(spec.render_mode, spec.image_url)
        self.count = counter
        self.current: list[Item] = []
        self.sent: list[str] = []
        self.files_listed = False
        self.files_before: _FileState | None = None
        """The session folder before the turn's first tool that can write; None when it was
        not listed (no such tool ran, or listing failed)."""
        self._emit = emit

    def say(self, text: str) -> None:
        if text:
            self.sent.append(text)
            self._emit(Content(text))


class Agent:
    """Runs turns; owns nothing but references to the shared services."""

    def __init__(
        self,
        settings: Settings,
        store: TranscriptStore,
        kernels: KernelClient,
        prompts: PromptCache,
        model: ModelAdapter,
        exporter: NotebookExporter,
        files: KernelFiles | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.kernels = kernels
        self.prompts = prompts
        self.model = model
        self.exporter = exporter
        self.files = files
        self._histories: OrderedDict[str, _CachedHistory] = OrderedDict()
        self._cached_model: dict[str, str] = {}
        self._noted: set[str] = set()
        """Sessions given a note outside a turn since their turn began: keep no history."""

    def forget(self, session_id: str) -> None:
        """Drop what is kept in memory of a session (it was deleted or changed elsewhere)."""
        self._histories.pop(session_id, None)
        self._cached_model.pop(session_id, None)

    def add_note(self, session_id: str, data: dict[str, Any]) -> None:
        """Append a note outside any turn (e.g. files uploaded); `for_model` reaches the model.

        It joins the session's latest turn, so the next turn's history carries it. A turn
        running meanwhile keeps no history for later: the next one reads the store again.
        """
        record = self.store.get_session(session_id)
        self.store.append(session_id, record.last_turn if record else 0, "note", data)
        if len(self._noted) >= _NOTED_SESSIONS:  # bounded: forgetting all kept history is safe
            self._noted.clear()
            self._histories.clear()
            self._cached_model.clear()
        self._noted.add(session_id)
        self.forget(session_id)
        self.exporter.schedule(session_id)

    def counter(self, model: str) -> Counter:
        return functools.partial(self.model.count_tokens, model)

    async def _item(self, message: Message, short: Message | None, count: Counter) -> Item:
        if message_size(message) > _COUNT_INLINE_CHARS:
            return await asyncio.to_thread(make_item, message, short, count)
        return make_item(message, short, count)

    async def _tool_item(self, call_id: str, text: str, count: Counter) -> Item:
        if len(text) > _COUNT_INLINE_CHARS:
            return await asyncio.to_thread(tool_item, call_id, text, count)
        return tool_item(call_id, text, count)

    def _append(self, t: _Turn, type_: str, data: dict[str, Any], item: Item | None) -> int:
        event_id = self.store.append(
            t.sid,
            t.turn,
            type_,
            data,
            tokens=item.tokens if item else None,
            tokens_short=item.tokens_short if item else None,
        )
        if item is not None:
            item.event_id = event_id
            t.current.append(item)
        return event_id

    async def run_turn(self, spec: TurnSpec, emit: Emit) -> None:
        """Run one turn to its end, emitting content; never raises for expected faults."""
        sid = spec.session_id
        await self.model.ready()
        self._noted.discard(sid)
        record = self.store.get_session(sid)
        t = _Turn(
            spec,
            (record.last_turn if record else 0) + 1,
            emit,
            self.counter(spec.model),
            record.last_event if record else 0,
        )
        user = {"role": "user", "content": spec.user_content}
        user_item = await self._item(user, None, t.count)
        self._append(t, "user", {"content": spec.user_content}, user_item)
        if spec.attachments:
            attached = upload_note(spec.attachments, attached=True)
            told = {"role": "user", "content": service_note(attached["for_model"])}
            self._append(t, "note", attached, await self._item(told, None, t.count))
            t.say(t.renderer.note(attached["text"]))
        usage: dict[str, int] = {}
        final: TurnEvent | None = None
        try:
            system: list[Message] = [{"role": "system", "content": await self.prompts.get()}]
            if record is not None and record.client_system:
                system.append({"role": "system", "content": record.client_system})
            async with contextlib.AsyncExitStack() as stack:
                try:
                    kernel = await stack.enter_async_context(self.kernels.session(sid))
                    tools = await kernel.openai_tools()
                except KernelServiceError as exc:
                    # Still answer, without tools, and say plainly that nothing can run.
                    logger.warning("session %s: no kernel tools this turn: %s", sid, exc)
                    kernel, tools = None, []
                    system.append({"role": "system", "content": _NO_KERNEL})
                    note = {"kind": "kernel_unavailable", "text": UNAVAILABLE}
                    self._append(t, "note", note, None)
                    t.say(t.renderer.note(UNAVAILABLE))
                if kernel is not None:
                    await self._check_kernel(t, kernel)
                budget = self._budget(spec.model)
                fixed = await asyncio.to_thread(self.model.tools_tokens, spec.model, system, tools)
                history = await self._history(t, budget - fixed)
                for _ in range(self.settings.max_tool_rounds):
                    messages = self._request(t, system, history, fixed, budget)
                    reply = await self._model_round(t, messages, tools)
                    if reply is None:  # stopped while the model was writing
                        await self._stopped(t)
                        await self._report_files(t)
                        final = Finished("stop", usage)
                        return
                    for key, value in reply.usage.items():
                        usage[key] = usage.get(key, 0) + value
                    if not reply.tool_calls or kernel is None:
                        await self._report_files(t)
                        final = Finished(reply.finish_reason or "stop", usage)
                        return
                    for call in reply.tool_calls:
                        if spec.stop.is_set():
                            outcome = ToolOutcome(_NOT_RUN, is_error=True)
                            await self._record_tool(t, call, {}, outcome)
                        else:
                            await self._run_tool(t, call, kernel)
                    if spec.stop.is_set():
                        await self._stopped(t)
                        await self._report_files(t)
                        final = Finished("stop", usage)
                        return
            closing = (
                f"I stopped after {self.settings.max_tool_rounds} rounds of tool calls without "
                "reaching a final answer. Ask me to continue, or narrow the task."
            )
            closing_item = await self._item(assistant_message(closing, []), None, t.count)
            self._append(t, "assistant", {"content": closing, "notice": True}, closing_item)
            t.say(t.renderer.text(f"\n\n{closing}"))
            await self._report_files(t)
            final = Finished("stop", usage)
        except ServiceError as exc:
            self.store.append(sid, t.turn, "error", {"message": exc.message, "code": exc.code})
            final = Failed(exc)
        except asyncio.CancelledError:
            message = "The service shut down during this turn."
            self.store.append(sid, t.turn, "error", {"message": message, "code": "shutdown"})
            raise
        except Exception:
            logger.exception("session %s: turn %d failed", sid, t.turn)
            error = ServiceError("The agent failed unexpectedly; the transcript is kept.")
            self.store.append(sid, t.turn, "error", {"message": error.message, "code": None})
            final = Failed(error)
        finally:
            if isinstance(final, Finished):
                self._extend_digest(sid, spec.user_content, "".join(t.sent))
                self._keep_history(t)
            else:
                self.forget(sid)
            self.exporter.schedule(sid)
            if final is not None:
                emit(final)

    async def _stopped(self, t: _Turn) -> None:
        """End a turn the user stopped: say so, and tell the model next turn."""
        logger.info("session %s: turn %d stopped by the user", t.sid, t.turn)
        message = {"role": "user", "content": service_note(_STOPPED_FOR_MODEL)}
        data = {"kind": "stopped", "text": STOPPED, "for_model": _STOPPED_FOR_MODEL}
        self._append(t, "note", data, await self._item(message, None, t.count))
        t.say(t.renderer.note(STOPPED))

    async def _call_until_stopped(
        self,
        sid: str,
        kernel: KernelSession,
        stop: asyncio.Event,
        name: str,
        arguments: dict[str, Any],
        on_output: ProgressHandler | None = None,
    ) -> ToolOutcome:
        """A tool call that the kernel is interrupted out of when `stop` is set.

        The call itself goes on to its end (a KeyboardInterrupt result), so the kernel and its
        variables stay; an interrupt that reaches the kernel before the code begins is lost,
        hence a few, each given `stop_wait` seconds.
        """
        call = asyncio.ensure_future(kernel.call(name, arguments, on_output))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({call, stopping}, return_when=asyncio.FIRST_COMPLETED)
            for _ in range(_STOP_INTERRUPTS):
                if call.done():
                    break
                logger.info("session %s: stop asked; interrupting the kernel", sid)
                interrupt = await kernel.call("interrupt_kernel", {}, allow_hidden=True)
                if interrupt.is_error:
                    logger.warning("session %s: interrupt failed: %s", sid, interrupt.text)
                await asyncio.wait({call}, timeout=self.settings.stop_wait)
            return await call
        finally:
            stopping.cancel()
            if not call.done():  # we were cancelled (the service shuts down): so is the call
                call.cancel()
                await asyncio.wait({call})

    def _extend_digest(self, sid: str, user: str, reply: str) -> None:
        """Let a client that sends the whole history continue this session without an id."""
        record = self.store.get_session(sid)
        if record is not None:
            digest = extend_digest(extend_digest(record.digest, "user", user), "assistant", reply)
            self.store.update_session(sid, digest=digest)

    def _budget(self, model: str) -> int:
        limit = self.model.max_input_tokens(model)
        return limit - max(16, int(limit * _BUDGET_MARGIN))

    async def _history(self, t: _Turn, limit: int) -> History:
        """Older turns as far as they can fit: kept from the last turn, else read newest first.

        Kept only while the store agrees nothing happened in between (the session's version,
        read under the turn's lock, is the one kept: no other replica wrote), and for the same
        model's counts.
        """
        cached = self._histories.get(t.sid)
        if (
            cached is not None
            and cached.last_turn == t.turn - 1
            and cached.version == t.version
            and (cached.limit >= limit or cached.history.complete)
            and self._cached_model.get(t.sid) == t.spec.model
        ):
            self._histories.move_to_end(t.sid)
            return cached.history

        def read() -> History:
            history = read_history(self.store.newest_events(t.sid, t.turn), t.count, limit)
            self.store.set_tokens(history.counted)
            return history

        history = await asyncio.to_thread(read)
        self._histories[t.sid] = _CachedHistory(t.turn - 1, limit, history, t.version)
        self._cached_model[t.sid] = t.spec.model
        while len(self._histories) > _CACHED_SESSIONS:
            evicted, _ = self._histories.popitem(last=False)
            self._cached_model.pop(evicted, None)
        return history

    def _keep_history(self, t: _Turn) -> None:
        """Add the finished turn to the kept history, dropping what no longer fits."""
        cached = self._histories.get(t.sid)
        if (
            cached is None
            or cached.last_turn != t.turn - 1
            or t.sid in self._noted
            or self._uploaded_in(t.sid, t.turn)  # a note this turn's items lack (any replica)
        ):
            self._noted.discard(t.sid)
            self.forget(t.sid)
            return
        turns = [TurnItems(t.turn, list(t.current)), *cached.history.turns]
        kept, spent = [], 0
        for turn in turns:
            spent += turn.tokens_short
            if spent > cached.limit:
                break
            kept.append(turn)
        complete = cached.history.complete and len(kept) == len(turns)
        record = self.store.get_session(t.sid)  # still under the turn's lock: ours alone
        if record is None:
            self.forget(t.sid)
            return
        self._histories[t.sid] = _CachedHistory(
            t.turn, cached.limit, History(kept, complete), record.last_event
        )

    def _request(
        self,
        t: _Turn,
        system: list[Message],
        history: History,
        fixed: int,
        budget: int,
    ) -> list[Message]:
        try:
            window = fit(history, t.current, fixed, budget)
        except ContextTooSmall as exc:
            raise ContextTooLarge(
                f"This turn needs about {exc.needed:,} tokens, more than the model's input "
                f"budget of {exc.budget:,} (AGENT_MAX_INPUT_TOKENS): send a shorter message."
            ) from exc
        note = [{"role": "system", "content": window.note}] if window.note else []
        return [*system, *note, *window.messages]

    async def _check_kernel(self, t: _Turn, kernel: Any) -> None:
        """Tell the model and the user when the kernel is not the one of earlier turns."""
        record = self.store.get_session(t.sid)
        known = record.kernel_identity if record else None
        if known is None:
            return
        now = await self._identity(kernel)
        if now is None or now == known:
            return
        if ":" in known and now != NO_KERNEL:
            # Recorded by a version before incarnations ("kernel_id:pid"): not comparable.
            self.store.update_session(t.sid, kernel_identity=now)
            return
        logger.info("session %s: kernel changed (%s -> %s)", t.sid, known, now)
        # No kernel yet: the one this turn starts is recorded once it runs.
        self.store.update_session(t.sid, kernel_identity=None if now == NO_KERNEL else now)
        message = {"role": "user", "content": service_note(_KERNEL_CHANGED_FOR_MODEL)}
        data = {
            "kind": "kernel_changed",
            "text": _KERNEL_CHANGED,
            "for_model": _KERNEL_CHANGED_FOR_MODEL,
            "previous": known,
            "current": now,
        }
        self._append(t, "note", data, await self._item(message, None, t.count))
        t.say(t.renderer.note(_KERNEL_CHANGED))

    async def _identity(self, kernel: Any) -> str | None:
        # A read: a chat-only session must not get a kernel from it.
        info = await kernel.call("kernel_info", {"start": False})
        return None if info.is_error else kernel_identity(info.structured)

    async def _model_round(
        self, t: _Turn, messages: list[Message], tools: list[dict[str, Any]]
    ) -> ModelReply | None:
        """One model call streamed to the user; None when the user stopped the turn meanwhile
        (the call is cut, what the model wrote is kept as a partial answer)."""
        reply: ModelReply | None = None
        written: list[str] = []
        stream = self.model.stream(t.spec.model, messages, tools, t.spec.params)
        try:
            async with contextlib.aclosing(_until_set(stream, t.spec.stop)) as items:
                async for item in items:
                    if isinstance(item, TextDelta):
                        written.append(item.text)
                        t.say(t.renderer.text(item.text))
                    else:
                        reply = item
        except ProviderError as exc:
            partial = getattr(exc, "partial_text", "")
            if partial:
                self.store.append(t.sid, t.turn, "assistant", {"content": partial, "partial": True})
            raise
        if reply is None and t.spec.stop.is_set():
            text = "".join(written)
            if text:
                said = await self._item(assistant_message(text, []), None, t.count)
                self._append(t, "assistant", {"content": text, "partial": True}, said)
            return None
        assert reply is not None
        calls = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in reply.tool_calls]
        said = await self._item(assistant_message(reply.text, calls), None, t.count)
        self._append(t, "assistant", {"content": reply.text, "tool_calls": calls}, said)
        return reply

    async def _run_tool(self, t: _Turn, call: ToolCallRequest, kernel: Any) -> None:
        try:
            arguments = json.loads(call.arguments or "{}")
            if not isinstance(arguments, dict):
                raise ValueError("arguments must be a JSON object")
        except ValueError as exc:
            outcome = ToolOutcome(
                text=f"Your arguments for {call.name} were not valid JSON ({exc}); "
                "call the tool again with a JSON object.",
                is_error=True,
            )
            event_id = await self._record_tool(t, call, {}, outcome)
            t.say(t.renderer.tool_end(call.name, {}, outcome, event_id))
            return
        if call.name in _WRITING_TOOLS and not t.files_listed:
            t.files_listed = True
            t.files_before = await self._file_state(t.sid)
        started = {"call_id": call.id, "name": call.name, "arguments": arguments}
        started_id = self.store.append(t.sid, t.turn, "tool_started", started)
        t.say(t.renderer.tool_start(call.name, arguments))
        live: list[str] = []

        async def on_output(text: str) -> None:
            self.store.append_output(started_id, text)  # stored before anyone sees it
            if sum(map(len, live)) < _LIVE_KEPT_CHARS:
                live.append(text)
            t.say(t.renderer.live(text))

        try:
            outcome = await self._call_until_stopped(
                t.sid, kernel, t.spec.stop, call.name, arguments, on_output
            )
        except KernelServiceError as exc:
            await self._record_tool(t, call, arguments, ToolOutcome(exc.message, is_error=True))
            self.store.drop_output(started_id)
            raise
        except asyncio.CancelledError:
            seen = "".join(live)
            text = _SHUT_DOWN.format(seen=f" Output until then:\n{seen}" if seen else "")
            self.store.append(
                t.sid,
                t.turn,
                "tool_result",
                {
                    "call_id": call.id,
                    "name": call.name,
                    "arguments": arguments,
                    "text": text,
                    "is_error": True,
                    "structured": {"status": "unknown", "message": text},
                    "live_output": seen,
                },
            )
            self.store.drop_output(started_id)
            raise
        event_id = await self._record_tool(t, call, arguments, outcome)
        self.store.drop_output(started_id)
        t.say(t.renderer.tool_end(call.name, arguments, outcome, event_id))
        if (call.name == "execute_code" and not outcome.is_error) or _restarted(call.name, outcome):
            await self._remember_kernel(t.sid, kernel, refresh=_restarted(call.name, outcome))

    async def _file_state(self, sid: str) -> _FileState | None:
        """The session folder's visible files; None if unknown."""
        if self.files is None:
            return None
        try:
            listing = await self.files.listing(sid)
        except ServiceError as exc:
            logger.warning("session %s: files not listed: %s", sid, exc.message)
            return None
        shown = {f.path: (f.size, f.modified) for f in listing.files if _shown(f)}
        cut = max((_walk_key(f.path) for f in listing.files), default=())
        return _FileState(shown, cut if listing.limit_reached else None)

    def _uploaded_in(self, sid: str, turn: int) -> dict[str, int]:
        """Files uploaded while turn `turn` ran (path: size): the user's, not its code's."""
        uploaded: dict[str, int] = {}
        for e in self.store.newest_events(sid, before_turn=turn + 1):  # this turn's alone
            if e.turn < turn:
                break
            if e.type == "note" and e.data.get("kind") == "files_uploaded":
                uploaded.update((str(f["path"]), int(f["size"])) for f in e.data.get("files", []))
        return uploaded

    async def _report_files(self, t: _Turn) -> None:
        """List the files this turn's code wrote at the end of its reply, with links."""
        if t.files_before is None or t.spec.file_url is None:
            return
        after = await self._file_state(t.sid)
        if after is None:
            return
        before = t.files_before
        written: list[dict[str, Any]] = [
            {"path": path, "size": size, "modified": modified}
            for path, (size, modified) in sorted(after.files.items())
            if before.files.get(path) != (size, modified) and before.covers(path)
        ]
        if written:
            uploaded = await asyncio.to_thread(self._uploaded_in, t.sid, t.turn)
            written = [f for f in written if uploaded.get(f["path"]) != f["size"]]
        if not written:
            return
        lines = "\n".join(
            f"- [{_link_text(f['path'])}]({t.spec.file_url(f['path'])}) ({size_text(f['size'])})"
            for f in written
        )
        text = f"**Files written in this turn:**\n{lines}\n"
        self.store.append(
            t.sid,
            t.turn,
            "files",
            {"kind": "written", "files": written, "text": text},
        )
        t.say(t.renderer.text(f"\n\n{text}" if t.sent else text))

    async def execute_direct(
        self, sid: str, code: str, timeout: float | None, stop: asyncio.Event | None = None
    ) -> tuple[int, ToolOutcome]:
        """Run code the user typed (no model), recorded like any execution.

        Setting `stop` interrupts it (it then ends with a KeyboardInterrupt).
        """
        await self.model.ready()
        record = self.store.get_session(sid)
        turn = (record.last_turn if record else 0) + 1
        arguments: dict[str, Any] = {"code": code}
        if timeout is not None:
            arguments["timeout"] = timeout
        call = ToolCallRequest(id=f"direct-{turn}", name="execute_code", arguments="")
        t = _Turn(
            TurnSpec(sid, "", "markdown", lambda n: n, self.settings.model or ""),
            turn,
            lambda _event: None,
            self.counter(self.settings.model or ""),
        )
        try:
            async with self.kernels.session(sid) as kernel:
                await self._check_kernel(t, kernel)
                outcome = await self._call_until_stopped(
                    sid, kernel, stop or asyncio.Event(), "execute_code", arguments
                )
                if not outcome.is_error or _restarted("execute_code", outcome):
                    await self._remember_kernel(
                        sid, kernel, refresh=_restarted("execute_code", outcome)
                    )
        except KernelServiceError as exc:
            self.store.append(sid, turn, "error", {"message": exc.message, "code": exc.code})
            raise
        event_id = await self._record_tool(t, call, arguments, outcome, direct=True)
        self.forget(sid)
        self.exporter.schedule(sid)
        return event_id, outcome

    async def _remember_kernel(self, sid: str, kernel: Any, *, refresh: bool = False) -> None:
        """Keep the kernel's language info and identity (refreshed after a restart)."""
        record = self.store.get_session(sid)
        if record is None or (record.kernel_json and record.kernel_identity and not refresh):
            return
        info = await kernel.call("kernel_info", {"start": False})
        if not info.is_error and info.structured and info.structured.get("running", True):
            self.store.update_session(
                sid,
                kernel_json=json.dumps(info.structured),
                kernel_identity=kernel_identity(info.structured),
            )

    async def _record_tool(
        self,
        t: _Turn,
        call: ToolCallRequest,
        arguments: dict[str, Any],
        outcome: ToolOutcome,
        *,
        direct: bool = False,
    ) -> int:
        text = _model_text(outcome)
        data = {
            "call_id": call.id,
            "name": call.name,
            "arguments": arguments,
            "text": text,
            "is_error": outcome.is_error,
            "structured": outcome.structured,
        }
        if direct:
            data["direct"] = True  # typed by the user, not called by the model
            return self.store.append(t.sid, t.turn, "tool_result", data)
        return self._append(t, "tool_result", data, await self._tool_item(call.id, text, t.count))


__all__ = [
    "Agent",
    "Content",
    "Emit",
    "Failed",
    "Finished",
    "TurnEvent",
    "TurnSpec",
    "kernel_identity",
]
