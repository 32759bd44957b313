"""The HTTP face of the agent: OpenAI-compatible chat, sessions, admin."""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations.

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import notebook
from .agent import Agent, Content, Failed, Finished, TurnEvent, TurnSpec
from .config import Settings
from .errors import (
    InvalidRequest,
    KernelServiceError,
    ModelNotConfigured,
    NotFound,
    RequestTooLarge,
    ServiceError,
    SessionBusy,
    Unauthorized,
)
from .exporter import NotebookExporter
from .kernel_client import KernelClient
from .llm import ModelAdapter
from .prompt_cache import PromptCache
from .render import image_names
from .schemas import ChatCompletionRequest, Completion, ExecuteRequest
from .store import TranscriptStore
from .turns import TurnRegistry

logger = logging.getLogger(__name__)

_SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_OUTPUT_NAME = re.compile(r"(\d+)-(\d+)\.(png|jpg)")
_MIME = {"png": "image/png", "jpg": "image/jpeg"}
NO_RETRY = {"x-should-retry": "false"}


class Services:
    """Everything a request handler needs, built once in the lifespan."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = TranscriptStore(settings.data_dir / "transcripts.sqlite3")
        self.kernels = KernelClient(settings)
        self.prompts = PromptCache(
            self.kernels.system_prompt, settings.prompt_ttl, settings.fallback_prompt
        )
        self.model = ModelAdapter(settings)
        self.exporter = NotebookExporter(self.store, settings.notebooks_dir)
        self.agent = Agent(
            settings, self.store, self.kernels, self.prompts, self.model, self.exporter
        )
        self.turns = TurnRegistry()


def _services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


Svc = Annotated[Services, Depends(_services)]


class _BodyLimit:
    """Refuses request bodies over `limit` bytes with 413, before they are parsed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        length = headers.get(b"content-length")
        too_large = RequestTooLarge(f"request body exceeds {self.limit:,} bytes")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await _send_error(send, too_large)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _send_error(send, too_large)


_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
_LOOPBACK_ORIGIN = re.compile(r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?")


class _HostOriginGuard:
    """Refuses foreign Host headers (421) and browser Origins (403): DNS rebinding.

    Without it a web page could reach this loopback service through a rebound name
    and run code in a kernel; kernel_mcp guards its port the same way.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.hosts = _LOOPBACK_HOSTS | {h.lower() for h in settings.allowed_hosts}
        if settings.host not in ("0.0.0.0", "::"):
            self.hosts.add(settings.host.lower())
        self.origins = {o.rstrip("/").lower() for o in settings.allowed_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        host = headers.get(b"host", b"").decode("latin-1").lower()
        name = host[1 : host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
        origin = headers.get(b"origin", b"").decode("latin-1").rstrip("/").lower()
        error: ServiceError | None = None
        if "*" not in self.hosts and name not in self.hosts:
            error = ServiceError(
                f"Host {host!r} is not served here; add it to AGENT_ALLOWED_HOSTS",
                code="host_not_allowed",
            )
            error.status = 421
        elif origin and not _LOOPBACK_ORIGIN.fullmatch(origin) and origin not in self.origins:
            error = ServiceError(
                f"Origin {origin!r} is not allowed; add it to AGENT_ALLOWED_ORIGINS",
                code="origin_not_allowed",
            )
            error.status = 403
        if error is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await _send_error(send, error)
        else:
            await send({"type": "websocket.close", "code": 1008})


class _TooLarge(Exception):
    pass


async def _send_error(send: Send, error: ServiceError) -> None:
    body = json.dumps(error.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [(b"content-type", b"application/json"), (b"x-should-retry", b"false")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _error_response(error: ServiceError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        error.body(), status_code=error.status, headers={**NO_RETRY, **(headers or {})}
    )


def _session_from(request: Request, body: ChatCompletionRequest) -> str | None:
    metadata = body.metadata or {}
    for value in (
        request.headers.get("x-session-id"),
        metadata.get("session_id"),
        request.headers.get("x-openwebui-chat-id"),
        request.headers.get("x-conversation-id"),
    ):
        if value:
            value = str(value).strip()
            if not _SESSION_ID.fullmatch(value):
                raise InvalidRequest(
                    "session id must be 1-128 letters, digits, '.', '_' or '-', starting with a "
                    "letter or digit",
                    param="X-Session-Id",
                    code="invalid_session_id",
                )
            return value
    return None


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the FastAPI app; its lifespan opens the transcript store."""
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = Services(settings)
        app.state.services = services
        warm = None
        if settings.model:
            warm = asyncio.create_task(services.model.warm_up())
        logger.info(
            "agent_service ready: model %s, kernel_mcp %s, data %s",
            settings.model or "(none)",
            settings.mcp_url,
            settings.data_dir,
        )
        try:
            yield
        finally:
            await services.turns.close()
            await services.exporter.flush()
            if warm is not None and not warm.done():
                warm.cancel()
            services.store.close()

    app = FastAPI(title="kernel-agent", version="0.1.0", lifespan=lifespan)
    app.add_middleware(_BodyLimit, limit=settings.max_request_bytes)
    app.add_middleware(_HostOriginGuard, settings=settings)

    def authenticate(request: Request) -> None:
        if not settings.api_keys:
            return
        header = request.headers.get("authorization", "")
        token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        if not any(hmac.compare_digest(token, k.get_secret_value()) for k in settings.api_keys):
            raise Unauthorized(
                "missing or invalid API key: send 'Authorization: Bearer <key>' "
                "with one of AGENT_API_KEYS"
            )

    Auth = Depends(authenticate)

    def output_signature(session_id: str, name: str, key: str) -> str:
        message = f"{session_id}/{name}".encode()
        return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()[:32]

    def output_url(base: str, session_id: str, name: str) -> str:
        """An image link; signed when keys are required, since browsers send no key for it."""
        url = f"{base}v1/sessions/{session_id}/outputs/{name}"
        if settings.api_keys:
            key = settings.api_keys[0].get_secret_value()
            url += f"?sig={output_signature(session_id, name, key)}"
        return url

    def authorize_output(request: Request, session_id: str, name: str) -> None:
        signature = request.query_params.get("sig", "")
        for key in settings.api_keys:
            expected = output_signature(session_id, name, key.get_secret_value())
            if signature and hmac.compare_digest(signature, expected):
                return
        authenticate(request)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        if exc.status >= 500:
            logger.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc)
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
        return _error_response(exc, headers)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, request.url.path)
        return _error_response(ServiceError("internal error; the service logged the details"))

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            error = InvalidRequest("request body is not valid JSON", code="invalid_json")
        else:
            where = ".".join(loc) or "body"
            error = InvalidRequest(f"{where}: {first.get('msg', 'invalid value')}", param=where)
        return _error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = ServiceError(str(exc.detail))
        error.status = exc.status_code
        error.type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(error)

    @app.get("/health")
    async def health(svc: Svc) -> dict[str, Any]:
        reachable = await svc.kernels.reachable()
        return {
            "status": "ok" if reachable else "degraded",
            "model_configured": settings.model is not None,
            "model": settings.model,
            "kernel_mcp": {"url": settings.mcp_url, "reachable": reachable},
            "prompt_cache": svc.prompts.stats(),
        }

    @app.get("/v1/models", dependencies=[Auth])
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "kernel-agent"}
                for m in settings.model_ids
            ],
        }

    @app.post("/v1/chat/completions", dependencies=[Auth])
    async def chat(request: Request, body: ChatCompletionRequest, svc: Svc) -> Response:
        if settings.model is None:
            raise ModelNotConfigured(
                "No model is configured. Set AGENT_MODEL to a litellm model string (for "
                "example openai/gpt-4o or anthropic/claude-sonnet-4-5) with its key in "
                "AGENT_API_KEY, or AGENT_API_BASE for an OpenAI-compatible server, and restart."
            )
        if body.model not in settings.model_ids:
            raise NotFound(
                f"model {body.model!r} is not served here; use one of {settings.model_ids}",
                param="model",
                code="model_not_found",
            )
        last = body.messages[-1]
        if last.role != "user":
            raise InvalidRequest("the last message must be from the user", param="messages")
        content = last.text().strip()
        if not content:
            raise InvalidRequest("the last user message is empty", param="messages")
        if len(content) > settings.max_message_chars:
            raise RequestTooLarge(
                f"the message exceeds {settings.max_message_chars:,} characters",
                param="messages",
            )
        sid = _session_from(request, body) or uuid.uuid4().hex
        headers = {"X-Session-Id": sid}
        if svc.turns.busy(sid):
            return _error_response(
                SessionBusy(f"session {sid} is already running a turn; wait for it to finish"),
                headers,
            )
        _record_request(svc.store, sid, body)
        mode = request.headers.get("x-render-mode", settings.render_mode)
        base = str(request.base_url)
        spec = TurnSpec(
            session_id=sid,
            user_content=content,
            render_mode="openwebui" if mode == "openwebui" else "markdown",
            image_url=lambda name: output_url(base, sid, name),
        )
        queue = svc.turns.start(sid, lambda emit: svc.agent.run_turn(spec, emit))
        completion = Completion(body.model)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if not body.stream:
            return await _complete(queue, completion, headers)
        first = await queue.get()
        if isinstance(first, Failed):
            return _error_response(first.error, headers)
        return EventSourceResponse(
            _sse(first, queue, completion, include_usage),
            headers=headers,
            ping=int(settings.sse_ping),
        )

    @app.get("/v1/skills", dependencies=[Auth])
    async def skills(svc: Svc) -> dict[str, Any]:
        return {"object": "list", "data": await svc.kernels.skills()}

    @app.get("/admin/cache-stats", dependencies=[Auth])
    async def cache_stats(svc: Svc) -> dict[str, Any]:
        return svc.prompts.stats()

    @app.post("/admin/clear-cache", dependencies=[Auth])
    async def clear_cache(svc: Svc) -> dict[str, Any]:
        svc.prompts.clear()
        return {"cleared": True, **svc.prompts.stats()}

    @app.get("/v1/sessions", dependencies=[Auth])
    async def list_sessions(svc: Svc, limit: int = 100) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [r.summary() for r in svc.store.list_sessions(max(1, min(limit, 1000)))],
        }

    @app.get("/v1/sessions/{session_id}", dependencies=[Auth])
    async def get_session(session_id: str, svc: Svc) -> dict[str, Any]:
        record = _record_or_404(svc, session_id)
        events = [
            {"id": e.id, "turn": e.turn, "type": e.type, "created": e.created, **e.data}
            for e in svc.store.events(session_id)
        ]
        return {**record.summary(), "busy": svc.turns.busy(session_id), "events": events}

    @app.delete("/v1/sessions/{session_id}", dependencies=[Auth])
    async def delete_session(session_id: str, svc: Svc) -> dict[str, Any]:
        _record_or_404(svc, session_id)
        with svc.turns.reserve(session_id):  # no turn may start while the session goes away
            try:
                async with asyncio.timeout(30):
                    outcome = await svc.kernels.call(
                        session_id, "shutdown_kernel", {"delete_files": True}
                    )
                kernel_shut_down = not outcome.is_error
            except (ServiceError, TimeoutError) as exc:
                logger.warning("session %s: kernel not shut down: %s", session_id, exc)
                kernel_shut_down = False
            await svc.exporter.flush()
            svc.store.delete_session(session_id)
            svc.exporter.path(session_id).unlink(missing_ok=True)
        return {
            "id": session_id,
            "object": "session",
            "deleted": True,
            "kernel_shut_down": kernel_shut_down,
        }

    @app.post("/v1/sessions/{session_id}/execute", dependencies=[Auth])
    async def execute(
        session_id: str, body: ExecuteRequest, request: Request, svc: Svc
    ) -> JSONResponse:
        """Run code in the session's kernel without the model (created if new)."""
        if not _SESSION_ID.fullmatch(session_id):
            raise InvalidRequest("invalid session id", param="session_id")
        headers = {"X-Session-Id": session_id}
        if svc.turns.busy(session_id):
            return _error_response(
                SessionBusy(f"session {session_id} is running a turn; run code afterwards"),
                headers,
            )
        if svc.store.get_session(session_id) is None:
            svc.store.create_session(session_id, settings.model_alias)
            first_line = (body.code.strip().splitlines() or ["(code)"])[0]
            svc.store.update_session(session_id, title=first_line[:80])
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        async def run(_emit: Any) -> None:
            try:
                done.set_result(await svc.agent.execute_direct(session_id, body.code, body.timeout))
            except BaseException as exc:
                done.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise

        svc.turns.start(session_id, run)  # the session is busy while the code runs
        event_id, outcome = await asyncio.shield(done)
        result = outcome.structured or {}
        base = str(request.base_url)
        images = [
            output_url(base, session_id, name)
            for name in image_names(event_id, result.get("outputs", []))
        ]
        return JSONResponse(
            {
                "session_id": session_id,
                "status": result.get("status", "error" if outcome.is_error else "ok"),
                "execution_count": result.get("execution_count"),
                "text": outcome.text,
                "is_error": outcome.is_error,
                "outputs": result.get("outputs", []),
                "images": images,
                "message": result.get("message"),
            },
            headers=headers,
        )

    @app.get("/v1/sessions/{session_id}/notebook", dependencies=[Auth])
    async def get_notebook(session_id: str, svc: Svc) -> Response:
        record = _record_or_404(svc, session_id)
        events = svc.store.events(session_id)
        text = await asyncio.to_thread(
            lambda: notebook.dumps(notebook.build_notebook(record, events))
        )
        return Response(
            text,
            media_type=notebook.MEDIA_TYPE,
            headers={"Content-Disposition": f'attachment; filename="{session_id}.ipynb"'},
        )

    @app.get("/v1/sessions/{session_id}/kernel", dependencies=[Auth])
    async def get_kernel(session_id: str, svc: Svc) -> dict[str, Any]:
        _record_or_404(svc, session_id)
        outcome = await svc.kernels.call(session_id, "kernel_info", {})
        if outcome.is_error or not outcome.structured:
            raise KernelServiceError(f"kernel_info failed: {outcome.text}")
        return outcome.structured

    @app.get("/v1/sessions/{session_id}/outputs/{name}", dependencies=[Depends(authorize_output)])
    async def get_output(session_id: str, name: str, svc: Svc) -> Response:
        match = _OUTPUT_NAME.fullmatch(name)
        event = svc.store.event(session_id, int(match.group(1))) if match else None
        outputs = ((event.data.get("structured") or {}).get("outputs") or []) if event else []
        if match is None or int(match.group(2)) >= len(outputs):
            raise NotFound(f"no output {name!r} in session {session_id}")
        mime = _MIME[match.group(3)]
        data = outputs[int(match.group(2))].get("data", {}).get(mime)
        if data is None:
            raise NotFound(f"no output {name!r} in session {session_id}")
        return Response(
            base64.b64decode(data),
            media_type=mime,
            headers={"Cache-Control": "private, max-age=86400"},
        )

    if settings.ui:
        _mount_ui(app, settings)
    return app


def _mount_ui(app: FastAPI, settings: Settings) -> None:
    """The web page at /ui, if the optional extra `ui` (gradio) is installed."""
    try:
        from .ui import mount_ui
    except ModuleNotFoundError as exc:
        if exc.name != "gradio":
            raise
        logger.info("no web UI: gradio is not installed (pip install -e '.[ui]')")
        return
    mount_ui(app, settings)


def _record_or_404(svc: Services, session_id: str) -> Any:
    record = svc.store.get_session(session_id)
    if record is None:
        raise NotFound(f"no session {session_id!r}", code="session_not_found")
    return record


def _record_request(store: TranscriptStore, sid: str, body: ChatCompletionRequest) -> None:
    """Create the session if new (importing any earlier history), note the client system."""
    record = store.get_session(sid)
    system = "\n\n".join(m.text() for m in body.messages if m.role in ("system", "developer"))
    if record is None:
        store.create_session(sid, body.model)
        first_user = next(m.text() for m in body.messages if m.role == "user")
        store.update_session(sid, title=first_user.strip()[:80])
        for message in body.messages[:-1]:
            if message.role == "user":
                store.append(sid, 0, "user", {"content": message.text()})
            elif message.role == "assistant" and message.text():
                store.append(sid, 0, "assistant", {"content": message.text(), "imported": True})
        record = store.get_session(sid)
    if system and record is not None and system != record.client_system:
        store.update_session(sid, client_system=system)


async def _complete(queue: Any, completion: Completion, headers: dict[str, str]) -> Response:
    parts: list[str] = []
    while True:
        event: TurnEvent = await queue.get()
        if isinstance(event, Content):
            parts.append(event.text)
        elif isinstance(event, Failed):
            return _error_response(event.error, headers)
        elif isinstance(event, Finished):
            body = completion.body("".join(parts), _finish(event), event.usage)
            return JSONResponse(body, headers=headers)


def _finish(event: Finished) -> str:
    return event.finish_reason if event.finish_reason in ("stop", "length") else "stop"


async def _sse(
    first: TurnEvent, queue: Any, completion: Completion, include_usage: bool
) -> AsyncIterator[dict[str, str]]:
    yield {"data": json.dumps(completion.chunk({"role": "assistant", "content": ""}))}
    event = first
    while True:
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
        event = await queue.get()
    yield {"data": "[DONE]"}
