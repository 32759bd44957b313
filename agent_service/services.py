"""The service's shared parts, built once in the app's lifespan."""

from __future__ import annotations

import asyncio
import logging
import time

from .agent import Agent
from .config import Settings
from .exporter import NotebookExporter
from .files import KernelFiles
from .kernel_client import KernelClient
from .llm import ModelAdapter
from .prompt_cache import PromptCache
from .replicas import LocalReplicas, Replicas, default_name
from .security import Authenticator, ImageLinks, load_secret
from .sqlite_store import SqliteStore
from .store import TranscriptStore
from .turns import TurnRegistry

logger = logging.getLogger(__name__)


class Services:
    """Everything a request handler needs."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store, self.replicas = _open_database(settings)
        self.kernels = KernelClient(settings)
        self.files = KernelFiles(settings)
        self.prompts = PromptCache(
            self.kernels.system_prompt, settings.prompt_ttl, settings.fallback_prompt
        )
        self.model = ModelAdapter(settings)
        self.exporter = NotebookExporter(self.store, settings.notebooks_dir)
        self.agent = Agent(
            settings, self.store, self.kernels, self.prompts, self.model, self.exporter, self.files
        )
        self.turns = TurnRegistry(self.replicas)
        self.auth = Authenticator(settings)
        secret = None if settings.secret_key else self.replicas.shared_secret()
        self.links = ImageLinks(secret or load_secret(settings), settings.image_link_ttl)
        self._draining_since: float | None = None
        self._warm_task: asyncio.Task[None] | None = None

    def output_url(self, base: str, session_id: str, name: str) -> str:
        """An image link; signed when keys are required, since browsers send no key for it."""
        url = f"{base}v1/sessions/{session_id}/outputs/{name}"
        if self.settings.auth_required:
            url += f"?sig={self.links.sign(session_id, name)}"
        return url

    async def start(self) -> None:
        """Join the other replicas; litellm's import in the background, so no user waits."""
        self.prompts.on_change = self.replicas.changed
        await self.replicas.start(self.prompts.clear, self.prompts.stats, self.turns.stop)
        self._warm_task = asyncio.create_task(self.model.warm_up(), name="warm-up")

    @property
    def warm(self) -> bool:
        return self.model.warm

    def draining(self) -> float:
        """Note that shutdown began (first call wins); the seconds of grace left."""
        now = time.monotonic()
        if self._draining_since is None:
            self._draining_since = now
            logger.info("shutting down: running turns get %.0f s", self.settings.shutdown_grace)
        return max(0.0, self._draining_since + self.settings.shutdown_grace - now)

    async def close(self) -> None:
        grace = self.draining() if self.turns.running else 0.0
        await self.turns.close(grace)
        await self.exporter.flush()
        await self.kernels.aclose()  # the kept MCP connections
        await self.files.aclose()
        if self._warm_task is not None and not self._warm_task.done():
            self._warm_task.cancel()
        await self.replicas.close()
        self.store.close()


def _open_database(settings: Settings) -> tuple[TranscriptStore, Replicas]:
    """The transcript store and replica coordination that AGENT_DATABASE_URL names."""
    name = settings.replica_id or default_name()
    if settings.postgres_url is None:
        return SqliteStore(settings.sqlite_path), LocalReplicas(name)
    try:
        from .postgres import open_postgres
    except ModuleNotFoundError as exc:
        raise RuntimeError(
            f"AGENT_DATABASE_URL names PostgreSQL but {exc.name} is not installed: "
            "pip install 'kernel-agent[postgres]'"
        ) from exc
    return open_postgres(settings, name)
