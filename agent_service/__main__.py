"""`python -m agent_service`: serve the OpenAI-compatible API."""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from .app import create_app
from .config import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m agent_service", description=__doc__)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "httpx2", "mcp.client", "alembic.runtime.plugins"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = Settings()
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="warning",
        # Streams end themselves after AGENT_SHUTDOWN_GRACE; uvicorn cuts what is left later.
        timeout_graceful_shutdown=int(settings.shutdown_grace) + 5,
    )


if __name__ == "__main__":
    main()
