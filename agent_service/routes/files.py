"""Session files over HTTP: upload, list, download, delete (`agent_service.files` does the work)."""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations.

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask
from starlette.datastructures import UploadFile

from .. import files
from ..conversation import SESSION_ID
from ..deps import Caller, Svc
from ..errors import InvalidRequest
from ..security import Principal
from ..services import Services

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/sessions", tags=["files"])

_MAX_FILES = 1000
_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "files": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": "One or more files (any field name; each part with a "
                        "filename is a file). Names are sanitised: the last path component, "
                        "control characters removed, at most 255 bytes.",
                    },
                    "folder": {
                        "type": "string",
                        "description": "Target folder relative to the session folder (made "
                        "if missing); absolute paths and '..' are refused.",
                    },
                },
                "required": ["files"],
            }
        }
    },
}
_PATH_PARAM = "A path relative to the session folder; symlinks are never followed."
_ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": "string", "nullable": True},
                "code": {"type": "string", "nullable": True},
            },
        }
    },
}


def _errors(**described: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries of the OpenAI-shaped errors a route answers."""
    return {
        int(status.removeprefix("e")): {
            "description": text,
            "content": {"application/json": {"schema": _ERROR_SCHEMA}},
        }
        for status, text in described.items()
    }


_NOT_YOURS = "No such session, or not the caller's (session_not_found)."
_BAD_PATH = "A path that is absolute, has '..' or a NUL, or goes through a symlink (invalid_path)."


def _visible(svc: Services, caller: Principal, session_id: str) -> None:
    caller.visible(svc.store.get_session(session_id), session_id)


@router.post(
    "/{session_id}/files",
    status_code=201,
    summary="Upload files into the session folder",
    description="Multipart upload of one or more files, at most AGENT_MAX_UPLOAD_BYTES in all "
    "(413 beyond). Existing files of the same name are replaced. The session is created if "
    "new. The model is told on its next turn which files arrived and where the kernel finds "
    "them.",
    openapi_extra={"requestBody": _UPLOAD_BODY},
    responses=_errors(
        e400="No files, or a target folder that leaves the session folder (invalid_path).",
        e404=_NOT_YOURS,
        e413="The upload exceeds AGENT_MAX_UPLOAD_BYTES (request_too_large).",
    ),
)
async def upload_files(
    session_id: str, request: Request, svc: Svc, caller: Caller
) -> dict[str, Any]:
    if not SESSION_ID.fullmatch(session_id):
        raise InvalidRequest("invalid session id", param="session_id", code="invalid_session_id")
    record = svc.store.get_session(session_id)
    if record is not None:
        caller.visible(record, session_id)
    form = await request.form(max_files=_MAX_FILES, max_fields=100)
    try:
        folder = files.check_folder(str(form.get("folder") or form.get("path") or ""))
        uploads = [(v.filename, v) for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not uploads:
            raise InvalidRequest(
                "no files in the request: send multipart/form-data parts with a filename",
                param="files",
                code="no_files",
            )
        saved = await files.save_files(
            svc, session_id, [(n, u.file) for n, u in uploads], folder, owner=caller.owner
        )
    finally:
        await form.close()
    caller.visible(svc.store.get_session(session_id), session_id)  # another key may have won
    return {"object": "list", "data": [f.as_json() for f in saved]}


@router.get(
    "/{session_id}/files",
    summary="List the session's files",
    description="Every file below the session folder (and symlinks, never followed): path, "
    "size in bytes, modification time (UTC, ISO 8601), type.",
    responses=_errors(e404=_NOT_YOURS),
)
async def list_files(session_id: str, svc: Svc, caller: Caller) -> dict[str, Any]:
    _visible(svc, caller, session_id)
    listing = await files.list_files(svc, session_id)
    return {
        "object": "list",
        "data": [f.as_json() for f in listing.files],
        "truncated": listing.truncated,
        "kernel_folder": listing.folder,
    }


@router.get(
    "/{session_id}/files/{path:path}",
    summary="Download a session file",
    description=f"The file's bytes, streamed. {_PATH_PARAM} A signed link (the `sig` query "
    "parameter of links listed in replies) needs no key.",
    response_class=StreamingResponse,
    responses=_errors(e400=_BAD_PATH, e401="No key and no valid signature.", e404=_NOT_YOURS),
)
async def download_file(session_id: str, path: str, request: Request, svc: Svc) -> Any:
    signature = request.query_params.get("sig", "")
    if not (signature and svc.links.check(signature, session_id, files.link_name(path))):
        _visible(svc, svc.auth(request.headers.get("authorization")), session_id)
    stack = contextlib.AsyncExitStack()
    download = await stack.enter_async_context(files.open_file(svc, session_id, path))

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in download.chunks():
                yield chunk
        finally:
            await stack.aclose()

    name = path.rsplit("/", 1)[-1]
    ascii_name = name.encode("ascii", "replace").decode().replace('"', "_").replace("?", "_")
    headers = {
        "Content-Disposition": f'attachment; filename="{ascii_name}"; '
        f"filename*=UTF-8''{quote(name, safe='')}",
        # Served from this origin: never rendered as a page (HTML, SVG) here.
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "sandbox",
        "Cache-Control": "private, no-cache",
    }
    if download.size is not None:
        headers["Content-Length"] = str(download.size)
    return StreamingResponse(
        body(),
        media_type=download.media_type,
        headers=headers,
        background=BackgroundTask(stack.aclose),  # also when the client left before the body
    )


@router.delete(
    "/{session_id}/files/{path:path}",
    summary="Delete a session file",
    description=f"Deletes a file, a symlink (never what it points to) or a folder. {_PATH_PARAM}",
    responses=_errors(e400=_BAD_PATH, e404=_NOT_YOURS + " Or no such file (file_not_found)."),
)
async def delete_file(session_id: str, path: str, svc: Svc, caller: Caller) -> dict[str, Any]:
    _visible(svc, caller, session_id)
    kind = await files.delete_file(svc, session_id, path)
    return {"path": path, "object": "session.file", "deleted": True, "type": kind}
