"""The small interface between the session layer and a kernel implementation.

The local jupyter_client backend (`kernel_mcp.local_kernel`) is the first
implementation; the gateway backend (`kernel_mcp.gateway_kernel`: Kernel or Enterprise
Gateway over REST and WebSocket) implements the same two classes. A backend whose kernels
are `shared` with other kernel_mcp replicas finds a session's kernel by the session id
(`open_kernel`) and serializes a session's calls across replicas (`session_guard`).
"""

from __future__ import annotations

import abc
import contextlib
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

Message = dict[str, Any]


class Loss(enum.StrEnum):
    """Why a request will get no reply; the value reads as part of a sentence."""

    DIED = "died"
    DIED_IDLE = "died before it ran"
    RESTARTED = "restarted"
    SHUT_DOWN = "shut down"

    @property
    def died(self) -> bool:
        return self in (Loss.DIED, Loss.DIED_IDLE)


class ExecutionListener(Protocol):
    """Receives the messages of one request, routed by its msg_id."""

    def on_iopub(self, msg: Message) -> None: ...

    def on_reply(self, msg: Message) -> None: ...

    def on_kernel_lost(self, reason: Loss) -> None:
        """The kernel died or was restarted: no reply will come."""


@dataclass(frozen=True)
class KernelInfo:
    """What a person needs to find and attach to a kernel."""

    kernel_id: str
    pid: int | None
    connection_file: str | None
    language_info: dict[str, Any] = field(default_factory=dict)
    generation: int = 0
    kernel_name: str | None = None
    """The name JupyterLab lists the kernel under (its ids there are its own)."""

    @property
    def console_command(self) -> str | None:
        if not self.connection_file:
            return None
        return f"jupyter console --existing {self.connection_file}"


class KernelConnection(abc.ABC):
    """One running kernel: send requests, route replies, manage its life."""

    kernel_id: str
    exit_code: int | None = None
    """How the last kernel process ended (negative: killed by that signal)."""
    generation: int
    """Incremented on every restart; listeners of an older generation are lost."""

    on_orphan: Callable[[Message], None] | None = None
    """Called with output messages whose request is no longer being listened to."""
    notice: str | None = None
    """Why the session's earlier state is gone, when the backend found out on opening it."""
    on_notice: Callable[[str], None] | None = None
    """Called with a sentence when the state is found gone later (a remote restart)."""
    keep_running: bool = False
    """Shutdown only lets go of the kernel, which other replicas may still use (shared)."""

    @property
    def dead(self) -> bool:
        """The kernel process has exited (or a restart failed) and no new one runs yet."""
        return False

    @abc.abstractmethod
    def execute(self, code: str, listener: ExecutionListener, *, silent: bool = False) -> str:
        """Send an execute request (stdin disabled); returns its msg_id."""

    @abc.abstractmethod
    def forget(self, msg_id: str) -> None:
        """Stop routing messages of `msg_id` to its listener."""

    @abc.abstractmethod
    async def is_alive(self) -> bool: ...

    @abc.abstractmethod
    async def interrupt(self) -> None: ...

    @abc.abstractmethod
    async def restart(self, cwd: Path) -> None:
        """Replace the kernel process (state is lost) and wait until it is ready."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Stop the kernel and every process it started."""

    @abc.abstractmethod
    def info(self) -> KernelInfo: ...

    def assign(self, session_id: str) -> None:
        """`session_id` owns this kernel now: list it, named after the session, for attaching."""
        return None

    def changed_elsewhere(self) -> bool:
        """Another client changed the kernel since we last heard from it (a shared kernel
        restarted by another replica): `catch_up()` before sending it anything."""
        return False

    async def catch_up(self) -> None:
        """Make sure what is sent next is heard in full after a change made elsewhere."""
        return None

    @abc.abstractmethod
    def memory_rss(self) -> int | None:
        """Resident memory of the kernel process in bytes, when known."""


class KernelBackend(abc.ABC):
    """Starts kernels."""

    shared: bool = False
    """Kernels are shared with other kernel_mcp replicas: found by session (`find_kernel`),
    and culling, eviction or closing a replica lets them run (the gateway culls them)."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Prepare the backend (folders, stale files)."""

    @abc.abstractmethod
    async def start_kernel(self, cwd: Path, *, pooled: bool = False) -> KernelConnection:
        """Start a kernel with `cwd` as working folder and wait until it is ready.

        A `pooled` kernel waits for a session; `assign` is called when one claims it.
        """

    async def open_kernel(self, session_id: str, cwd: Path) -> KernelConnection:
        """The kernel of `session_id`: a shared backend finds the running one, if any."""
        return await self.start_kernel(cwd)

    def session_guard(self, session_id: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Held around each call on a session; a shared backend serializes them across replicas."""
        return contextlib.nullcontext()

    async def shut_session_kernel(self, session_id: str) -> bool:
        """Shut down the session's kernel held by no kernel of this replica (a shared backend:
        another replica's, or one this replica let go). Hold `session_guard(session_id)`."""
        return False

    async def find_kernel(self, session_id: str, cwd: Path) -> KernelConnection | None:
        """The session's kernel already running, for a shared backend (another replica may
        have started it); None: claim a pooled one or open a new one."""
        return None

    async def interrupt_session(self, session_id: str) -> bool:
        """Interrupt the session's kernel held by no kernel of this replica (a shared
        backend reaches the one another replica runs); False when there is none."""
        return False

    async def restart_session(self, session_id: str) -> bool:
        """Restart the session's kernel held by no kernel of this replica, without waiting for
        the session's lock (a call may hang in it); False when there is none."""
        return False

    @abc.abstractmethod
    async def close(self) -> None:
        """Release what `start` prepared."""

    def kernel_path(self, folder: Path) -> str:
        """A session `folder` as its kernels see it (their working folder)."""
        return str(folder)

    def claim_folder(self, kernel: KernelConnection, folder: Path) -> Path:
        """A session claimed pooled `kernel`: give it `folder` as its working folder.

        Returns the folder's path as the kernel sees it (the session layer changes the
        kernel's cwd to it).
        """
        return folder
