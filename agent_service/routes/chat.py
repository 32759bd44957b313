"""Chat: `POST /v1/chat/completions` (streamed or whole), `GET /v1/models`, `GET /v1/skills`."""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations.

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import TypeAdapter, ValidationError
from sse_starlette import EventSourceResponse

from .. import files
from ..agent import Content, Failed, Finished, TurnEvent, TurnSpec
from ..conversation import history_digest, is_task, session_from
from ..deps import Caller, Svc
from ..errors import (
    InvalidRequest,
    ModelNotConfigured,
    NotFound,
    RequestTooLarge,
    ServiceError,
    SessionBusy,
    ShuttingDown,
)
from ..llm import ModelParams
from ..schemas import ChatCompletionRequest, ChatMessage, Completion
from ..security import Principal
from ..services import Services
from ..store import NewEvent, TranscriptStore
from ..titles import session_title

logger = logging.getLogger(__name__)

router = APIRouter()

NO_RETRY = {"x-should-retry": "false"}
_PARSE_INLINE_BYTES = 64 * 1024
"""Bodies larger than this are parsed and validated in a thread, off the event loop."""


def error_response(error: ServiceError, headers: dict[str, str] | None = None) -> JSONResponse:
    extra = {"WWW-Authenticate": "Bearer"} if error.status == 401 else {}
    return JSONResponse(
        error.body(), status_code=error.status, headers={**NO_RETRY, **extra, **(headers or {})}
    )


def invalid_request(errors: list[Any]) -> InvalidRequest:
    """Our error for pydantic's validation errors (the first one says enough)."""
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error")
        reason = f": {detail}" if detail else ""
        return InvalidRequest(f"request body is not valid JSON{reason}", code="invalid_json")
    where = ".".join(loc) or "body"
    return InvalidRequest(f"{where}: {first.get('msg', 'invalid value')}", param=where)


@router.get("/v1/models")
async def models(svc: Svc, caller: Caller) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "kernel-agent"}
            for m in svc.settings.model_ids
        ],
    }


@router.get("/v1/skills")
async def skills(svc: Svc, caller: Caller) -> dict[str, Any]:
    return {"object": "list", "data": await svc.kernels.skills()}


_MESSAGES: TypeAdapter[list[ChatMessage]] = TypeAdapter(list[ChatMessage])
_SLICE = 256


def _parse_body(raw: bytes, limit: int) -> ChatCompletionRequest:
    """Parse and validate a chat request, checking its size before the costly part.

    Messages are validated in slices: pydantic holds the GIL while it validates, so one
    call over thousands of messages would stall the event loop's thread meanwhile.
    """
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise InvalidRequest(
            f"request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    messages = data.get("messages") if isinstance(data, dict) else None
    if not isinstance(messages, list) or len(messages) <= _SLICE:
        try:
            return ChatCompletionRequest.model_validate(data)
        except ValidationError as exc:
            raise invalid_request(exc.errors()) from None
    if len(messages) > limit:
        raise RequestTooLarge(
            f"the request carries {len(messages):,} messages; at most {limit:,} are "
            "accepted (the service keeps the conversation: send only the new message with "
            "X-Session-Id)",
            param="messages",
        )
    validated: list[ChatMessage] = []
    for start in range(0, len(messages), _SLICE):
        try:
            validated += _MESSAGES.validate_python(messages[start : start + _SLICE])
        except ValidationError as exc:
            errors = [
                {**e, "loc": ("messages", start + int(e["loc"][0]), *e["loc"][1:])}
                for e in exc.errors()
            ]
            raise invalid_request(errors) from None
    try:
        body = ChatCompletionRequest.model_validate({**data, "messages": messages[:1]})
    except ValidationError as exc:
        raise invalid_request(exc.errors()) from None
    body.messages = validated
    return body


async def _parse(raw: bytes, svc: Services) -> ChatCompletionRequest:
    limit = svc.settings.max_request_messages
    if len(raw) > _PARSE_INLINE_BYTES:
        body = await asyncio.to_thread(_parse_body, raw, limit)
    else:
        body = _parse_body(raw, limit)
    if len(body.messages) > limit:
        raise RequestTooLarge(
            f"the request carries {len(body.messages):,} messages; at most {limit:,} are accepted",
            param="messages",
        )
    return body


@router.post(
    "/v1/chat/completions",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": ChatCompletionRequest.model_json_schema()}},
        }
    },
)
async def chat(request: Request, svc: Svc, caller: Caller) -> Response:
    settings = svc.settings
    body = await _parse(await request.body(), svc)
    if settings.model is None:
        raise ModelNotConfigured(
            "No model is configured. Set AGENT_MODEL to a litellm model string (for "
            "example openai/gpt-4o or anthropic/claude-sonnet-4-5) with its key in "
            "AGENT_API_KEY, or AGENT_API_BASE for an OpenAI-compatible server, and restart."
        )
    model = settings.resolve_model(body.model)
    if model is None:
        raise NotFound(
            f"model {body.model!r} is not served here; use one of {settings.model_ids}",
            param="model",
            code="model_not_found",
        )
    params = ModelParams(body.output_tokens, body.temperature, body.top_p, body.stop, body.seed)
    if body.messages[-1].role != "user":
        raise InvalidRequest("the last message must be from the user", param="messages")
    if is_task(body):
        return await _answer_task(svc, body, model, params)
    last = body.messages[-1]
    parts = last.content if isinstance(last.content, list) else []
    attached = await asyncio.to_thread(files.attachments, parts) if parts else []
    content = last.text().strip()
    if not content and attached:
        content = "(attached: " + ", ".join(name for name, _ in attached) + ")"
    if not content:
        raise InvalidRequest("the last user message is empty", param="messages")
    if len(content) > settings.max_message_chars:
        raise RequestTooLarge(
            f"the message exceeds {settings.max_message_chars:,} characters", param="messages"
        )
    sid = session_from(request.headers, body) or await _continued(svc, body, caller)
    headers = {"X-Session-Id": sid}
    record = svc.store.get_session(sid)
    if record is not None:
        caller.visible(record, sid)
    if svc.turns.busy(sid):
        return error_response(
            SessionBusy(f"session {sid} is already running a turn; wait for it to finish"),
            headers,
        )
    mode = request.headers.get("x-render-mode", settings.render_mode)
    base = str(request.base_url)
    spec = TurnSpec(
        session_id=sid,
        user_content=content,
        render_mode="openwebui" if mode == "openwebui" else "markdown",
        image_url=lambda name: svc.output_url(base, sid, name),
        model=model,
        params=params,
        file_url=lambda path: files.file_link(svc, base, sid, path),
    )

    async def run(emit: Any) -> None:
        # The session is the turn's from here on: a concurrent request gets 409.
        await asyncio.to_thread(_record_request, svc.store, sid, body, caller)
        if attached:
            spec.attachments = await files.save_files(svc, sid, attached, tell_model=False)
        await svc.agent.run_turn(spec, emit)

    try:
        queue = await svc.turns.start(sid, run, stop=spec.stop)
    except SessionBusy as exc:  # a turn began meanwhile, here or on another replica
        return error_response(exc, headers)
    completion = Completion(body.model)
    if not body.stream:
        return await _complete(queue, completion, headers)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    first = await queue.get()
    if isinstance(first, Failed):
        return error_response(first.error, headers)
    shutdown = anyio.Event()
    return EventSourceResponse(
        _sse(first, queue, completion, include_usage, shutdown, svc),
        headers=headers,
        ping=settings.sse_ping,
        shutdown_event=shutdown,
        # sse-starlette cancels the stream after this; ours ends it cleanly first.
        shutdown_grace_period=settings.shutdown_grace + 2,
    )


async def _continued(svc: Services, body: ChatCompletionRequest, caller: Principal) -> str:
    """The stored conversation these messages continue exactly, else a new session id."""
    if len(body.messages) > 1:
        digest = await asyncio.to_thread(history_digest, body.messages)
        if digest is not None:
            found = svc.store.find_continued(caller.owner, digest)
            if found is not None:
                return found
    return uuid.uuid4().hex


def _record_request(
    store: TranscriptStore, sid: str, body: ChatCompletionRequest, caller: Principal
) -> None:
    """Create the session if new (importing any earlier history), note the client system."""
    record = store.get_session(sid)
    system = "\n\n".join(m.text() for m in body.messages if m.role in ("system", "developer"))
    if record is None:
        store.create_session(sid, body.model, caller.owner)
        record = caller.visible(store.get_session(sid), sid)  # another key may have won
        first_user = next(m.text() for m in body.messages if m.role == "user")
        store.update_session(sid, title=session_title(first_user))
        events: list[NewEvent] = []
        turn = 0
        for message in body.messages[:-1]:
            if message.role == "user":
                turn += 1
                events.append(NewEvent(turn, "user", {"content": message.text()}))
            elif message.role == "assistant" and message.text():
                data = {"content": message.text(), "imported": True}
                events.append(NewEvent(max(turn, 1), "assistant", data))
        store.append_many(sid, events)
        digest = history_digest(body.messages)
        if digest is not None:
            store.update_session(sid, digest=digest)
        record = store.get_session(sid)
    else:
        caller.visible(record, sid)
        if not record.title:  # made by an upload: named by its first message
            store.update_session(sid, title=session_title(body.messages[-1].text()))
    if system and record is not None and system != record.client_system:
        store.update_session(sid, client_system=system)


async def _answer_task(
    svc: Services, body: ChatCompletionRequest, model: str, params: ModelParams
) -> Response:
    """A request that is not a turn: the model answers it as sent, no tools, nothing kept."""
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    reply = await svc.model.complete(model, messages, params)
    completion = Completion(body.model)
    finish = reply.finish_reason if reply.finish_reason in ("stop", "length") else "stop"
    if not body.stream:
        return JSONResponse(completion.body(reply.text, finish, reply.usage), headers=NO_RETRY)

    async def events() -> AsyncIterator[dict[str, str]]:
        yield {"data": json.dumps(completion.chunk({"role": "assistant", "content": reply.text}))}
        yield {"data": json.dumps(completion.chunk({}, finish))}
        yield {"data": "[DONE]"}

    return EventSourceResponse(events())


async def _next(
    queue: "asyncio.Queue[TurnEvent]", shutdown: anyio.Event, svc: Services
) -> TurnEvent | None:
    """The turn's next event; None once shutdown's grace is over before it came."""
    if not shutdown.is_set():
        get = asyncio.ensure_future(queue.get())
        stop = asyncio.ensure_future(shutdown.wait())
        await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not get.done():
            get.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            event = await get
            return event
    try:
        async with asyncio.timeout(svc.draining()):
            return await queue.get()
    except TimeoutError:
        return None


async def _complete(
    queue: "asyncio.Queue[TurnEvent]", completion: Completion, headers: dict[str, str]
) -> Response:
    parts: list[str] = []
    while True:
        event = await queue.get()
        if isinstance(event, Content):
            parts.append(event.text)
        elif isinstance(event, Failed):
            return error_response(event.error, headers)
        elif isinstance(event, Finished):
            body = completion.body("".join(parts), _finish(event), event.usage)
            return JSONResponse(body, headers=headers)


def _finish(event: Finished) -> str:
    return event.finish_reason if event.finish_reason in ("stop", "length") else "stop"


async def _sse(
    first: TurnEvent,
    queue: "asyncio.Queue[TurnEvent]",
    completion: Completion,
    include_usage: bool,
    shutdown: anyio.Event,
    svc: Services,
) -> AsyncIterator[dict[str, str]]:
    yield {"data": json.dumps(completion.chunk({"role": "assistant", "content": ""}))}
    event: TurnEvent | None = first
    while True:
        if event is None:  # shutting down and the turn did not end within the grace
            error = ShuttingDown(
                "The service is shutting down and this turn did not finish in time; what ran "
                "so far is kept in the session's transcript."
            )
            yield {"data": json.dumps(error.body())}
            break
        if isinstance(event, Content):
            if event.text:
                yield {"data": json.dumps(completion.chunk({"content": event.text}))}
        elif isinstance(event, Failed):
            yield {"data": json.dumps(event.error.body())}
            break
        elif isinstance(event, Finished):
            yield {"data": json.dumps(completion.chunk({}, _finish(event)))}
            if include_usage:
                yield {"data": json.dumps(completion.usage_chunk(event.usage))}
            break
        event = await _next(queue, shutdown, svc)
    yield {"data": "[DONE]"}
