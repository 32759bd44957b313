"""The tool loop: one turn of a conversation, from the user's message to the answer.

Each model call streams; its text goes to the client at once. Tool calls run on
the session's kernel through MCP, their activity rendered as content, and their
results go back to the model. Every step is appended to the transcript as it
happens, so a failure anywhere leaves a consistent conversation behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .config import Settings
from .errors import KernelServiceError, ProviderError, ServiceError
from .exporter import NotebookExporter
from .kernel_client import KernelClient, ToolOutcome
from .llm import ModelAdapter, ModelReply, TextDelta, ToolCallRequest
from .prompt_cache import PromptCache
from .render import ContentRenderer, ImageUrl
from .store import Event, TranscriptStore

logger = logging.getLogger(__name__)

_NO_KERNEL = (
    "The kernel service is unreachable right now, so no code can run this turn. Answer "
    "without computing, and tell the user that computation is unavailable if they need it."
)


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


def _assistant_message(text: str, calls: list[dict[str, str]]) -> dict[str, Any]:
    """An OpenAI assistant message from stored tool calls ({id, name, arguments})."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = [
            {
                "id": c["id"],
                "type": "function",
                "function": {"name": c["name"], "arguments": c["arguments"]},
            }
            for c in calls
        ]
    return message


def transcript_messages(events: list[Event]) -> list[dict[str, Any]]:
    """The conversation as OpenAI chat messages, every tool call answered."""
    messages: list[dict[str, Any]] = []
    pending: dict[str, str] = {}  # tool call id -> name, awaiting its result

    def close_pending() -> None:
        for call_id in list(pending):
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": call_id,
                    "content": "[not executed: the turn was interrupted]",
                }
            )
            del pending[call_id]

    for event in events:
        data = event.data
        if event.type == "user":
            close_pending()
            messages.append({"role": "user", "content": data["content"]})
        elif event.type == "assistant":
            close_pending()
            calls = data.get("tool_calls") or []
            pending.update({c["id"]: c["name"] for c in calls})
            messages.append(_assistant_message(data.get("content") or "", calls))
        elif event.type == "tool_result" and data.get("direct"):
            close_pending()
            messages.append({"role": "user", "content": _direct_note(data)})
        elif event.type == "tool_result" and data["call_id"] in pending:
            del pending[data["call_id"]]
            messages.append(
                {"role": "tool", "tool_call_id": data["call_id"], "content": data["text"]}
            )
    close_pending()
    return messages


def _direct_note(data: dict[str, Any]) -> str:
    """How the model learns of code the user ran in the kernel themselves."""
    code = str(data.get("arguments", {}).get("code", ""))
    return (
        "[I ran this code in the kernel myself; its state is now part of the session]\n"
        f"```python\n{code}\n```\nOutput:\n```\n{data.get('text', '')}\n```"
    )


def _model_text(outcome: ToolOutcome) -> str:
    return outcome.text.replace("image shown below]", "image shown to the user]")


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
    ) -> None:
        self.settings = settings
        self.store = store
        self.kernels = kernels
        self.prompts = prompts
        self.model = model
        self.exporter = exporter

    async def run_turn(self, spec: TurnSpec, emit: Emit) -> None:
        """Run one turn to its end, emitting content; never raises for expected faults."""
        sid = spec.session_id
        turn = self.store.last_turn(sid) + 1
        self.store.append(sid, turn, "user", {"content": spec.user_content})
        renderer = ContentRenderer(spec.render_mode, spec.image_url)
        usage: dict[str, int] = {}
        final: TurnEvent | None = None
        try:
            system = await self.prompts.get()
            record = self.store.get_session(sid)
            messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
            if record is not None and record.client_system:
                messages.append({"role": "system", "content": record.client_system})
            messages += transcript_messages(self.store.events(sid))
            async with contextlib.AsyncExitStack() as stack:
                try:
                    kernel = await stack.enter_async_context(self.kernels.session(sid))
                    tools = await kernel.openai_tools()
                except KernelServiceError as exc:
                    # Still answer, without tools: the model can say computing is unavailable.
                    logger.warning("session %s: no kernel tools this turn: %s", sid, exc)
                    kernel, tools = None, []
                    messages.insert(1, {"role": "system", "content": _NO_KERNEL})
                for _ in range(self.settings.max_tool_rounds):
                    reply = await self._model_round(sid, turn, messages, tools, renderer, emit)
                    for key, value in reply.usage.items():
                        usage[key] = usage.get(key, 0) + value
                    if not reply.tool_calls or kernel is None:
                        final = Finished(reply.finish_reason or "stop", usage)
                        return
                    for call in reply.tool_calls:
                        await self._run_tool(sid, turn, call, kernel, messages, renderer, emit)
            closing = (
                f"I stopped after {self.settings.max_tool_rounds} rounds of tool calls without "
                "reaching a final answer. Ask me to continue, or narrow the task."
            )
            self.store.append(sid, turn, "assistant", {"content": closing, "notice": True})
            emit(Content(renderer.text(f"\n\n{closing}")))
            final = Finished("stop", usage)
        except ServiceError as exc:
            self.store.append(sid, turn, "error", {"message": exc.message, "code": exc.code})
            final = Failed(exc)
        except Exception:
            logger.exception("session %s: turn %d failed", sid, turn)
            error = ServiceError("The agent failed unexpectedly; the transcript is kept.")
            self.store.append(sid, turn, "error", {"message": error.message, "code": None})
            final = Failed(error)
        finally:
            self.exporter.schedule(sid)
            if final is not None:
                emit(final)

    async def _model_round(
        self,
        sid: str,
        turn: int,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        renderer: ContentRenderer,
        emit: Emit,
    ) -> ModelReply:
        reply: ModelReply | None = None
        try:
            async for item in self.model.stream(messages, tools):
                if isinstance(item, TextDelta):
                    emit(Content(renderer.text(item.text)))
                else:
                    reply = item
        except ProviderError as exc:
            partial = getattr(exc, "partial_text", "")
            if partial:
                self.store.append(sid, turn, "assistant", {"content": partial, "partial": True})
            raise
        assert reply is not None
        calls = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in reply.tool_calls]
        self.store.append(sid, turn, "assistant", {"content": reply.text, "tool_calls": calls})
        messages.append(_assistant_message(reply.text, calls))
        return reply

    async def _run_tool(
        self,
        sid: str,
        turn: int,
        call: ToolCallRequest,
        kernel: Any,
        messages: list[dict[str, Any]],
        renderer: ContentRenderer,
        emit: Emit,
    ) -> None:
        try:
            arguments = json.loads(call.arguments or "{}")
            if not isinstance(arguments, dict):
                raise ValueError("arguments must be a JSON object")
        except ValueError as exc:
            arguments = {}
            outcome = ToolOutcome(
                text=f"Your arguments for {call.name} were not valid JSON ({exc}); "
                "call the tool again with a JSON object.",
                is_error=True,
            )
        else:
            emit(Content(renderer.tool_start(call.name, arguments)))

            async def on_output(text: str) -> None:
                emit(Content(renderer.live(text)))

            try:
                outcome = await kernel.call(call.name, arguments, on_output)
            except KernelServiceError as exc:
                outcome = ToolOutcome(text=exc.message, is_error=True)
                self._record_tool(sid, turn, call, arguments, outcome)
                raise
        event_id = self._record_tool(sid, turn, call, arguments, outcome)
        emit(Content(renderer.tool_end(call.name, arguments, outcome, event_id)))
        if call.name == "execute_code" and not outcome.is_error:
            await self._remember_kernel(sid, kernel)
        messages.append({"role": "tool", "tool_call_id": call.id, "content": _model_text(outcome)})

    async def execute_direct(
        self, sid: str, code: str, timeout: float | None
    ) -> tuple[int, ToolOutcome]:
        """Run code the user typed (no model), recorded like any execution."""
        turn = self.store.last_turn(sid) + 1
        arguments: dict[str, Any] = {"code": code}
        if timeout is not None:
            arguments["timeout"] = timeout
        try:
            async with self.kernels.session(sid) as kernel:
                outcome = await kernel.call("execute_code", arguments)
                if not outcome.is_error:
                    await self._remember_kernel(sid, kernel)
        except KernelServiceError as exc:
            self.store.append(sid, turn, "error", {"message": exc.message, "code": exc.code})
            raise
        call = ToolCallRequest(id=f"direct-{turn}", name="execute_code", arguments="")
        event_id = self._record_tool(sid, turn, call, arguments, outcome, direct=True)
        self.exporter.schedule(sid)
        return event_id, outcome

    async def _remember_kernel(self, sid: str, kernel: Any) -> None:
        """Keep the kernel's language info once, for the notebook's metadata."""
        record = self.store.get_session(sid)
        if record is None or record.kernel_json:
            return
        info = await kernel.call("kernel_info", {})
        if not info.is_error and info.structured:
            self.store.update_session(sid, kernel_json=json.dumps(info.structured))

    def _record_tool(
        self,
        sid: str,
        turn: int,
        call: ToolCallRequest,
        arguments: dict[str, Any],
        outcome: ToolOutcome,
        *,
        direct: bool = False,
    ) -> int:
        data = {
            "call_id": call.id,
            "name": call.name,
            "arguments": arguments,
            "text": _model_text(outcome),
            "is_error": outcome.is_error,
            "structured": outcome.structured,
        }
        if direct:
            data["direct"] = True  # typed by the user, not called by the model
        return self.store.append(sid, turn, "tool_result", data)
