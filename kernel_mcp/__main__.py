"""`python -m kernel_mcp`: serve MCP over streamable HTTP (default) or stdio (`--stdio`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys

from .config import Settings


def _configure_logging(level: str) -> None:
    # stderr only: with --stdio, stdout is the MCP channel.
    logging.basicConfig(
        stream=sys.stderr,
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


async def serve_http(settings: Settings) -> None:
    """Serve /mcp, /health and /skills until SIGINT or SIGTERM."""
    import uvicorn

    from .server import create_server

    mcp = create_server(settings)
    app = mcp.http_app(
        path="/mcp",
        host_origin_protection=True,
        allowed_hosts=settings.allowed_hosts or None,
        allowed_origins=settings.allowed_origins or None,
        # An MCP session (protocol 2025-11-25) that sees no request for this long ends, and
        # its kernel with it: the same idle limit as every other session's kernel.
        session_idle_timeout=settings.idle_timeout,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        timeout_graceful_shutdown=3,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    logging.getLogger(__name__).info(
        "kernel_mcp serving MCP at http://%s:%d/mcp", settings.host, settings.port
    )
    await server.serve()


async def serve_stdio(settings: Settings) -> None:
    from .server import create_server

    await create_server(settings).run_async(transport="stdio", show_banner=False)


def _quiet_telemetry() -> None:
    """fastmcp's OpenTelemetry spans off unless asked for (FASTMCP_TELEMETRY_MODE).

    kernel_mcp configures no OpenTelemetry SDK, yet fastmcp's no-op spans cost ~0.1 ms of
    CPU per call (about 4 % of an `x + 1` execution). Process-wide, hence here and not in
    create_server: a server built inside another program leaves that program's choice alone.
    """
    import fastmcp

    if "telemetry_mode" not in fastmcp.settings.model_fields_set:
        fastmcp.settings.telemetry_mode = "off"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kernel_mcp", description=__doc__)
    parser.add_argument("--stdio", action="store_true", help="serve MCP over stdin/stdout")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    _configure_logging(args.log_level)
    _quiet_telemetry()
    settings = Settings()
    if settings.backend == "local" and settings.sandbox == "bwrap":
        from .errors import SandboxUnavailable
        from .sandbox import find_bwrap

        try:
            find_bwrap()
        except SandboxUnavailable as exc:
            sys.exit(f"kernel_mcp cannot start: {exc}")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_stdio(settings) if args.stdio else serve_http(settings))


if __name__ == "__main__":
    main()
