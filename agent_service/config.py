"""Settings of agent_service, read once from `AGENT_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_REPO_ROOT = Path(__file__).resolve().parent.parent

FALLBACK_PROMPT = """\
You work in a persistent Python kernel through tools: execute_code runs Python and its \
variables persist across calls; files live in your session folder. Show results with print() \
or display(). (The kernel service's full prompt, with its skills index, is unavailable.)
"""


class Settings(BaseSettings):
    """Configuration of the chat service."""

    model_config = SettingsConfigDict(env_prefix="AGENT_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)

    mcp_url: str = "http://127.0.0.1:8989/mcp"
    mcp_token: SecretStr | None = None
    mcp_timeout: float = Field(default=3700.0, gt=0, description="Deadline of one tool call.")

    model: str | None = Field(
        default=None, description="Any litellm model string, e.g. openai/gpt-4o (the default)."
    )
    models: list[str] = Field(
        default_factory=list,
        description="More litellm model strings clients may pick by name (`model` stays default).",
    )
    model_alias: str = Field(
        default="kernel-agent", description="Model id clients may use for the default model."
    )
    api_base: str | None = None
    api_key: SecretStr | None = None
    llm_timeout: float = Field(default=120.0, gt=0, description="Per read from the provider.")
    llm_retries: int = Field(default=2, ge=0, le=10)
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Cap on output tokens per model call (requests may ask for less).",
    )
    max_input_tokens: int | None = Field(
        default=None,
        ge=256,
        description="Token budget of one model request; default: litellm's max_input_tokens "
        "for the model, else 128,000.",
    )

    api_keys: list[SecretStr] = Field(
        default_factory=list, description="Client API keys; empty (with no admin keys): no auth."
    )
    admin_keys: list[SecretStr] = Field(
        default_factory=list, description="Keys that see and manage every session."
    )
    secret_key: SecretStr | None = Field(
        default=None,
        description="Signs image links; default: a random key kept in <data_dir>/secret.key.",
    )
    image_link_ttl: float = Field(
        default=7 * 24 * 3600.0, gt=0, description="Seconds a signed image link stays valid."
    )
    data_dir: Path = _REPO_ROOT / "data"
    notebooks_dir: Path = _REPO_ROOT / "notebooks"
    database_url: SecretStr | None = Field(
        default=None,
        description="Where transcripts live: unset for SQLite under data_dir, "
        "sqlite:///<path>, or postgresql://user:password@host/db to share them with replicas.",
    )
    database_pool_size: int = Field(
        default=10, ge=1, le=1000, description="PostgreSQL connections for transcript calls."
    )
    database_max_turns: int = Field(
        default=64,
        ge=1,
        le=10_000,
        description="Turns this replica runs at once with PostgreSQL (each holds a connection "
        "for its session lock).",
    )
    database_timeout: float = Field(
        default=10.0, gt=0, description="Seconds to connect to PostgreSQL or wait for a connection."
    )
    database_statement_timeout: float = Field(
        default=30.0,
        gt=0,
        description="Seconds one transcript statement may take (waiting on a lock included); "
        "past it the request fails with 503 database_unavailable instead of hanging.",
    )
    replica_id: str | None = Field(
        default=None,
        max_length=200,
        description="This replica's name in /admin/cache-stats; default: host name and pid.",
    )
    replica_heartbeat: float = Field(
        default=15.0, gt=0, description="Seconds between a replica's reports of its prompt cache."
    )

    max_upload_bytes: int = Field(
        default=100 * 1024**2,
        ge=1024,
        description="Largest upload (POST /v1/sessions/{id}/files, all its files): 413 beyond.",
    )
    mcp_files_url: str | None = Field(
        default=None,
        description="kernel_mcp's file routes; default: AGENT_MCP_URL without its /mcp.",
    )
    file_timeout: float = Field(
        default=300.0, gt=0, description="Seconds one read or write of a file transfer may wait."
    )
    max_tool_rounds: int = Field(default=10, ge=1, le=100)
    max_request_bytes: int = Field(default=2_000_000, ge=1024)
    max_request_messages: int = Field(default=10_000, ge=1)
    max_message_chars: int = Field(default=200_000, ge=1)
    prompt_ttl: float = Field(default=3600.0, gt=0)
    fallback_prompt: str = FALLBACK_PROMPT
    render_mode: Literal["markdown", "openwebui"] = "markdown"
    hidden_tools: list[str] = Field(
        default_factory=lambda: ["shutdown_kernel"],
        description="kernel_mcp tools not offered to the model.",
    )
    sse_ping: float = Field(default=15.0, gt=0)
    stop_wait: float = Field(
        default=5.0,
        gt=0,
        description="Seconds a stopped turn's tool call gets to end after each of its "
        "interrupts (three are sent) before the turn waits for the call's own deadline.",
    )
    shutdown_grace: float = Field(
        default=10.0,
        ge=0,
        description="Seconds running turns may go on after SIGTERM before streams are ended.",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host headers accepted besides loopback and AGENT_HOST ('*': any).",
    )
    allowed_origins: list[str] = Field(
        default_factory=list, description="Browser origins accepted besides loopback."
    )
    ui: bool = Field(
        default=True, description="Serve the web page at /ui (needs the optional extra `ui`)."
    )

    @field_validator("data_dir", "notebooks_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        scheme = value.get_secret_value().partition(":")[0].lower()
        if scheme not in ("sqlite", "postgresql", "postgres"):
            raise ValueError(
                "AGENT_DATABASE_URL must be sqlite:///<path> or postgresql://user:password@host/db"
            )
        return value

    @model_validator(mode="after")
    def _secret_is_not_a_client_key(self) -> Settings:
        if self.secret_key is not None:
            secret = self.secret_key.get_secret_value()
            keys = [k.get_secret_value() for k in (*self.api_keys, *self.admin_keys)]
            if secret in keys:
                raise ValueError("AGENT_SECRET_KEY must not be one of the client API keys")
            if len(secret) < 16:
                raise ValueError("AGENT_SECRET_KEY must have at least 16 characters")
        return self

    @property
    def postgres_url(self) -> str | None:
        """The PostgreSQL URL when transcripts live in PostgreSQL, else None (SQLite)."""
        url = self.database_url.get_secret_value() if self.database_url else ""
        return url if url.partition(":")[0].lower() in ("postgresql", "postgres") else None

    @property
    def sqlite_path(self) -> Path:
        """The SQLite file (when `postgres_url` is None)."""
        url = self.database_url.get_secret_value() if self.database_url else ""
        if url.lower().startswith("sqlite:///"):
            return Path(url[len("sqlite:///") :]).expanduser().resolve()
        return self.data_dir / "transcripts.sqlite3"

    @property
    def auth_required(self) -> bool:
        return bool(self.api_keys or self.admin_keys)

    @property
    def model_ids(self) -> list[str]:
        """Model ids clients may name in requests: the alias first, then the models."""
        ids = [self.model_alias] if self.model else []
        for model in (self.model, *self.models):
            if model and model not in ids:
                ids.append(model)
        return ids or [self.model_alias]

    def resolve_model(self, requested: str) -> str | None:
        """The litellm model string for a requested id, or None if it is not served."""
        if requested == self.model_alias:
            return self.model
        if requested == self.model or requested in self.models:
            return requested
        return None
