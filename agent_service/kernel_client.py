"""kernel_mcp as seen from the agent: an MCP client, nothing else.

The agent reaches kernels only through MCP, with the session's `X-Session-Id`
header, so kernel_mcp can run anywhere or be any MCP server with these tools.
`execute_code` results are read through the shared contract `kernel_schema`.

Connections are kept: one per session (the header is per connection), in a
bounded pool whose idle members are closed. A connection that failed is replaced
on its next use, so a restart of kernel_mcp costs at most the call in flight;
read-only calls are retried once on a fresh connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastmcp import Client
from fastmcp.client.transports import StreamableHttpTransport
from pydantic import ValidationError

from kernel_schema import ExecuteResult

from .config import Settings
from .errors import KernelServiceError

logger = logging.getLogger(__name__)

ProgressHandler = Callable[[str], Awaitable[None]]

_POOL_SIZE = 64
_POOL_IDLE_SECONDS = 300.0
_TOOLS_TTL_SECONDS = 60.0
_RETRY_SAFE = frozenset({"kernel_info", "list_variables", "list_files", "read_file", "read_skill"})
# The header binds the agent's connections to their session: handles are not for the model.
_SESSION_TOOLS = frozenset({"new_session"})
_SESSION_ARGUMENT = "session"


@dataclass
class ToolOutcome:
    """One tool call's result: text for the model, images and structured data."""

    text: str
    is_error: bool = False
    images: list[tuple[str, str]] = field(default_factory=list)  # (mime type, base64)
    structured: dict[str, Any] | None = None
    result: ExecuteResult | None = None
    """`execute_code`'s typed result (None for other tools, errors, or an unknown shape)."""


def _outcome(name: str, result: Any) -> ToolOutcome:
    texts, images = [], []
    for item in result.content:
        if item.type == "text":
            texts.append(item.text)
        elif item.type == "image":
            images.append((item.mime_type, item.data))
    typed = None
    structured = result.structured_content
    if name == "execute_code" and structured is not None and not result.is_error:
        try:
            typed = ExecuteResult.model_validate(structured)
        except ValidationError:
            logger.warning("execute_code returned a result outside the schema", exc_info=True)
    return ToolOutcome(
        text="\n".join(texts),
        is_error=bool(result.is_error),
        images=images,
        structured=structured,
        result=typed,
    )


async def _ignore_log(message: Any) -> None:
    return None


def _for_model(tool: Any) -> dict[str, Any]:
    """An MCP tool as an OpenAI function tool, without the session handle argument."""
    parameters = dict(tool.input_schema or {"type": "object", "properties": {}})
    properties = dict(parameters.get("properties") or {})
    if properties.pop(_SESSION_ARGUMENT, None) is not None:
        parameters["properties"] = properties
        if _SESSION_ARGUMENT in parameters.get("required", ()):
            parameters["required"] = [r for r in parameters["required"] if r != _SESSION_ARGUMENT]
    return {
        "type": "function",
        "function": {
            "name": tool.name,
            "description": tool.description or "",
            "parameters": parameters,
        },
    }


@dataclass
class _Pooled:
    client: Client[Any]
    users: int = 0
    last_used: float = field(default_factory=time.monotonic)
    broken: bool = False
    pooled: bool = True
    """Still in the pool; once out, the last user closes it."""


class KernelSession:
    """A kept MCP connection bound to one session's kernel."""

    def __init__(self, owner: KernelClient, session_id: str, pooled: _Pooled) -> None:
        self._owner = owner
        self._session_id = session_id
        self._pooled = pooled
        self._settings = owner.settings

    async def openai_tools(self) -> list[dict[str, Any]]:
        """kernel_mcp's tools as OpenAI function tools (hidden ones left out)."""
        return await self._owner.openai_tools(self)

    async def list_tools(self) -> list[Any]:
        tools: list[Any] = await self._with_retry(lambda c: c.list_tools(), retry=True)
        return tools

    async def call(
        self,
        name: str,
        arguments: dict[str, Any],
        on_output: ProgressHandler | None = None,
        *,
        allow_hidden: bool = False,
    ) -> ToolOutcome:
        """Call a tool; live output (progress messages) goes to `on_output`.

        Tools hidden from the model are refused unless `allow_hidden` (the service's own use).
        """
        hidden = name in self._settings.hidden_tools or name in _SESSION_TOOLS
        if hidden and not allow_hidden:
            return ToolOutcome(text=f"Unknown tool: {name!r}", is_error=True)

        async def progress(progress: float, total: float | None, message: str | None) -> None:
            if message and on_output is not None:
                await on_output(message)

        def send(client: Client[Any]) -> Awaitable[Any]:
            return client.call_tool_mcp(
                name, arguments, progress_handler=progress, timeout=self._settings.mcp_timeout
            )

        result = await self._with_retry(send, retry=name in _RETRY_SAFE, what=name)
        return _outcome(name, result)

    async def _with_retry(
        self, send: Callable[[Client[Any]], Awaitable[Any]], *, retry: bool, what: str = "a call"
    ) -> Any:
        """`send` on this connection; a failed connection is replaced (and retried if safe)."""
        for attempt in (1, 2):
            if self._pooled.broken or not self._pooled.client.is_connected():
                self._pooled = await self._owner.replace(self._session_id, self._pooled)
            try:
                return await send(self._pooled.client)
            except Exception as exc:
                self._pooled.broken = True
                if attempt == 2 or not retry:
                    raise KernelServiceError(
                        f"the kernel service failed during {what}: {exc}"
                    ) from exc
                logger.info("session %s: reconnecting after: %s", self._session_id, exc)
        raise AssertionError("unreachable")


class KernelClient:
    """Keeps MCP connections to kernel_mcp, one per session, in a bounded pool."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # One TLS context for all connections: building one per client costs ~16 ms of CPU.
        self._tls = ssl.create_default_context()
        self._pool: OrderedDict[str, _Pooled] = OrderedDict()
        self._tools: tuple[float, list[dict[str, Any]]] | None = None
        self._opening = asyncio.Lock()
        self._opened = 0

    def _client(self, session_id: str | None) -> Client[Any]:
        headers = {"X-Session-Id": session_id} if session_id else {}
        token = self.settings.mcp_token.get_secret_value() if self.settings.mcp_token else None
        transport = StreamableHttpTransport(
            self.settings.mcp_url,
            headers=headers,
            auth=token,
            verify=self._tls,
            # kernel_mcp keeps results under 1 MiB; other MCP servers may not.
            max_sse_event_size=16 * 1024 * 1024,
        )
        return Client(
            transport,
            timeout=self.settings.mcp_timeout,
            init_timeout=10,
            log_handler=_ignore_log,  # live output arrives as progress; logs would duplicate it
        )

    def stats(self) -> dict[str, int]:
        """Kept connections now, and connections opened for sessions since the start."""
        return {"connections": len(self._pool), "opened": self._opened}

    async def _open(self, session_id: str | None) -> Client[Any]:
        self._opened += session_id is not None
        client = self._client(session_id)
        try:
            await client.__aenter__()  # type: ignore[no-untyped-call]  # fastmcp leaves it untyped
        except Exception as exc:
            raise KernelServiceError(
                f"the kernel service at {self.settings.mcp_url} is unreachable: {exc}"
            ) from exc
        return client

    @staticmethod
    async def _close(client: Client[Any]) -> None:
        try:
            await client.__aexit__(None, None, None)  # type: ignore[no-untyped-call]
        except Exception:
            logger.debug("closing an MCP connection failed", exc_info=True)

    async def _acquire(self, session_id: str) -> _Pooled:
        pooled = self._pool.get(session_id)
        if pooled is None or pooled.broken:
            async with self._opening:  # one connection per session, even when asked twice
                pooled = self._pool.get(session_id)
                if pooled is None or pooled.broken:
                    pooled = await self._install(session_id, _Pooled(await self._open(session_id)))
        self._pool.move_to_end(session_id)
        pooled.users += 1
        pooled.last_used = time.monotonic()
        await self._trim()
        return pooled

    async def _install(self, session_id: str, fresh: _Pooled) -> _Pooled:
        stale = self._pool.pop(session_id, None)
        self._pool[session_id] = fresh
        if stale is not None:
            await self._drop(stale)
        return fresh

    async def _drop(self, pooled: _Pooled) -> None:
        """Take `pooled` out of the pool; close it now if unused, else when released."""
        pooled.pooled = False
        if pooled.users == 0:
            await self._close(pooled.client)

    async def _release(self, pooled: _Pooled) -> None:
        pooled.users -= 1
        pooled.last_used = time.monotonic()
        if pooled.users == 0 and not pooled.pooled:
            await self._close(pooled.client)  # replaced or evicted while in use

    async def replace(self, session_id: str, old: _Pooled) -> _Pooled:
        """A fresh connection for `session_id` in place of the failed `old`, for one user."""
        async with self._opening:
            current = self._pool.get(session_id)
            if current is None or current is old or current.broken:
                current = await self._install(session_id, _Pooled(await self._open(session_id)))
            current.users += 1
        await self._release(old)
        return current

    async def _trim(self) -> None:
        """Close connections idle too long, and the least recently used past the pool size."""
        now = time.monotonic()
        for session_id, pooled in list(self._pool.items()):
            if pooled.users:
                continue
            if len(self._pool) > _POOL_SIZE or now - pooled.last_used > _POOL_IDLE_SECONDS:
                del self._pool[session_id]
                await self._drop(pooled)

    async def forget(self, session_id: str) -> None:
        """Close the session's kept connection (its session was deleted)."""
        pooled = self._pool.pop(session_id, None)
        if pooled is not None:
            await self._drop(pooled)

    async def aclose(self) -> None:
        """Close every kept connection."""
        pooled, self._pool = list(self._pool.values()), OrderedDict()
        for entry in pooled:
            entry.pooled = False
            await self._close(entry.client)

    @contextlib.asynccontextmanager
    async def session(self, session_id: str) -> AsyncIterator[KernelSession]:
        """A connection whose tool calls reach `session_id`'s kernel (kept for next time)."""
        pooled = await self._acquire(session_id)
        kernel = KernelSession(self, session_id, pooled)
        try:
            yield kernel
        finally:
            await self._release(kernel._pooled)

    async def openai_tools(self, kernel: KernelSession) -> list[dict[str, Any]]:
        """The model's tools, listed once a minute (they change with kernel_mcp's version)."""
        if self._tools is not None and time.monotonic() - self._tools[0] < _TOOLS_TTL_SECONDS:
            return self._tools[1]
        hidden = set(self.settings.hidden_tools) | _SESSION_TOOLS
        tools = [_for_model(t) for t in await kernel.list_tools() if t.name not in hidden]
        self._tools = (time.monotonic(), tools)
        return tools

    async def system_prompt(self) -> str:
        """Fetch the `agent_system_prompt` prompt."""
        async with self._client(None) as client:
            result = await client.get_prompt("agent_system_prompt")
        return "\n".join(m.content.text for m in result.messages if m.content.type == "text")

    async def skills(self) -> list[dict[str, str]]:
        """Name and description of each skill kernel_mcp serves (its skill:// resources)."""
        try:
            async with self._client(None) as client:
                resources = await client.list_resources()
        except Exception as exc:
            raise KernelServiceError(f"could not list skills: {exc}") from exc
        skills = []
        for resource in resources:
            uri = str(resource.uri)
            if uri.startswith("skill://") and uri.endswith("/SKILL.md"):
                name = uri.removeprefix("skill://").removesuffix("/SKILL.md")
                skills.append({"name": name, "description": resource.description or ""})
        return sorted(skills, key=lambda s: s["name"])

    async def call(self, session_id: str, name: str, arguments: dict[str, Any]) -> ToolOutcome:
        """One tool call on the session's kept connection (for admin routes)."""
        async with self.session(session_id) as session:
            outcome = await session.call(name, arguments, allow_hidden=True)
        if name == "shutdown_kernel":
            await self.forget(session_id)
        return outcome

    async def reachable(self) -> bool:
        try:
            async with self._client(None):
                pass  # connecting performs the MCP handshake
        except Exception:
            return False
        return True
