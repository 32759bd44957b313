"""The HTTP routes, one router per concern: chat, sessions, admin."""

from . import admin, chat, sessions

__all__ = ["admin", "chat", "sessions"]
