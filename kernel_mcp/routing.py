"""Which session a tool call reaches: header, MCP session, stdio, or a session handle.

First that applies: the `X-Session-Id` header; the MCP session of a handshake-era
(2025-11-25 and older) connection; the one client of a stdio server; a `session`
handle argument, which only `new_session` (or a call without any of these) mints.
When a header or an MCP session binds the connection, a `session` argument naming
another session is refused, so a model driving the tools cannot leave its
conversation. Handles are capabilities: 192 random bits, never listed, forgotten
when idle like any session.

This is MCP-side bookkeeping only; the kernel layer just sees session keys.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from fastmcp import Context
from fastmcp.exceptions import ToolError
from fastmcp.server.dependencies import get_http_request
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from .errors import InvalidSessionId
from .sessions import validate_session_id

logger = logging.getLogger(__name__)

STDIO_SESSION = "stdio"
_HANDLE_PREFIX = "s-"
_CLEANUP_MARK = "kernel_mcp_cleanup"


@dataclass(frozen=True)
class Route:
    """Where one call goes."""

    key: str
    """The session key of the kernel layer."""
    handle: str | None = None
    """The handle, when the session is a handle session."""
    created: bool = False
    """This call minted the handle."""
    source: str = "handle"
    """header, mcp, stdio or handle."""


def _header() -> str | None:
    """The request's X-Session-Id header (None over stdio or without one)."""
    try:
        request = get_http_request()
    except RuntimeError:
        return None
    value: str | None = request.headers.get("x-session-id")
    return value


def _unknown_handle(idle_timeout: float) -> ToolError:
    return ToolError(
        "Unknown session handle: it was never issued by this server, or its session has "
        f"ended (idle for more than {idle_timeout:g} s, or kernel_mcp restarted), so its "
        "variables are gone. Call new_session (or call again without `session`) to start a "
        "new session, and pass its handle from then on."
    )


class HandleRegistry:
    """Handles this server minted, with their last use; idle ones expire."""

    def __init__(self, idle_timeout: float) -> None:
        self.idle_timeout = idle_timeout
        self._last_used: dict[str, float] = {}
        self._in_use: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._last_used)

    def mint(self) -> str:
        handle = _HANDLE_PREFIX + secrets.token_urlsafe(24)
        self._last_used[handle] = time.monotonic()
        return handle

    def valid(self, handle: str) -> bool:
        last = self._last_used.get(handle)
        if last is None:
            return False
        return handle in self._in_use or time.monotonic() - last <= self.idle_timeout

    @contextmanager
    def using(self, handle: str) -> Iterator[None]:
        """Mark a call on `handle` in flight: it does not expire meanwhile."""
        self._in_use[handle] = self._in_use.get(handle, 0) + 1
        try:
            yield
        finally:
            count = self._in_use.pop(handle) - 1
            if count:
                self._in_use[handle] = count
            if handle in self._last_used:
                self._last_used[handle] = time.monotonic()

    def forget(self, handle: str) -> None:
        self._last_used.pop(handle, None)

    def expired(self) -> list[str]:
        """Forget and return the handles idle past the timeout."""
        now = time.monotonic()
        gone = [
            h
            for h, last in self._last_used.items()
            if h not in self._in_use and now - last > self.idle_timeout
        ]
        for handle in gone:
            del self._last_used[handle]
        return gone


class SessionRouter:
    """Resolves each call's session; frees MCP sessions' kernels when they end."""

    def __init__(
        self, handles: HandleRegistry, on_session_end: Callable[[str], Awaitable[Any]]
    ) -> None:
        self.handles = handles
        self._on_session_end = on_session_end

    def resolve(self, ctx: Context, session: str | None, *, create: bool = True) -> Route | None:
        """The call's route; None when nothing names a session and `create` is False.

        Raises:
            ToolError: a bad header, a refused or unknown handle.
        """
        header = _header()
        if header:
            try:
                key = validate_session_id(header.strip())
            except InvalidSessionId as exc:
                raise ToolError(f"invalid X-Session-Id header: {exc}") from None
            self._refuse_other(session, key, "its X-Session-Id header")
            return Route(key, source="header")
        if session is not None:
            if ctx.transport != "stdio" and not self._modern(ctx):
                self._refuse_other(session, None, "its MCP session")
            if not self.handles.valid(session):
                raise _unknown_handle(self.handles.idle_timeout)
            return Route(session, handle=session)
        if ctx.transport == "stdio":
            return Route(STDIO_SESSION, source="stdio")  # one stdio server serves one client
        if not self._modern(ctx):
            key = f"mcp-{hashlib.sha256(ctx.session_id.encode()).hexdigest()[:32]}"
            self._free_on_close(ctx, key)
            return Route(key, source="mcp")
        if not create:
            return None
        handle = self.handles.mint()
        logger.info("session %s minted for a call without a session", handle[:8])
        return Route(handle, handle=handle, created=True)

    def bound(self, ctx: Context) -> str | None:
        """What binds this connection to one session (header, MCP session), if anything."""
        if _header():
            return "its X-Session-Id header"
        if ctx.transport != "stdio" and not self._modern(ctx):
            return "its MCP session"
        return None

    @staticmethod
    def _modern(ctx: Context) -> bool:
        request_context = ctx.request_context
        return (
            request_context is not None
            and request_context.protocol_version in MODERN_PROTOCOL_VERSIONS
        )

    @staticmethod
    def _refuse_other(session: str | None, key: str | None, source: str) -> None:
        if session is not None and session != key:
            raise ToolError(
                f"This connection's session comes from {source}, and a `session` argument "
                "naming another session is refused. Call again without `session`."
            )

    def _free_on_close(self, ctx: Context, key: str) -> None:
        """Shut the kernel down when the MCP session ends (DELETE, idle expiry)."""
        # The SDK's per-connection object owns the exit stack closed when the session ends;
        # fastmcp reaches it the same way (ServerSession keeps it private).
        request_context = ctx.request_context
        connection = getattr(getattr(request_context, "session", None), "_connection", None)
        if connection is None or connection.state.get(_CLEANUP_MARK):
            return
        connection.state[_CLEANUP_MARK] = True

        async def end() -> None:
            logger.info("session %s: MCP session ended; shutting its kernel down", key)
            await self._on_session_end(key)

        connection.exit_stack.push_async_callback(end)
