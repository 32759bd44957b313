"""Settings of kernel_mcp, read once from `KERNEL_MCP_*` environment variables."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_REPO_ROOT = Path(__file__).resolve().parent.parent

# Environment variables a kernel may inherit: nothing that can carry a secret.
DEFAULT_ENV_ALLOW = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "LC_NUMERIC",
    "LC_TIME",
    "TZ",
    "TERM",
    "TMPDIR",
)


class Settings(BaseSettings):
    """Configuration of the kernel layer and the MCP server."""

    model_config = SettingsConfigDict(env_prefix="KERNEL_MCP_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8989, ge=0, le=65535)
    token: SecretStr | None = Field(
        default=None, description="Bearer token required on /mcp when set."
    )

    workspace: Path = Field(
        default=_REPO_ROOT / "data" / "workspace",
        description="Root of the per-session working folders (each kernel's cwd).",
    )
    runtime_dir: Path = Field(
        default=_REPO_ROOT / "data" / "runtime",
        description="Private (0700) folder for connection files and IPC sockets.",
    )
    skills_dir: Path = Field(default=_REPO_ROOT / "skills")

    transport: str = Field(default="ipc", pattern="^(ipc|tcp)$")
    pool_size: int = Field(default=2, ge=0, le=64)
    max_kernels: int = Field(default=32, ge=1)
    idle_timeout: float = Field(
        default=3600.0, gt=0, description="Seconds of inactivity before a kernel is culled."
    )
    cull_interval: float = Field(default=30.0, gt=0)

    execute_timeout: float = Field(default=60.0, gt=0, description="Default per-call deadline.")
    max_execute_timeout: float = Field(default=3600.0, gt=0)
    interrupt_grace: float = Field(
        default=2.0,
        gt=0,
        description="Seconds each of two interrupts gets (and a slow cell to start) before "
        "the kernel is restarted.",
    )
    startup_timeout: float = Field(default=60.0, gt=0)
    iopub_quiet: float = Field(
        default=10.0,
        gt=0,
        description="After the reply, how long output may pause before the rest is given up "
        "(the kernel sends its last output just before idle; this only bounds a lost idle).",
    )
    internal_timeout: float = Field(
        default=30.0, gt=0, description="Deadline of our own requests (list_variables, chdir)."
    )
    shutdown_timeout: float = Field(default=5.0, gt=0)
    liveness_interval: float = Field(
        default=0.25, gt=0, description="Process poll period when pidfd is unavailable."
    )

    output_cap_bytes: int = Field(
        default=512 * 1024,
        ge=1024,
        description="Output bytes kept per execution (head and tail); the rest is counted.",
    )
    image_cap_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=0,
        description="Image bytes kept per execution, apart from the text cap; 0 drops images.",
    )
    output_spool_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=0,
        description="Cut output kept in a file of the session folder (.outputs/); 0: none.",
    )
    memory_limit_bytes: int = Field(
        default=4 * 1024**3,
        ge=0,
        description="Address-space limit per kernel (RLIMIT_AS); 0 disables it.",
    )
    kernel_env_allow: tuple[str, ...] = DEFAULT_ENV_ALLOW

    sandbox: Literal["bwrap", "none"] = Field(
        default="bwrap",
        description="bwrap: every kernel in its own bubblewrap sandbox; none: unsandboxed.",
    )
    kernel_network: Literal["none", "host"] = Field(
        default="none",
        description="none: sandboxed kernels reach no network; host: the machine's network.",
    )
    sandbox_uid: int = Field(default=65534, ge=1, description="The kernel's uid in the sandbox.")
    sandbox_gid: int = Field(default=65534, ge=1, description="The kernel's gid in the sandbox.")
    sandbox_tmp_bytes: int = Field(
        default=512 * 1024**2,
        ge=1024**2,
        description="Size of a sandboxed kernel's private /tmp and of its /dev/shm (RAM).",
    )
    sandbox_read_only: list[Path] = Field(
        default_factory=list,
        description="Extra host paths sandboxed kernels may read (JSON list), e.g. data sets.",
    )

    backend: Literal["local", "gateway"] = Field(
        default="local",
        description="local: kernels are child processes; gateway: kernels on a Jupyter "
        "Kernel or Enterprise Gateway (KERNEL_MCP_GATEWAY_URL).",
    )
    gateway_url: str | None = Field(
        default=None, description="Base URL of the gateway, e.g. http://gateway:8888."
    )
    gateway_ws_url: str | None = Field(
        default=None, description="WebSocket base URL when it differs (default: from the URL)."
    )
    gateway_token: SecretStr | None = Field(
        default=None, description="Sent as `Authorization: token <it>` on every request."
    )
    gateway_kernel_name: str = Field(
        default="kernel-agent",
        description="Kernelspec the gateway starts (`python -m kernel_mcp.gateway_kernelspec` "
        "writes ours: output cap in the kernel, memory limit).",
    )
    gateway_username: str = Field(
        default="kernel-agent",
        description="KERNEL_USERNAME of every kernel (Enterprise Gateway refuses root).",
    )
    gateway_shared: bool = Field(
        default=True,
        description="Kernel ids derived from session ids, so any replica finds a session's "
        "kernel (needs a gateway that honours KERNEL_ID: Enterprise Gateway); off: the gateway "
        "picks ids, one replica only, warm pool on.",
    )
    gateway_namespace: uuid.UUID = Field(
        default=uuid.UUID("5b0f3c36-3a83-4a46-9a2e-6c1f0f6c1f4b"),
        description="Namespace of derived kernel ids: deployments sharing a gateway differ.",
    )
    gateway_kernel_workspace: str | None = Field(
        default=None,
        description="The workspace as kernels see it on the gateway's side (default: the same "
        "path as KERNEL_MCP_WORKSPACE).",
    )
    gateway_validate_cert: bool = True
    gateway_ca_certs: Path | None = Field(default=None, description="CA bundle (PEM).")
    gateway_client_cert: Path | None = Field(default=None, description="Client certificate.")
    gateway_client_key: Path | None = Field(default=None, description="Its private key.")
    gateway_request_timeout: float = Field(
        default=30.0, gt=0, description="Deadline of one REST request (starts: startup_timeout)."
    )
    gateway_quickack: bool = Field(
        default=True,
        description="Re-arm TCP_QUICKACK on the kernel WebSocket after every message: without "
        "it delayed ACKs add ~40 ms to each small round trip.",
    )

    model_text_chars: int = Field(
        default=20_000, ge=500, description="Text of one result given to the model (head+tail)."
    )
    image_max_bytes: int = Field(
        default=256_000, ge=10_000, description="Larger images are downscaled for the model."
    )
    result_max_bytes: int = Field(
        default=900_000,
        ge=64_000,
        description="Bound of one serialized tool result (MCP clients refuse SSE events > 1 MiB).",
    )
    file_read_bytes: int = Field(default=1_000_000, ge=1)
    file_write_bytes: int = Field(default=10_000_000, ge=1)
    upload_max_bytes: int = Field(
        default=100 * 1024**2,
        ge=1,
        description="Largest file PUT to /sessions/{id}/files/{path} (the HTTP file routes).",
    )
    list_max_entries: int = Field(
        default=10_000, ge=1, description="Entries of one GET /sessions/{id}/files listing."
    )
    allowed_origins: list[str] = Field(
        default_factory=list, description="Browser origins trusted besides loopback."
    )
    allowed_hosts: list[str] = Field(
        default_factory=list, description="Host headers accepted besides loopback."
    )

    @property
    def connection_dir(self) -> Path:
        """Connection files of the session kernels (JupyterLab's external_connection_dir)."""
        return self.runtime_dir / "kernels"

    @property
    def pool_connection_dir(self) -> Path:
        return self.runtime_dir / "pool"

    @model_validator(mode="after")
    def _resolve_paths(self) -> Settings:
        self.workspace = self.workspace.expanduser().resolve()
        self.runtime_dir = self.runtime_dir.expanduser().resolve()
        self.skills_dir = self.skills_dir.expanduser().resolve()
        self.sandbox_read_only = [p.expanduser().resolve() for p in self.sandbox_read_only]
        for path in self.sandbox_read_only:
            for private in (self.workspace, self.runtime_dir):
                if path == private or path in private.parents or private in path.parents:
                    raise ValueError(
                        f"KERNEL_MCP_SANDBOX_READ_ONLY must not give kernels {private} (other "
                        "sessions' files, connection files): not it, nor a folder in or above it"
                    )
        if self.execute_timeout > self.max_execute_timeout:
            raise ValueError("execute_timeout must not exceed max_execute_timeout")
        if self.sandbox == "bwrap" and self.kernel_network == "none" and self.transport == "tcp":
            raise ValueError(
                "KERNEL_MCP_TRANSPORT=tcp cannot reach a sandboxed kernel that has no network: "
                "use the default ipc transport, or KERNEL_MCP_KERNEL_NETWORK=host"
            )
        if self.backend == "gateway" and not self.gateway_url:
            raise ValueError("KERNEL_MCP_BACKEND=gateway needs KERNEL_MCP_GATEWAY_URL")
        return self
