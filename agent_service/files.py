"""Session files: the user's data into the session folder, the agent's files out of it.

The bytes go through kernel_mcp's file routes (`/sessions/{id}/files[/{path}]` beside
`/mcp`, same token), streamed both ways: agent_service never opens the workspace, so
kernel_mcp may run on another host. kernel_mcp confines every path to the session folder
(directory descriptors, `O_NOFOLLOW`); names are also sanitised here first.

The interface for in-process callers (the routes, the chat turn, the web page), each taking
the services and a session id; ownership is the caller's to check (`Principal.visible`):

    await list_files(svc, sid)                    -> FileListing (files: path, size, modified)
    await save_files(svc, sid, [(name, data)], folder="", owner=None)
                                                  -> [SavedFile]; the model hears of them
    async with open_file(svc, sid, path) as d:    d.size, d.media_type, d.chunks()
    await delete_file(svc, sid, path)             -> "file" | "symlink" | "folder"
    file_link(svc, base_url, sid, path)           -> a download URL (signed when keys are on)
    safe_name(name), check_folder(folder)         the sanitising rules, for a page's preview
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import logging
import mimetypes
import re
import unicodedata
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import quote, unquote_to_bytes

import httpx

from .config import Settings
from .errors import InvalidRequest, KernelServiceError, NotFound, RequestTooLarge, ServiceError

if TYPE_CHECKING:
    from .services import Services

logger = logging.getLogger(__name__)

CHUNK = 1024 * 1024
_MAX_NAME_BYTES = 255  # a file name on Linux file systems
_MAX_FOLDER_CHARS = 1024
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")

FileData = bytes | BinaryIO | AsyncIterable[bytes]
"""What `save_files` takes: bytes, a binary file object (read in chunks), or chunks."""


@dataclass(frozen=True)
class SessionFile:
    """One entry of the session folder: a file, or a symlink (never followed)."""

    path: str
    size: int
    modified: str
    type: str = "file"

    def as_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "modified": self.modified, "type": self.type}


@dataclass(frozen=True)
class FileListing:
    files: list[SessionFile]
    truncated: bool
    folder: str
    """The session folder as the kernel sees it (its working folder)."""
    limit_reached: bool = False
    """It stopped at its entry limit: files past the last one, in walking order, are unseen."""


@dataclass(frozen=True)
class SavedFile:
    path: str
    """Relative to the session folder."""
    size: int
    kernel_path: str
    """Where the kernel finds it (absolute, as the kernel sees it)."""

    def as_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "kernel_path": self.kernel_path}


@dataclass
class Download:
    """An open download from kernel_mcp; read it with `chunks()` inside `open_file`."""

    path: str
    size: int | None
    media_type: str
    _response: httpx.Response

    async def chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self._response.aiter_bytes(CHUNK):
            yield chunk


def safe_name(name: str | None, fallback: str = "upload") -> str:
    """A client's file name as one safe name in a folder: never a path.

    Backslashes count as separators and only the last part is kept; control characters
    (NUL included) go; "." and ".." become `fallback`; at most 255 bytes, keeping the
    extension.
    """
    text = unicodedata.normalize("NFC", name or "").replace("\\", "/")
    text = _UNSAFE.sub("", text.rsplit("/", 1)[-1]).strip()
    if text in ("", ".", ".."):
        text = fallback
    if len(text.encode()) > _MAX_NAME_BYTES:
        stem, dot, ext = text.rpartition(".")
        ext = f".{ext}" if dot and stem and len(ext.encode()) <= 16 else ""
        stem = text[: len(text) - len(ext)] if ext else text
        room = _MAX_NAME_BYTES - len(ext.encode())
        stem = stem.encode()[:room].decode(errors="ignore")
        text = stem + ext
    return text


def check_folder(folder: str | None) -> str:
    """A target folder relative to the session folder, or InvalidRequest.

    Unlike names, folders are refused rather than rewritten: the client asked for a place.
    """
    text = (folder or "").strip()
    param = "folder"
    if _UNSAFE.search(text) or "\\" in text:
        raise InvalidRequest(
            "folder contains control characters or backslashes", param=param, code="invalid_path"
        )
    if text.startswith("/"):
        raise InvalidRequest(
            f"folder {text!r} is absolute; give one relative to the session folder",
            param=param,
            code="invalid_path",
        )
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidRequest(
            f"folder {text!r} leaves the session folder ('..')", param=param, code="invalid_path"
        )
    if len(text) > _MAX_FOLDER_CHARS or any(len(p.encode()) > _MAX_NAME_BYTES for p in parts):
        raise InvalidRequest("folder name too long", param=param, code="invalid_path")
    return "/".join(parts)


def check_path(path: str) -> str:
    """A file path named by a client (download, delete), or InvalidRequest."""
    if not path or "\x00" in path:
        raise InvalidRequest("empty path or a NUL byte in it", param="path", code="invalid_path")
    if path.startswith("/"):
        raise InvalidRequest(
            f"{path[:200]!r} is absolute; give a path relative to the session folder",
            param="path",
            code="invalid_path",
        )
    if ".." in path.replace("\\", "/").split("/"):
        raise InvalidRequest(
            f"{path[:200]!r} leaves the session folder ('..')", param="path", code="invalid_path"
        )
    return path


def media_type(path: str) -> str:
    guessed, _ = mimetypes.guess_type(path, strict=False)
    return guessed or "application/octet-stream"


def _translate(response: httpx.Response, what: str) -> ServiceError:
    """kernel_mcp's refusal as our error (its message names the problem)."""
    try:
        error = response.json().get("error") or {}
        message = str(error.get("message") or response.text)
    except ValueError:
        message = response.text[:500]
    if response.status_code == 404 and error.get("code") == "file_not_found":
        return NotFound(message, code="file_not_found")
    if response.status_code == 413:
        return RequestTooLarge(f"{message} (KERNEL_MCP_UPLOAD_MAX_BYTES)", code="file_too_large")
    if response.status_code == 400:
        return InvalidRequest(message, param="path", code=error.get("code") or "invalid_path")
    if response.status_code == 404:
        return KernelServiceError(
            f"the kernel service has no file routes ({what}): an older kernel_mcp, or another "
            "MCP server"
        )
    return KernelServiceError(f"the kernel service refused {what}: {message}")


def files_url(settings: Settings) -> str:
    """kernel_mcp's base URL of the file routes: `AGENT_MCP_URL` with `/mcp` replaced."""
    if settings.mcp_files_url:
        return settings.mcp_files_url.rstrip("/")
    base = settings.mcp_url.rstrip("/")
    return base.rsplit("/", 1)[0] if base.endswith("/mcp") else base


class KernelFiles:
    """An HTTP client of kernel_mcp's file routes (one connection pool for the service)."""

    def __init__(self, settings: Settings) -> None:
        token = settings.mcp_token.get_secret_value() if settings.mcp_token else None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(
            base_url=files_url(settings),
            headers=headers,
            timeout=httpx.Timeout(settings.file_timeout, connect=10.0),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    @staticmethod
    def _url(session_id: str, path: str = "") -> str:
        url = f"/sessions/{quote(session_id, safe='')}/files"
        return f"{url}/{quote(path, safe='/')}" if path else url

    async def _send(
        self, what: str, request: httpx.Request, stream: bool = False
    ) -> httpx.Response:
        try:
            response = await self._http.send(request, stream=stream)
        except httpx.HTTPError as exc:
            raise KernelServiceError(f"the kernel service failed during {what}: {exc}") from exc
        if response.status_code >= 400:
            if stream:
                await response.aread()
                await response.aclose()
            raise _translate(response, what)
        return response

    async def listing(self, session_id: str) -> FileListing:
        request = self._http.build_request("GET", self._url(session_id))
        body = (await self._send("listing files", request)).json()
        files = [
            SessionFile(**{k: e[k] for k in ("path", "size", "modified", "type")})
            for e in body["files"]
        ]
        return FileListing(
            files,
            bool(body.get("truncated")),
            str(body.get("folder", "")),
            bool(body.get("limit_reached")),
        )

    async def put(self, session_id: str, path: str, data: AsyncIterable[bytes]) -> SavedFile:
        request = self._http.build_request("PUT", self._url(session_id, path), content=data)
        body = (await self._send(f"saving {path!r}", request)).json()
        return SavedFile(str(body["path"]), int(body["size"]), str(body["kernel_path"]))

    async def delete(self, session_id: str, path: str) -> str:
        request = self._http.build_request("DELETE", self._url(session_id, path))
        return str((await self._send(f"deleting {path!r}", request)).json()["deleted"])

    @contextlib.asynccontextmanager
    async def open(self, session_id: str, path: str) -> AsyncIterator[Download]:
        request = self._http.build_request("GET", self._url(session_id, path))
        response = await self._send(f"reading {path!r}", request, stream=True)
        try:
            length = response.headers.get("content-length")
            size = int(length) if length and length.isdigit() else None
            yield Download(path, size, media_type(path), response)
        finally:
            await response.aclose()


async def _chunks(data: FileData) -> AsyncIterator[bytes]:
    if isinstance(data, bytes):
        for start in range(0, len(data), CHUNK):
            yield data[start : start + CHUNK]
        if not data:
            yield b""
    elif isinstance(data, AsyncIterable):
        async for chunk in data:
            yield chunk
    else:
        while chunk := await asyncio.to_thread(data.read, CHUNK):
            yield chunk


async def list_files(svc: Services, session_id: str) -> FileListing:
    """Every file of the session folder (path, size, modified), sorted by path."""
    return await svc.files.listing(session_id)


async def save_files(
    svc: Services,
    session_id: str,
    uploads: Sequence[tuple[str | None, FileData]],
    folder: str = "",
    *,
    owner: str | None = None,
    tell_model: bool = True,
) -> list[SavedFile]:
    """Save `(name, data)` pairs into `folder` of the session folder, names sanitised.

    The session is created (for `owner`) if new. With `tell_model`, the model hears on its
    next turn which files arrived and where (a note in the transcript).
    """
    target = check_folder(folder)
    if svc.store.get_session(session_id) is None:
        svc.store.create_session(session_id, svc.settings.model_alias, owner)
    saved: list[SavedFile] = []
    try:
        for name, data in uploads:
            clean = safe_name(name)
            path = f"{target}/{clean}" if target else clean
            saved.append(await svc.files.put(session_id, path, _chunks(data)))
            logger.info("session %s: saved %s (%d bytes)", session_id, path, saved[-1].size)
    finally:  # a refused file still leaves the ones before it: the model hears of those
        if tell_model and saved:
            svc.agent.add_note(session_id, upload_note(saved))
    return saved


def upload_note(saved: list[SavedFile], *, attached: bool = False) -> dict[str, Any]:
    """The transcript note on files that arrived: a line for people, one for the model."""
    listed = ", ".join(f"{f.path} ({f.size:,} bytes)" for f in saved)
    where = "; ".join(f"{f.path} -> {f.kernel_path}" for f in saved)
    how = "attached to the message" if attached else "uploaded"
    return {
        "kind": "files_uploaded",
        "text": f"Files {how}, saved in the session folder: {listed}.",
        "for_model": (
            f"The user {how} {len(saved)} file(s), now in the session folder (your working "
            f"folder; relative paths work): {where}. Read them with code in the kernel."
        ),
        "files": [f.as_json() for f in saved],
    }


@contextlib.asynccontextmanager
async def open_file(svc: Services, session_id: str, path: str) -> AsyncIterator[Download]:
    """A file of the session folder, streamed: `async for chunk in download.chunks()`."""
    async with svc.files.open(session_id, check_path(path)) as download:
        yield download


async def delete_file(svc: Services, session_id: str, path: str) -> str:
    """Delete a file, a symlink (never its target) or a folder; returns which it was."""
    return await svc.files.delete(session_id, check_path(path))


def file_link(svc: Services, base_url: str, session_id: str, path: str) -> str:
    """A download link of a session file; signed (and expiring) when client keys are on."""
    url = f"{base_url.rstrip('/')}/v1/sessions/{session_id}/files/{quote(path, safe='/')}"
    if svc.settings.auth_required:
        url += f"?sig={svc.links.sign(session_id, link_name(path))}"
    return url


def link_name(path: str) -> str:
    """What a file link's signature names (apart from image outputs' names)."""
    return f"files/{path}"


_DATA_URL = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*?)(?P<b64>;base64)?,", re.I)


def attachments(parts: list[Any]) -> list[tuple[str, bytes]]:
    """Files in a user message's content parts, as (sanitised name, bytes).

    OpenAI `file` parts (`file.filename`, `file.file_data` as a data URL) and `image_url`
    parts whose URL is a data URL; an `image_url` on the web is left alone (not fetched).

    Raises:
        InvalidRequest: a part that names a file but cannot be read (bad data URL, file_id).
    """
    found: list[tuple[str, bytes]] = []
    for index, part in enumerate(parts):
        kind = getattr(part, "type", None)
        extra = getattr(part, "model_extra", None) or {}
        param = f"messages[-1].content[{index}]"
        if kind == "file":
            spec = extra.get("file") or {}
            if not isinstance(spec, dict) or not spec.get("file_data"):
                raise InvalidRequest(
                    "a file part needs file.file_data (a data: URL); file_id is not supported "
                    "here: upload with POST /v1/sessions/{id}/files instead",
                    param=param,
                    code="unsupported_file_part",
                )
            data, mime = _decode_data_url(str(spec["file_data"]), param)
            name = spec.get("filename") or f"file-{_digest(data)}{_extension(mime)}"
            found.append((safe_name(str(name)), data))
        elif kind == "image_url":
            spec = extra.get("image_url") or {}
            url = str(spec.get("url", "")) if isinstance(spec, dict) else str(spec)
            if not url.lower().startswith("data:"):
                continue
            data, mime = _decode_data_url(url, param)
            found.append((f"image-{_digest(data)}{_extension(mime) or '.png'}", data))
    return found


def _decode_data_url(url: str, param: str) -> tuple[bytes, str]:
    match = _DATA_URL.match(url)
    if match is None:
        raise InvalidRequest(
            "file data must be a data: URL (data:<mime>;base64,...)",
            param=param,
            code="invalid_file_data",
        )
    payload = url[match.end() :]
    if not match.group("b64"):
        return unquote_to_bytes(payload), match.group("mime").lower()
    try:
        return base64.b64decode(payload, validate=True), match.group("mime").lower()
    except (binascii.Error, ValueError):
        raise InvalidRequest(
            "file data is not valid base64", param=param, code="invalid_file_data"
        ) from None


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:8]


def _extension(mime: str) -> str:
    if mime == "image/jpeg":
        return ".jpg"
    return mimetypes.guess_extension(mime, strict=False) or ""


def size_text(size: int) -> str:
    """A byte count for people (24 bytes, 22.9 KB), in the decimal units the replies use."""
    value, unit = float(size), "bytes"
    for larger in ("KB", "MB", "GB"):
        if value < 1000:
            break
        value, unit = value / 1000, larger
    return f"{size:,} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
