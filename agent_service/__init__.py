"""agent_service: an OpenAI-compatible chat service whose agent computes in live kernels."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

    from .config import Settings

__all__ = ["create_app"]


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the FastAPI app."""
    from .app import create_app as _create

    return _create(settings)
