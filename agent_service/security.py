"""Who is asking, what they may see, and links that need no key.

With client keys (`AGENT_API_KEYS`) every `/v1` and `/admin` request names one; a
session belongs to the key that made it, and other keys get 404 for it. Admin keys
(`AGENT_ADMIN_KEYS`) see and manage every session. Without any key, there is one
user who sees everything.

Image links go to browsers, which send no key: they carry a signature with an
expiry (itsdangerous), made with the service's secret key, never a client's key.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from itsdangerous import BadSignature, SignatureExpired, TimestampSigner, URLSafeTimedSerializer

from .config import Settings
from .errors import NotFound, Unauthorized
from .store import SessionRecord

logger = logging.getLogger(__name__)

_LINK_SALT = "kernel-agent.output-link"


@dataclass(frozen=True)
class Principal:
    """The caller: `owner` names their key (never the key itself); admins see all."""

    owner: str | None
    admin: bool

    def can_see(self, record: SessionRecord) -> bool:
        return self.admin or record.owner == self.owner

    def visible(self, record: SessionRecord | None, session_id: str) -> SessionRecord:
        """The record if this caller may see it; 404 otherwise (existence is not revealed)."""
        if record is None or not self.can_see(record):
            raise NotFound(f"no session {session_id!r}", code="session_not_found")
        return record


def owner_of(key: str) -> str:
    """A stable, non-secret name for a key."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


class Authenticator:
    """Turns an `Authorization: Bearer` header into a Principal."""

    def __init__(self, settings: Settings) -> None:
        self._clients = [k.get_secret_value() for k in settings.api_keys]
        self._admins = [k.get_secret_value() for k in settings.admin_keys]
        self.required = settings.auth_required

    def __call__(self, authorization: str | None) -> Principal:
        if not self.required:
            return Principal(owner=None, admin=True)
        header = authorization or ""
        token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        # Compare with every key, so the time taken does not tell which one nearly matched.
        admin = sum(hmac.compare_digest(token, k) for k in self._admins) > 0
        client = sum(hmac.compare_digest(token, k) for k in self._clients) > 0
        if not token or not (admin or client):
            raise Unauthorized(
                "missing or invalid API key: send 'Authorization: Bearer <key>' "
                "with one of AGENT_API_KEYS"
            )
        return Principal(owner=owner_of(token), admin=admin)


def load_secret(settings: Settings) -> str:
    """The link-signing secret: AGENT_SECRET_KEY, else one kept in the data folder."""
    if settings.secret_key is not None:
        return settings.secret_key.get_secret_value()
    path: Path = settings.data_dir / "secret.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another replica made it first
        else:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(48))
    return path.read_text().strip()


class ImageLinks:
    """Signs and checks image links: the signature names the session and output, and expires."""

    def __init__(self, secret: str, ttl: float, now: Callable[[], float] | None = None) -> None:
        signer: type[TimestampSigner] = TimestampSigner
        if now is not None:  # a clock of one's own: links signed in the past, in tests
            clock = now

            class _ClockSigner(TimestampSigner):
                def get_timestamp(self) -> int:
                    return int(clock())

            signer = _ClockSigner
        self._serializer = URLSafeTimedSerializer(secret, salt=_LINK_SALT, signer=signer)
        self._ttl = int(ttl)

    def sign(self, session_id: str, name: str) -> str:
        return self._serializer.dumps([session_id, name])

    def check(self, token: str, session_id: str, name: str) -> bool:
        """Whether `token` signs this output and has not expired."""
        try:
            payload = self._serializer.loads(token, max_age=self._ttl)
        except SignatureExpired:
            logger.info("expired image link for %s/%s", session_id, name)
            return False
        except BadSignature:
            return False
        return bool(payload == [session_id, name])
