"""Which conversation a request belongs to, and whether it is a turn of one at all.

Session, first that applies: the `X-Session-Id` header, `metadata.session_id`,
`X-OpenWebUI-Chat-Id`, `X-Conversation-Id`, else the stored conversation the
request's messages continue exactly (a client that sends the whole history and no
id), else a new session.

Open WebUI sends its title, tag and follow-up generation to the chat's model with
the chat's id; those requests are *tasks*, not turns: non-streaming, one user
message embedding the chat in `<chat_history>` (its templates in
`open_webui/config.py`), and `metadata` is removed before they reach us. They are
answered by the model directly: no tools, no kernel, not recorded.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from .errors import InvalidRequest
from .schemas import ChatCompletionRequest, ChatMessage

SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_CONVERSATION_ROLES = ("user", "assistant")


def _valid(value: str, param: str) -> str:
    if not SESSION_ID.fullmatch(value):
        raise InvalidRequest(
            "session id must be 1-128 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit",
            param=param,
            code="invalid_session_id",
        )
    return value


def _derived(value: str, prefix: str) -> str:
    """A valid session id for a client's conversation id of another alphabet."""
    if SESSION_ID.fullmatch(value):
        return value
    return f"{prefix}-{hashlib.sha256(value.encode()).hexdigest()[:32]}"


def session_from(headers: Mapping[str, str], body: ChatCompletionRequest) -> str | None:
    """The session a request names, if it names one."""
    explicit = (headers.get("x-session-id") or "").strip()
    if explicit:
        return _valid(explicit, "X-Session-Id")
    named = str((body.metadata or {}).get("session_id") or "").strip()
    if named:
        return _valid(named, "metadata.session_id")
    for header, prefix in (("x-openwebui-chat-id", "owui"), ("x-conversation-id", "conv")):
        value = (headers.get(header) or "").strip()
        if value:
            return _derived(value, prefix)
    return None


def extend_digest(digest: str | None, role: str, text: str) -> str:
    """The digest of a conversation after one more message (a hash chain)."""
    step = f"{digest or ''}\x1e{role}\x1f{text.strip()}".encode()
    return hashlib.sha256(step).hexdigest()


def history_digest(messages: list[ChatMessage]) -> str | None:
    """The digest of the conversation before the last message; None if there is none."""
    digest = None
    for message in messages[:-1]:
        text = message.text()
        if message.role in _CONVERSATION_ROLES and text.strip():
            digest = extend_digest(digest, message.role, text)
    return digest


def is_task(body: ChatCompletionRequest) -> bool:
    """Whether the request is a client's side task (title, tags, follow-ups), not a turn."""
    metadata: dict[str, Any] = body.metadata or {}
    if metadata.get("task"):
        return True
    if body.stream:
        return False
    conversation = [m for m in body.messages if m.role not in ("system", "developer")]
    if len(conversation) != 1 or conversation[0].role != "user":
        return False
    text = conversation[0].text()
    return "<chat_history>" in text and "</chat_history>" in text
