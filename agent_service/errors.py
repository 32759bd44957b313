"""Errors of the chat service, each with its OpenAI-shaped JSON.

ServiceError                 (status, type, code) -> {"error": {...}}
├── InvalidRequest           400 invalid_request_error
│   ├── RequestTooLarge      413
│   └── ContextTooLarge      400 context_length_exceeded (the turn exceeds the token budget)
├── Unauthorized             401 authentication_error
├── Forbidden                403 permission_error (admin routes without an admin key)
├── NotFound                 404 not_found_error (unknown session, model, output)
├── SessionBusy              409 session_busy
├── ModelNotConfigured       503 model_not_configured
├── ShuttingDown             503 service_shutting_down (mid-stream, after SIGTERM's grace)
├── DatabaseUnavailable      503 database_unavailable (PostgreSQL unreachable)
├── TooManyTurns             503 too_many_turns (every turn-lock connection is taken)
├── ProviderError            the LLM provider failed (429 passed through, else 502/504)
└── KernelServiceError       502 kernel_mcp unreachable or failing
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """An error a client sees as OpenAI error JSON."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(ServiceError):
    status = 400
    type = "invalid_request_error"


class RequestTooLarge(InvalidRequest):
    status = 413
    code = "request_too_large"


class ContextTooLarge(InvalidRequest):
    code = "context_length_exceeded"


class Unauthorized(ServiceError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(ServiceError):
    status = 403
    type = "permission_error"
    code = "admin_key_required"


class NotFound(ServiceError):
    status = 404
    type = "not_found_error"


class SessionBusy(ServiceError):
    status = 409
    type = "conflict_error"
    code = "session_busy"


class ModelNotConfigured(ServiceError):
    status = 503
    type = "server_error"
    code = "model_not_configured"


class ShuttingDown(ServiceError):
    status = 503
    code = "service_shutting_down"


class DatabaseUnavailable(ServiceError):
    status = 503
    code = "database_unavailable"


class TooManyTurns(ServiceError):
    status = 503
    code = "too_many_turns"


class ProviderError(ServiceError):
    """The LLM provider failed after retries."""

    type = "upstream_error"

    def __init__(self, message: str, *, status: int = 502, code: str = "provider_error") -> None:
        super().__init__(message, code=code)
        self.status = status


class KernelServiceError(ServiceError):
    status = 502
    type = "upstream_error"
    code = "kernel_service_unavailable"
