"""Session files over plain HTTP, beside `/mcp`: file bodies too large for a tool call.

MCP tool calls carry JSON text (base64 would add a third, and clients refuse SSE events
over 1 MiB), so uploads and downloads of any size go through these routes, streamed in
both directions, never whole in memory:

    GET    /sessions/{id}/files             every file below the session folder
    GET    /sessions/{id}/files/{path}      one file's bytes
    PUT    /sessions/{id}/files/{path}      the body becomes that file (replacing it)
    DELETE /sessions/{id}/files/{path}      a file, a symlink (never its target), a folder

The session id is the one MCP calls name by `X-Session-Id`. The bearer token of `/mcp`
(`KERNEL_MCP_TOKEN`) is required here too. Every path goes through `SessionFiles`, which
walks directory descriptors with `O_NOFOLLOW`: a symlink the kernel made is never followed.
An upload is written to `<workspace>/.incoming/` (which no kernel sees) and renamed into
place whole, so the kernel never reads half a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastmcp import FastMCP
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from .config import Settings
from .errors import FileAccessError, FileMissing, FileTooLarge, InvalidSessionId
from .files import SessionFiles
from .sessions import SessionManager

logger = logging.getLogger(__name__)

_CHUNK = 1024 * 1024
_STAGING = ".incoming"


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "code": code}}, status_code=status)


def _refusal(exc: FileAccessError) -> JSONResponse:
    """A refused path: 404 when it does not exist, 413 too large, else 400."""
    if isinstance(exc, FileTooLarge):
        return _error(413, "file_too_large", str(exc))
    if isinstance(exc, FileMissing):
        return _error(404, "file_not_found", str(exc))
    return _error(400, "invalid_path", str(exc))


def add_file_routes(mcp: FastMCP, manager: SessionManager, settings: Settings) -> None:
    """Register the file routes on `mcp`'s HTTP app."""
    token = settings.token.get_secret_value().encode() if settings.token else None

    def refused(request: Request) -> JSONResponse | None:
        """401 unless the request carries the server's token (when it has one)."""
        if token is None:
            return None
        header = request.headers.get("authorization", "")
        given = header[7:].strip().encode() if header[:7].lower() == "bearer " else b""
        if given and hmac.compare_digest(given, token):
            return None
        return _error(401, "invalid_token", "missing or invalid bearer token (KERNEL_MCP_TOKEN)")

    def files_of(session_id: str) -> SessionFiles:
        folder = manager.folder(session_id)
        return SessionFiles(folder, settings.file_read_bytes, settings.file_write_bytes)

    async def listing(request: Request) -> Response:
        if (denied := refused(request)) is not None:
            return denied
        session_id = request.path_params["session_id"]
        try:
            files = files_of(session_id)
            kernel_folder = manager.kernel_folder(session_id)
        except InvalidSessionId as exc:
            return _error(400, "invalid_session_id", str(exc))
        if not files.root.is_dir():
            return JSONResponse({"files": [], "truncated": False, "folder": kernel_folder})
        try:
            entries, stop = await asyncio.to_thread(files.walk, settings.list_max_entries)
        except FileAccessError as exc:
            return _refusal(exc)
        return JSONResponse(
            {
                "files": entries,
                "truncated": stop is not None,
                "limit_reached": stop == "limit",
                "folder": kernel_folder,
            }
        )

    async def one_file(request: Request) -> Response:
        if (denied := refused(request)) is not None:
            return denied
        session_id = request.path_params["session_id"]
        path = request.path_params["path"]
        try:
            files = files_of(session_id)
        except InvalidSessionId as exc:
            return _error(400, "invalid_session_id", str(exc))
        try:
            if request.method == "GET":
                return await _download(files, path)
            if request.method == "DELETE":
                kind = await asyncio.to_thread(files.remove, path)
                logger.info("session %s: deleted %s %r", session_id, kind, path)
                return JSONResponse({"path": path, "deleted": kind})
            manager.session(session_id)  # the folder exists from here on
            return await _upload(request, files, manager.kernel_folder(session_id))
        except FileAccessError as exc:
            return _refusal(exc)

    async def _download(files: SessionFiles, path: str) -> Response:
        fd, info = await asyncio.to_thread(files.open_file, path)
        handle = os.fdopen(fd, "rb")

        async def body() -> AsyncIterator[bytes]:
            try:
                while chunk := await asyncio.to_thread(handle.read, _CHUNK):
                    yield chunk
            finally:
                handle.close()

        return StreamingResponse(
            body(),
            media_type="application/octet-stream",
            headers={"Content-Length": str(info.st_size)},
        )

    async def _upload(request: Request, files: SessionFiles, kernel_folder: str) -> Response:
        path = request.path_params["path"]
        files.parts(path)  # refuse a bad path before reading the body
        declared = request.headers.get("content-length", "")
        limit = settings.upload_max_bytes
        if declared.isdigit() and int(declared) > limit:
            raise FileTooLarge(
                f"the file is {int(declared):,} bytes, over the {limit:,}-byte limit"
            )
        staging = settings.workspace / _STAGING
        staging.mkdir(mode=0o700, parents=True, exist_ok=True)
        staged = f"{uuid.uuid4().hex}.part"
        staging_fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        placed = False
        try:
            fd = os.open(
                staged,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o644,
                dir_fd=staging_fd,
            )
            size = 0
            with os.fdopen(fd, "wb") as out:
                pending: list[bytes] = []
                held = 0
                try:
                    async for chunk in request.stream():
                        size += len(chunk)
                        if size > limit:
                            raise FileTooLarge(f"the file is over the {limit:,}-byte limit")
                        pending.append(chunk)
                        held += len(chunk)
                        if held >= _CHUNK:
                            await asyncio.to_thread(out.write, b"".join(pending))
                            pending, held = [], 0
                except ClientDisconnect:
                    logger.info("upload of %r cut short by the client", path)
                    return _error(400, "incomplete_upload", "the client went away mid-upload")
                if pending:
                    await asyncio.to_thread(out.write, b"".join(pending))
            await asyncio.to_thread(files.place, staging_fd, staged, path)
            placed = True
        finally:
            if not placed:
                with contextlib.suppress(OSError):
                    os.unlink(staged, dir_fd=staging_fd)
            os.close(staging_fd)
        clean = "/".join(files.parts(path))
        body: dict[str, Any] = {
            "path": clean,
            "size": size,
            "kernel_path": f"{kernel_folder.rstrip('/')}/{clean}",
        }
        return JSONResponse(body, status_code=201)

    mcp.custom_route("/sessions/{session_id}/files", methods=["GET"])(listing)
    mcp.custom_route("/sessions/{session_id}/files/{path:path}", methods=["GET", "PUT", "DELETE"])(
        one_file
    )
