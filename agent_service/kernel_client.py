"""kernel_mcp as seen from the agent: an MCP client, nothing else.

The agent reaches kernels only through MCP, with the session's `X-Session-Id`
header, so kernel_mcp can run anywhere or be any MCP server with these tools.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastmcp import Client
from fastmcp.client.transports import StreamableHttpTransport

from .config import Settings
from .errors import KernelServiceError

logger = logging.getLogger(__name__)

ProgressHandler = Callable[[str], Awaitable[None]]


@dataclass
class ToolOutcome:
    """One tool call's result: text for the model, images and structured data."""

    text: str
    is_error: bool = False
    images: list[tuple[str, str]] = field(default_factory=list)  # (mime type, base64)
    structured: dict[str, Any] | None = None


def _outcome(result: Any) -> ToolOutcome:
    texts, images = [], []
    for item in result.content:
        if item.type == "text":
            texts.append(item.text)
        elif item.type == "image":
            images.append((item.mime_type, item.data))
    return ToolOutcome(
        text="\n".join(texts),
        is_error=bool(result.is_error),
        images=images,
        structured=result.structured_content,
    )


async def _ignore_log(message: Any) -> None:
    return None


class KernelSession:
    """An open MCP connection bound to one session's kernel."""

    def __init__(self, client: Client[Any], settings: Settings) -> None:
        self._client = client
        self._settings = settings

    async def openai_tools(self) -> list[dict[str, Any]]:
        """kernel_mcp's tools as OpenAI function tools (hidden ones left out)."""
        tools = await self._client.list_tools()
        return [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description or "",
                    "parameters": t.input_schema or {"type": "object", "properties": {}},
                },
            }
            for t in tools
            if t.name not in self._settings.hidden_tools
        ]

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
        if name in self._settings.hidden_tools and not allow_hidden:
            return ToolOutcome(text=f"Unknown tool: {name!r}", is_error=True)

        async def progress(progress: float, total: float | None, message: str | None) -> None:
            if message and on_output is not None:
                await on_output(message)

        try:
            result = await self._client.call_tool_mcp(
                name,
                arguments,
                progress_handler=progress,
                timeout=self._settings.mcp_timeout,
            )
        except Exception as exc:
            raise KernelServiceError(f"the kernel service failed during {name}: {exc}") from exc
        return _outcome(result)


class KernelClient:
    """Opens MCP connections to kernel_mcp."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        # One TLS context for all connections: building one per client costs ~16 ms of CPU.
        self._tls = ssl.create_default_context()

    def _client(self, session_id: str | None) -> Client[Any]:
        headers = {"X-Session-Id": session_id} if session_id else {}
        token = self._settings.mcp_token.get_secret_value() if self._settings.mcp_token else None
        transport = StreamableHttpTransport(
            self._settings.mcp_url,
            headers=headers,
            auth=token,
            verify=self._tls,
            # kernel_mcp keeps results under 1 MiB; other MCP servers may not.
            max_sse_event_size=16 * 1024 * 1024,
        )
        return Client(
            transport,
            timeout=self._settings.mcp_timeout,
            init_timeout=10,
            log_handler=_ignore_log,  # live output arrives as progress; logs would duplicate it
        )

    @contextlib.asynccontextmanager
    async def session(self, session_id: str) -> AsyncIterator[KernelSession]:
        """A connection whose tool calls reach `session_id`'s kernel."""
        client = self._client(session_id)
        try:
            await client.__aenter__()  # type: ignore[no-untyped-call]  # fastmcp leaves it untyped
        except Exception as exc:
            raise KernelServiceError(
                f"the kernel service at {self._settings.mcp_url} is unreachable: {exc}"
            ) from exc
        try:
            yield KernelSession(client, self._settings)
        finally:
            with contextlib.suppress(Exception):
                await client.__aexit__(None, None, None)  # type: ignore[no-untyped-call]

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
        """One tool call on its own connection (for admin routes)."""
        async with self.session(session_id) as session:
            return await session.call(name, arguments, allow_hidden=True)

    async def reachable(self) -> bool:
        try:
            async with self._client(None):
                pass  # connecting performs the MCP handshake
        except Exception:
            return False
        return True
