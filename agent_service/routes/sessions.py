"""Sessions: list, read, delete, run code, interrupt, notebook, kernel, image outputs."""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations.

import asyncio
import base64
import logging
import re
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from .. import notebook
from ..conversation import SESSION_ID
from ..deps import Caller, Svc
from ..errors import InvalidRequest, KernelServiceError, NotFound, ServiceError, SessionBusy
from ..render import image_names
from ..schemas import ExecuteRequest
from ..security import Principal
from ..services import Services
from ..store import SessionRecord
from ..titles import session_title
from .chat import error_response

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/sessions")

_OUTPUT_NAME = re.compile(r"(\d+)-(\d+)\.(png|jpg)")
_MIME = {"png": "image/png", "jpg": "image/jpeg"}


def _visible(svc: Services, caller: Principal, session_id: str) -> SessionRecord:
    return caller.visible(svc.store.get_session(session_id), session_id)


@router.get("")
async def list_sessions(svc: Svc, caller: Caller, limit: int = 100) -> dict[str, Any]:
    limit = max(1, min(limit, 1000))
    records = svc.store.list_sessions(limit, owner=caller.owner, everyone=caller.admin)
    return {"object": "list", "data": [r.summary() for r in records]}


@router.get("/{session_id}")
async def get_session(session_id: str, svc: Svc, caller: Caller) -> dict[str, Any]:
    record = _visible(svc, caller, session_id)
    stored = await asyncio.to_thread(svc.store.events, session_id)
    events = [
        {"id": e.id, "turn": e.turn, "type": e.type, "created": e.created, **e.data} for e in stored
    ]
    busy = await svc.turns.busy_anywhere(session_id)
    return {**record.summary(), "busy": busy, "events": events}


@router.delete("/{session_id}")
async def delete_session(session_id: str, svc: Svc, caller: Caller) -> dict[str, Any]:
    _visible(svc, caller, session_id)
    async with svc.turns.reserve(session_id):  # no turn may start while the session goes away
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
        svc.agent.forget(session_id)
        svc.exporter.path(session_id).unlink(missing_ok=True)
    return {
        "id": session_id,
        "object": "session",
        "deleted": True,
        "kernel_shut_down": kernel_shut_down,
    }


@router.post("/{session_id}/execute")
async def execute(
    session_id: str, body: ExecuteRequest, request: Request, svc: Svc, caller: Caller
) -> JSONResponse:
    """Run code in the session's kernel without the model (created if new)."""
    if not SESSION_ID.fullmatch(session_id):
        raise InvalidRequest("invalid session id", param="session_id")
    headers = {"X-Session-Id": session_id}
    record = svc.store.get_session(session_id)
    if record is not None:
        caller.visible(record, session_id)
    if svc.turns.busy(session_id):
        return error_response(
            SessionBusy(f"session {session_id} is running a turn; run code afterwards"), headers
        )
    if record is None:
        svc.store.create_session(session_id, svc.settings.model_alias, caller.owner)
        caller.visible(svc.store.get_session(session_id), session_id)
    if record is None or not record.title:  # new, or made by an upload
        title = session_title(body.code, markdown=False) or "(code)"
        svc.store.update_session(session_id, title=title)
    done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()

    async def run(_emit: Any) -> None:
        try:
            done.set_result(
                await svc.agent.execute_direct(session_id, body.code, body.timeout, stop)
            )
        except BaseException as exc:
            done.set_exception(exc)
            if not isinstance(exc, Exception):
                raise

    try:
        await svc.turns.start(session_id, run, stop=stop)  # busy while the code runs
    except SessionBusy as exc:  # a turn began meanwhile, here or on another replica
        return error_response(exc, headers)
    event_id, outcome = await asyncio.shield(done)
    result = outcome.structured or {}
    base = str(request.base_url)
    images = [
        svc.output_url(base, session_id, name)
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


@router.post("/{session_id}/interrupt")
async def interrupt(session_id: str, svc: Svc, caller: Caller) -> dict[str, Any]:
    """Stop the session's running turn (or code run): the kernel is interrupted, its
    variables kept, and the turn ends without calling the model again.

    `interrupted` is false when nothing was running; the kernel is then left alone.
    """
    _visible(svc, caller, session_id)
    stopping = svc.turns.stop(session_id)
    if not stopping and await svc.replicas.held(session_id):
        # Another replica runs the turn (PostgreSQL): it hears the stop and acts on it.
        await svc.replicas.stop_turn(session_id)
        stopping = True
    if stopping:
        logger.info("session %s: stop asked", session_id)
    return {"id": session_id, "object": "session", "interrupted": stopping}


@router.get("/{session_id}/notebook")
async def get_notebook(session_id: str, svc: Svc, caller: Caller) -> Response:
    record = _visible(svc, caller, session_id)

    def build() -> str:
        return notebook.dumps(notebook.build_notebook(record, svc.store.events(session_id)))

    text = await asyncio.to_thread(build)
    return Response(
        text,
        media_type=notebook.MEDIA_TYPE,
        headers={"Content-Disposition": f'attachment; filename="{session_id}.ipynb"'},
    )


@router.get("/{session_id}/kernel")
async def get_kernel(session_id: str, svc: Svc, caller: Caller) -> dict[str, Any]:
    _visible(svc, caller, session_id)
    # A read starts nothing: a chat-only session answers `running: false`.
    outcome = await svc.kernels.call(session_id, "kernel_info", {"start": False})
    if outcome.is_error or not outcome.structured:
        raise KernelServiceError(f"kernel_info failed: {outcome.text}")
    return outcome.structured


@router.get("/{session_id}/outputs/{name}")
async def get_output(session_id: str, name: str, request: Request, svc: Svc) -> Response:
    signature = request.query_params.get("sig", "")
    if not (signature and svc.links.check(signature, session_id, name)):
        # No valid signed link: the caller's key must see the session.
        _visible(svc, svc.auth(request.headers.get("authorization")), session_id)
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
