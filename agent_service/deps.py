"""Request dependencies: the shared services and the caller."""

# No `from __future__ import annotations`: FastAPI reads the annotations.

from typing import Annotated

from fastapi import Depends, Request

from .errors import Forbidden
from .security import Principal
from .services import Services


def _services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


Svc = Annotated[Services, Depends(_services)]


def _caller(request: Request, svc: Svc) -> Principal:
    return svc.auth(request.headers.get("authorization"))


Caller = Annotated[Principal, Depends(_caller)]


def _admin(caller: Caller, svc: Svc) -> Principal:
    """Admin routes need an admin key once admin keys exist; before that, any client key."""
    if svc.settings.admin_keys and not caller.admin:
        raise Forbidden("this route needs one of AGENT_ADMIN_KEYS")
    return caller


Admin = Annotated[Principal, Depends(_admin)]
