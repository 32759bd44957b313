"""Settings of agent_service, read once from `AGENT_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
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
        default=None, description="Any litellm model string, e.g. openai/gpt-4o."
    )
    model_alias: str = Field(
        default="kernel-agent", description="Model id clients may use besides `model`."
    )
    api_base: str | None = None
    api_key: SecretStr | None = None
    llm_timeout: float = Field(default=120.0, gt=0, description="Per read from the provider.")
    llm_retries: int = Field(default=2, ge=0, le=10)
    temperature: float | None = None

    api_keys: list[SecretStr] = Field(
        default_factory=list, description="Client API keys; empty means no auth."
    )
    data_dir: Path = _REPO_ROOT / "data"
    notebooks_dir: Path = _REPO_ROOT / "notebooks"

    max_tool_rounds: int = Field(default=10, ge=1, le=100)
    max_request_bytes: int = Field(default=2_000_000, ge=1024)
    max_message_chars: int = Field(default=200_000, ge=1)
    prompt_ttl: float = Field(default=3600.0, gt=0)
    fallback_prompt: str = FALLBACK_PROMPT
    render_mode: Literal["markdown", "openwebui"] = "markdown"
    hidden_tools: list[str] = Field(
        default_factory=lambda: ["shutdown_kernel"],
        description="kernel_mcp tools not offered to the model.",
    )
    sse_ping: float = Field(default=15.0, gt=0)
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

    @property
    def model_ids(self) -> list[str]:
        """Model ids clients may name in requests."""
        return [m for m in (self.model_alias, self.model) if m]
