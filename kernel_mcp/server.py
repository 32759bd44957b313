"""The MCP server: a thin adapter from MCP tools to the kernel layer.

Tools never take a session argument. The session is the caller's `X-Session-Id`
header, else the MCP session id, so a model cannot reach another session's kernel.
"""

# No `from __future__ import annotations`: tool signatures use values from create_server.

import asyncio
import contextlib
import contextvars
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from importlib.metadata import version
from typing import Annotated, Any

from fastmcp import Context, FastMCP
from fastmcp.exceptions import ToolError
from fastmcp.server.dependencies import get_http_headers
from fastmcp.tools import ToolResult
from mcp_types import ImageContent, TextContent
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import Field
from starlette.requests import Request
from starlette.responses import JSONResponse

from . import sandbox
from .backend import Message
from .config import Settings
from .errors import CapacityError, FileAccessError, InvalidSessionId, KernelError
from .files import SessionFiles
from .outputs import shrink
from .prompt import system_prompt
from .rendering import render, strip_ansi
from .sessions import SessionManager, validate_session_id
from .skills import SkillsLibrary

logger = logging.getLogger(__name__)

__version__ = version("kernel-agent")

STDIO_SESSION = "stdio"
_LIVE_CHUNK = 8192


def session_key(ctx: Context) -> str:
    """The caller's session: X-Session-Id, else a stable MCP session id."""
    header = get_http_headers().get("x-session-id")
    if header:
        try:
            return validate_session_id(header.strip())
        except InvalidSessionId as exc:
            raise ToolError(f"invalid X-Session-Id header: {exc}") from None
    if ctx.transport == "stdio":
        return STDIO_SESSION  # one stdio server process serves exactly one client
    request_context = ctx.request_context
    if request_context is not None and request_context.protocol_version in MODERN_PROTOCOL_VERSIONS:
        raise ToolError(
            "This server keeps one kernel per session, and this connection's MCP protocol "
            "version has no sessions. Send an X-Session-Id header (any stable id of yours) "
            "with every request, or connect with protocol version 2025-11-25."
        )
    digest = hashlib.sha256(ctx.session_id.encode()).hexdigest()[:32]
    return f"mcp-{digest}"


class _LiveOutput:
    """Forwards a running cell's output to the client as it arrives, coalesced."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._pending: list[str] = []
        self._wake = asyncio.Event()
        self._closed = False
        self._sent = 0
        self._task: asyncio.Task[None] | None = None  # started by the first output
        # The kernel reader calls on_output outside the tool call: keep the MCP request context.
        self._context = contextvars.copy_context()

    def on_output(self, msg: Message) -> None:
        msg_type = msg["header"]["msg_type"]
        content = msg["content"]
        if msg_type == "stream":
            self._pending.append(content.get("text", ""))
        elif msg_type == "display_data":
            data = content.get("data", {})
            kinds = [m for m in data if m.startswith("image/")]
            self._pending.append(f"[{kinds[0]}]\n" if kinds else str(data.get("text/plain", "")))
        elif msg_type == "error":
            self._pending.append(f"{content.get('ename')}: {content.get('evalue')}\n")
        else:
            return
        if self._task is None:
            self._task = asyncio.create_task(self._pump(), context=self._context)
        self._wake.set()

    async def _pump(self) -> None:
        while not (self._closed and not self._pending):
            await self._wake.wait()
            self._wake.clear()
            if not self._pending:
                continue
            text, self._pending = "".join(self._pending), []
            text = strip_ansi(text)
            if len(text) > _LIVE_CHUNK:
                text = f"{text[: _LIVE_CHUNK // 2]}\n[...]\n{text[-_LIVE_CHUNK // 2 :]}"
            self._sent += 1
            try:
                await self._ctx.report_progress(self._sent, None, text)
                await self._ctx.log(text, level="info", logger_name="kernel.output")
            except Exception:
                logger.warning("live output notification failed", exc_info=True)

    async def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self._task is None:
            return
        try:
            async with asyncio.timeout(2):
                await self._task
        except TimeoutError:
            self._task.cancel()


def _approx_size(outputs: list[dict[str, Any]]) -> int:
    """Characters in the outputs' payloads (JSON escaping may add to it)."""
    size = 0
    for output in outputs:
        size += len(output.get("text", "")) + 64
        size += sum(len(str(v)) for v in output.get("data", {}).values())
        size += sum(len(line) for line in output.get("traceback", []))
    return size


def _fit_structured(structured: dict[str, Any], budget: int) -> None:
    """Shrink the outputs in place until the serialized result fits `budget` bytes."""
    for _ in range(4):
        size = len(json.dumps(structured))
        if size <= budget:
            return
        keys = ("outputs", "background_outputs")
        payload = sum(len(json.dumps(structured[k])) for k in keys)
        cap = max(1024, int(payload * max(budget - (size - payload), 0) / size * 0.9))
        for key in keys:
            outputs, dropped = shrink(structured[key], cap if key == "outputs" else cap // 8)
            structured[key] = outputs
            structured["truncated_bytes"] += dropped
            structured["truncated"] = structured["truncated"] or dropped > 0
    logger.warning("a result still exceeds %d bytes after shrinking", budget)


def _tool_error(exc: Exception) -> ToolError:
    if isinstance(exc, CapacityError):
        return ToolError(f"No kernel available: {exc}.")
    return ToolError(str(exc))


def create_server(settings: Settings | None = None) -> FastMCP:
    """Build the kernel_mcp FastMCP server; its lifespan owns every kernel."""
    settings = settings or Settings()
    manager = SessionManager(settings)
    skills = SkillsLibrary(settings.skills_dir)

    @contextlib.asynccontextmanager
    async def lifespan(server: FastMCP) -> AsyncIterator[dict[str, Any]]:
        await manager.start()
        try:
            yield {"manager": manager}
        finally:
            await manager.close()

    auth = None
    if settings.token is not None:
        from fastmcp.server.auth.providers.jwt import StaticTokenVerifier

        auth = StaticTokenVerifier(
            tokens={settings.token.get_secret_value(): {"client_id": "kernel-agent", "scopes": []}}
        )

    mcp = FastMCP(
        "kernel-agent",
        instructions=(
            "Python in a persistent Jupyter kernel of your own. Variables persist across "
            "execute_code calls; files live in your session folder. Read a skill before "
            "relying on it."
        ),
        lifespan=lifespan,
        auth=auth,
        providers=[skills],
    )

    def files_for(ctx: Context) -> SessionFiles:
        session = manager.session(session_key(ctx))
        return SessionFiles(session.folder, settings.file_read_bytes, settings.file_write_bytes)

    @mcp.tool(annotations={"title": "Run Python code", "openWorldHint": False})
    async def execute_code(
        code: Annotated[str, Field(description="Python code to run in the session's kernel.")],
        ctx: Context,
        timeout: Annotated[
            float | None,
            Field(
                description="Seconds before the code is interrupted "
                f"(default {settings.execute_timeout:g}, max {settings.max_execute_timeout:g}).",
                gt=0,
                le=settings.max_execute_timeout,
            ),
        ] = None,
    ) -> ToolResult:
        """Run Python code in this session's persistent kernel and return its output.

        Variables, imports and functions persist across calls. The value of the last
        expression is shown; use print() or display() for more. Figures come back as images.
        """
        sid = session_key(ctx)
        live = _LiveOutput(ctx)
        try:
            result = await manager.execute(sid, code, timeout=timeout, on_output=live.on_output)
        except (KernelError, ValueError) as exc:
            raise _tool_error(exc) from exc
        finally:
            await live.close()
        rendered = render(
            result, text_limit=settings.model_text_chars, image_max_bytes=settings.image_max_bytes
        )
        structured = result.to_dict()
        images = rendered.images
        image_bytes = sum(len(i.data) for i in images)
        estimate = len(rendered.text) + image_bytes + _approx_size(result.outputs)
        # JSON escaping grows text at most 6x: below an eighth of the bound it surely fits.
        if estimate > settings.result_max_bytes // 8:
            budget = settings.result_max_bytes - len(json.dumps(rendered.text))
            if image_bytes > budget // 3:
                images = []  # the full images stay in the structured outputs
                rendered.text += "\n[images omitted from this message: too large; see outputs]"
            _fit_structured(structured, budget - sum(len(i.data) for i in images))
        content: list[TextContent | ImageContent] = [TextContent(type="text", text=rendered.text)]
        content += [ImageContent(type="image", data=i.data, mime_type=i.mime_type) for i in images]
        return ToolResult(content=content, structured_content=structured)

    @mcp.tool(annotations={"readOnlyHint": True})
    async def list_variables(ctx: Context) -> ToolResult:
        """List the variables defined in this session's kernel: name, type and a short repr."""
        try:
            rows = await manager.list_variables(session_key(ctx))
        except KernelError as exc:
            raise _tool_error(exc) from exc
        text = (
            "\n".join(f"{r['name']}: {r['type']} = {r['repr']}" for r in rows)
            or "[no variables defined]"
        )
        return ToolResult(content=text, structured_content={"variables": rows})

    @mcp.tool
    async def interrupt_kernel(ctx: Context) -> str:
        """Interrupt the code running in this session's kernel (KeyboardInterrupt)."""
        try:
            sent = await manager.interrupt(session_key(ctx))
        except KernelError:
            sent = False
        return "Interrupt sent." if sent else "No kernel is running for this session."

    @mcp.tool(annotations={"destructiveHint": True})
    async def restart_kernel(ctx: Context) -> str:
        """Restart this session's kernel: all variables are lost; files are kept."""
        try:
            await manager.restart(session_key(ctx))
        except KernelError as exc:
            raise _tool_error(exc) from exc
        return "The kernel was restarted; variables defined earlier are gone, files are kept."

    @mcp.tool(annotations={"destructiveHint": True})
    async def shutdown_kernel(
        ctx: Context,
        delete_files: Annotated[
            bool,
            Field(description="Also delete the session folder (when the session is deleted)."),
        ] = False,
    ) -> str:
        """Shut this session's kernel down to free its memory; files are kept.

        The next execute_code starts a fresh kernel (earlier variables are gone).
        """
        if delete_files:
            closed = await manager.delete_session(session_key(ctx))
            done = "The kernel was shut down" if closed else "No kernel was running"
            return f"{done}; the session folder was deleted."
        closed = await manager.close_session(session_key(ctx))
        return "The kernel was shut down." if closed else "No kernel was running for this session."

    @mcp.tool(annotations={"readOnlyHint": True})
    async def list_files(
        ctx: Context,
        path: Annotated[str, Field(description="Folder relative to the session folder.")] = ".",
    ) -> ToolResult:
        """List the files in this session's folder (or a subfolder of it)."""
        try:
            entries = files_for(ctx).list(path)
        except FileAccessError as exc:
            raise ToolError(str(exc)) from None
        lines = [
            f"{e['path']}{'/' if e['type'] == 'dir' else ''}  {e['size']:,} bytes" for e in entries
        ]
        return ToolResult(
            content="\n".join(lines) or "[empty folder]", structured_content={"files": entries}
        )

    @mcp.tool(annotations={"readOnlyHint": True})
    async def read_file(
        path: Annotated[str, Field(description="File path relative to the session folder.")],
        ctx: Context,
    ) -> str:
        """Read a UTF-8 text file from this session's folder."""
        try:
            return files_for(ctx).read_text(path)
        except FileAccessError as exc:
            raise ToolError(str(exc)) from None

    @mcp.tool
    async def write_file(
        path: Annotated[str, Field(description="File path relative to the session folder.")],
        content: Annotated[str, Field(description="Text to write (UTF-8); replaces the file.")],
        ctx: Context,
    ) -> str:
        """Write a text file into this session's folder (folders are created as needed)."""
        try:
            size = files_for(ctx).write_text(path, content)
        except FileAccessError as exc:
            raise ToolError(str(exc)) from None
        return f"Wrote {size:,} bytes to {path}."

    @mcp.tool(annotations={"readOnlyHint": True})
    async def read_skill(
        name: Annotated[str, Field(description="Skill name, as in the skills index.")],
        path: Annotated[
            str, Field(description="A file of the skill; SKILL.md holds its instructions.")
        ] = "SKILL.md",
    ) -> str:
        """Read a skill's instructions (SKILL.md) or one of its files."""
        try:
            return skills.read(name, path)
        except KeyError as exc:
            raise ToolError(str(exc.args[0])) from None

    @mcp.tool(annotations={"readOnlyHint": True})
    async def kernel_info(ctx: Context) -> ToolResult:
        """This session's kernel: id, language, connection file and how to attach a console."""
        sid = session_key(ctx)
        try:
            info = await manager.kernel_info(sid)
        except KernelError as exc:
            raise _tool_error(exc) from exc
        data = {
            "session_id": sid,
            "kernel_id": info.kernel_id,
            "pid": info.pid,
            "language_info": info.language_info,
            "connection_file": info.connection_file,
            "console_command": info.console_command,
            "folder": str(manager.session(sid).folder),
        }
        return ToolResult(content=json.dumps(data, indent=2), structured_content=data)

    @mcp.prompt(name="agent_system_prompt")
    def agent_system_prompt() -> str:
        """How to work with these tools, and the index of available skills."""
        return system_prompt(skills.index())

    @mcp.custom_route("/health", methods=["GET"])
    async def health(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "status": "ok",
                "version": __version__,
                **manager.stats(),
                **sandbox.status(settings),  # "sandbox": "none" comes with a warning
            }
        )

    @mcp.custom_route("/skills", methods=["GET"])
    async def list_skills(request: Request) -> JSONResponse:
        return JSONResponse(skills.index())

    return mcp
