"""The MCP server: a thin adapter from MCP tools to the kernel layer.

Each call's session comes from `routing` (X-Session-Id header, MCP session, stdio,
or a `session` handle argument); each `execute_code` result is built within one
byte budget by `results` and follows the `kernel_schema.ExecuteResult` schema.
A Python exception in the user's code is a successful result whose status is
`error`; only faults of ours (and refused arguments) are tool errors (`isError`).
"""

# No `from __future__ import annotations`: tool signatures use values from create_server.

import asyncio
import contextlib
import contextvars
import json
import logging
from collections.abc import AsyncIterator, Iterator
from importlib.metadata import version
from typing import Annotated, Any

from fastmcp import Context, FastMCP
from fastmcp.exceptions import ToolError
from fastmcp.tools import ToolResult
from mcp_types import ImageContent, TextContent
from pydantic import Field
from starlette.requests import Request
from starlette.responses import JSONResponse

from kernel_schema import ExecuteResult, KernelInfoResult, NewSessionResult, incarnation_of

from . import sandbox
from .backend import KernelInfo, Message
from .config import Settings
from .errors import CapacityError, FileAccessError, KernelError, SessionNotFound
from .file_routes import add_file_routes
from .files import SessionFiles
from .prompt import system_prompt
from .rendering import strip_ansi
from .results import Budget, Identity, build_result
from .routing import HandleRegistry, Route, SessionRouter
from .sessions import SessionManager
from .skills import SkillsLibrary

logger = logging.getLogger(__name__)

__version__ = version("kernel-agent")

_LIVE_CHUNK = 8192

SessionArg = Annotated[
    str | None,
    Field(
        description="Session handle from new_session (or named by an earlier result). Leave "
        "it out when your connection has its own session (X-Session-Id header, MCP session); "
        "without any, a new session is started and its handle returned."
    ),
]


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


def _tool_error(exc: Exception) -> ToolError:
    if isinstance(exc, CapacityError):
        return ToolError(f"No kernel available: {exc}.")
    return ToolError(str(exc))


def _hint(route: Route) -> str:
    if not route.created:
        return ""
    return (
        f'\n[new session {route.handle}: pass session="{route.handle}" to later calls to '
        "keep these variables and files]"
    )


def create_server(settings: Settings | None = None) -> FastMCP:
    """Build the kernel_mcp FastMCP server; its lifespan owns every kernel."""
    settings = settings or Settings()
    manager = SessionManager(settings)
    skills = SkillsLibrary(settings.skills_dir)
    handles = HandleRegistry(settings.idle_timeout)
    closing: set[asyncio.Task[Any]] = set()
    budget = Budget(
        result_bytes=settings.result_max_bytes,
        model_text_chars=settings.model_text_chars,
        image_bytes=settings.image_max_bytes,
    )

    def end_session(key: str) -> None:
        """Shut a session's kernel down in the background (its MCP session or handle ended)."""
        task = asyncio.create_task(manager.close_session(key), name=f"close-{key[:12]}")
        closing.add(task)
        task.add_done_callback(closing.discard)

    async def on_mcp_session_end(key: str) -> None:
        end_session(key)

    router = SessionRouter(handles, on_mcp_session_end)

    async def sweep_handles() -> None:
        interval = min(settings.cull_interval, settings.idle_timeout / 2)
        while True:
            await asyncio.sleep(interval)
            for handle in handles.expired():
                logger.info("session %s: handle idle past the timeout; closing", handle[:8])
                end_session(handle)

    @contextlib.asynccontextmanager
    async def lifespan(server: FastMCP) -> AsyncIterator[dict[str, Any]]:
        await manager.start()
        sweeper = asyncio.create_task(sweep_handles(), name="handle-sweeper")
        try:
            yield {"manager": manager}
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await asyncio.gather(*closing, return_exceptions=True)
            await manager.close()

    auth = None
    if settings.token is not None:
        from fastmcp.server.auth.providers.jwt import StaticTokenVerifier

        auth = StaticTokenVerifier(
            tokens={settings.token.get_secret_value(): {"client_id": "kernel-agent", "scopes": []}}
        )

    mcp = FastMCP(
        "kernel-agent",
        version=__version__,
        instructions=(
            "Python in a persistent Jupyter kernel of your own. Variables persist across "
            "execute_code calls; files live in your session folder. Read a skill before "
            "relying on it. Without an X-Session-Id header or MCP session, call new_session "
            "once and pass its handle as `session` to every call."
        ),
        lifespan=lifespan,
        auth=auth,
        providers=[skills],
    )

    def route_of(ctx: Context, session: str | None, *, create: bool = True) -> Route:
        route = router.resolve(ctx, session, create=create)
        assert route is not None
        return route

    @contextlib.contextmanager
    def calling(route: Route) -> Iterator[None]:
        """Keep a handle alive while its call runs; a failed first call frees its session."""
        if route.handle is None:
            yield
            return
        with handles.using(route.handle):
            try:
                yield
            except BaseException:
                if route.created:
                    handles.forget(route.handle)
                    end_session(route.key)
                raise

    def identity(route: Route) -> Identity:
        """The session's handle and current kernel incarnation (read without awaiting)."""
        ident = Identity(handle=route.handle, created=route.created)
        try:
            kernel = manager.existing(route.key).kernel
        except SessionNotFound:
            kernel = None
        if kernel is not None:
            ident.kernel_id = kernel.connection.kernel_id
            ident.generation = kernel.connection.generation
        return ident

    def files_for(route: Route) -> SessionFiles:
        session = manager.session(route.key)
        return SessionFiles(session.folder, settings.file_read_bytes, settings.file_write_bytes)

    @mcp.tool(annotations={"title": "Start a session", "openWorldHint": False})
    async def new_session(ctx: Context) -> ToolResult:
        """Start a new session (a kernel of your own) and return its handle.

        Pass the handle as `session` to every later call. Needed only by clients without an
        X-Session-Id header or MCP session; idle sessions end after a while.
        """
        bound = router.bound(ctx)
        if bound is not None:
            raise ToolError(
                f"This connection already has its session ({bound}), and every call reaches "
                "it; new_session is for clients without one. Open another connection (another "
                "X-Session-Id) for another session."
            )
        handle = handles.mint()
        data = NewSessionResult(session=handle).model_dump()
        text = f'New session: {handle}\nPass session="{handle}" to every later call.'
        return ToolResult(content=text, structured_content=data)

    @mcp.tool(
        annotations={"title": "Run Python code", "openWorldHint": False},
        output_schema=ExecuteResult.model_json_schema(),
    )
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
        session: SessionArg = None,
    ) -> ToolResult:
        """Run Python code in this session's persistent kernel and return its output.

        Variables, imports and functions persist across calls. The value of the last
        expression is shown; use print() or display() for more. Figures come back as images.
        An exception in the code is reported in the result (status "error").
        """
        route = route_of(ctx, session)
        live = _LiveOutput(ctx)
        with calling(route):
            try:
                result = await manager.execute(
                    route.key, code, timeout=timeout, on_output=live.on_output
                )
                ident = identity(route)
            except (KernelError, ValueError) as exc:
                raise _tool_error(exc) from exc
            finally:
                await live.close()
            folder = manager.session(route.key).folder
            built = await build_result(result, budget, ident, folder)
        content: list[TextContent | ImageContent] = [
            TextContent(type="text", text=built.text + _hint(route))
        ]
        content += [
            ImageContent(type="image", data=i.data, mime_type=i.mime_type) for i in built.images
        ]
        return ToolResult(content=content, structured_content=built.structured)

    @mcp.tool(annotations={"readOnlyHint": True})
    async def list_variables(ctx: Context, session: SessionArg = None) -> ToolResult:
        """List the variables defined in this session's kernel: name, type and a short repr."""
        route = route_of(ctx, session)
        with calling(route):
            try:
                rows = await manager.list_variables(route.key)
            except KernelError as exc:
                raise _tool_error(exc) from exc
        text = (
            "\n".join(f"{r['name']}: {r['type']} = {r['repr']}" for r in rows)
            or "[no variables defined]"
        )
        return ToolResult(
            content=text + _hint(route),
            structured_content={"variables": rows, "session": route.handle},
        )

    @mcp.tool
    async def interrupt_kernel(ctx: Context, session: SessionArg = None) -> str:
        """Interrupt the code running in this session's kernel (KeyboardInterrupt)."""
        route = router.resolve(ctx, session, create=False)
        if route is None:
            return "No session given: pass `session` to interrupt its kernel."
        with calling(route):
            try:
                sent = await manager.interrupt(route.key)
            except KernelError:
                sent = False
        return "Interrupt sent." if sent else "No kernel is running for this session."

    @mcp.tool(annotations={"destructiveHint": True})
    async def restart_kernel(ctx: Context, session: SessionArg = None) -> str:
        """Restart this session's kernel: all variables are lost; files are kept."""
        route = router.resolve(ctx, session, create=False)
        if route is None:
            return "No session given: pass `session` to restart its kernel."
        with calling(route):
            try:
                await manager.restart(route.key)
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
        session: SessionArg = None,
    ) -> str:
        """Shut this session's kernel down to free its memory; files are kept.

        The next execute_code starts a fresh kernel (earlier variables are gone).
        """
        route = router.resolve(ctx, session, create=False)
        if route is None:
            return "No session given: pass `session` to shut its kernel down."
        with calling(route):
            if delete_files:
                closed = await manager.delete_session(route.key)
                if route.handle is not None:
                    handles.forget(route.handle)  # the session is gone, not just its kernel
                done = "The kernel was shut down" if closed else "No kernel was running"
                return f"{done}; the session folder was deleted."
            closed = await manager.close_session(route.key)
        return "The kernel was shut down." if closed else "No kernel was running for this session."

    @mcp.tool(annotations={"readOnlyHint": True})
    async def list_files(
        ctx: Context,
        path: Annotated[str, Field(description="Folder relative to the session folder.")] = ".",
        session: SessionArg = None,
    ) -> ToolResult:
        """List the files in this session's folder (or a subfolder of it)."""
        route = route_of(ctx, session)
        with calling(route):
            try:
                entries = files_for(route).list(path)
            except FileAccessError as exc:
                raise ToolError(str(exc)) from None
        lines = [
            f"{e['path']}{'/' if e['type'] == 'dir' else ''}  {e['size']:,} bytes" for e in entries
        ]
        return ToolResult(
            content=("\n".join(lines) or "[empty folder]") + _hint(route),
            structured_content={"files": entries, "session": route.handle},
        )

    @mcp.tool(annotations={"readOnlyHint": True})
    async def read_file(
        path: Annotated[str, Field(description="File path relative to the session folder.")],
        ctx: Context,
        session: SessionArg = None,
    ) -> str:
        """Read a UTF-8 text file from this session's folder."""
        route = route_of(ctx, session)
        with calling(route):
            try:
                return files_for(route).read_text(path) + _hint(route)
            except FileAccessError as exc:
                raise ToolError(str(exc) + _hint(route)) from None

    @mcp.tool
    async def write_file(
        path: Annotated[str, Field(description="File path relative to the session folder.")],
        content: Annotated[str, Field(description="Text to write (UTF-8); replaces the file.")],
        ctx: Context,
        session: SessionArg = None,
    ) -> str:
        """Write a text file into this session's folder (folders are created as needed)."""
        route = route_of(ctx, session)
        with calling(route):
            try:
                size = files_for(route).write_text(path, content)
            except FileAccessError as exc:
                raise ToolError(str(exc)) from None
        return f"Wrote {size:,} bytes to {path}." + _hint(route)

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

    @mcp.tool(
        annotations={"readOnlyHint": True},
        output_schema=KernelInfoResult.model_json_schema(),
    )
    async def kernel_info(
        ctx: Context,
        session: SessionArg = None,
        start: Annotated[
            bool,
            Field(description="Start a kernel if the session has none (false: only report)."),
        ] = True,
    ) -> ToolResult:
        """This session's kernel: id, language, connection file and how to attach a console."""
        route = route_of(ctx, session)
        info: KernelInfo | None
        with calling(route):
            try:
                if start:
                    info = await manager.kernel_info(route.key)
                else:
                    info = manager.running_kernel_info(route.key)
            except KernelError as exc:
                raise _tool_error(exc) from exc
        if info is None:
            data = KernelInfoResult(
                session_id=route.key,
                session=route.handle,
                running=False,
                folder=str(manager.settings.workspace / route.key),
            ).model_dump(mode="json")
            text = "No kernel runs for this session yet; the first execute_code starts one."
            return ToolResult(content=text + _hint(route), structured_content=data)
        data = KernelInfoResult(
            session_id=route.key,
            session=route.handle,
            kernel_id=info.kernel_id,
            kernel_name=info.kernel_name,
            kernel_generation=info.generation,
            incarnation=incarnation_of(info.kernel_id, info.generation),
            pid=info.pid,
            language_info=info.language_info,
            connection_file=info.connection_file,
            console_command=info.console_command,
            folder=str(manager.session(route.key).folder),
        ).model_dump(mode="json")
        return ToolResult(
            content=json.dumps(data, indent=2) + _hint(route), structured_content=data
        )

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
                "handles": len(handles),
                "backend": settings.backend,
                # "sandbox": "none" comes with a warning; on a gateway, kernels are its own
                **(
                    sandbox.status(settings)
                    if settings.backend == "local"
                    else {"sandbox": "gateway"}
                ),
            }
        )

    @mcp.custom_route("/skills", methods=["GET"])
    async def list_skills(request: Request) -> JSONResponse:
        return JSONResponse(skills.index())

    add_file_routes(mcp, manager, settings)
    return mcp
