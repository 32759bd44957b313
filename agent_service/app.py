"""The app factory: services in the lifespan, middlewares, error handlers, routers."""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations.

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import Settings
from .errors import ServiceError
from .middleware import BodyLimit, HostOriginGuard
from .routes import admin, chat, files, sessions
from .routes.chat import error_response, invalid_request
from .services import Services

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the FastAPI app; its lifespan opens the transcript store and warms up."""
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = Services(settings)
        app.state.services = services
        services.start()
        logger.info(
            "agent_service ready: model %s, kernel_mcp %s, data %s",
            settings.model or "(none)",
            settings.mcp_url,
            settings.data_dir,
        )
        try:
            yield
        finally:
            await services.close()

    app = FastAPI(title="kernel-agent", version="0.1.0", lifespan=lifespan)
    app.add_middleware(
        BodyLimit, limit=settings.max_request_bytes, upload_limit=settings.max_upload_bytes
    )
    app.add_middleware(HostOriginGuard, settings=settings)
    _error_handlers(app)
    app.include_router(chat.router)
    app.include_router(sessions.router)
    app.include_router(files.router)
    app.include_router(admin.router)
    if settings.ui:
        _mount_ui(app, settings)
    return app


def _error_handlers(app: FastAPI) -> None:
    """Every error a client sees is OpenAI-shaped, with `x-should-retry: false`."""

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        if exc.status >= 500:
            logger.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc)
        return error_response(exc)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, request.url.path)
        return error_response(ServiceError("internal error; the service logged the details"))

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(invalid_request(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = ServiceError(str(exc.detail))
        error.status = exc.status_code
        error.type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(error)


def _mount_ui(app: FastAPI, settings: Settings) -> None:
    """The web page at /ui, if the optional extra `ui` (gradio) is installed."""
    try:
        from .ui import mount_ui
    except ModuleNotFoundError as exc:
        if exc.name != "gradio":
            raise
        logger.info("no web UI: gradio is not installed (pip install -e '.[ui]')")
        return
    mount_ui(app, settings)
