"""kernel_mcp: persistent Jupyter kernels per session, served over MCP."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastmcp import FastMCP

    from .config import Settings

__all__ = ["create_server"]


def create_server(settings: Settings | None = None) -> FastMCP:
    """Build the MCP server (imported lazily: the kernel layer needs no MCP)."""
    from .server import create_server as _create

    return _create(settings)
