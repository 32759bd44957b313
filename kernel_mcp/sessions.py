"""Sessions: one persistent kernel and one private folder per session key.

The manager owns every kernel: it claims them from the warm pool (or starts one
cold), runs one execution at a time per session (later calls queue in order),
culls idle kernels, and shuts everything down on close.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backend import KernelBackend, KernelConnection, KernelInfo, Message
from .config import Settings
from .errors import (
    CapacityError,
    InvalidSessionId,
    KernelError,
    KernelStartError,
    SessionNotFound,
)
from .execution import ExecutionResult, run_code
from .outputs import OutputCollector
from .pool import KernelPool

logger = logging.getLogger(__name__)

_SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_BACKGROUND_CAP = 64 * 1024

_LIST_VARIABLES = """
def __kernel_agent_variables():
    import json, types
    ip = get_ipython()
    hidden = ip.user_ns_hidden
    rows = []
    for name, value in list(ip.user_ns.items()):
        if name.startswith("_") or name in hidden or isinstance(value, types.ModuleType):
            continue
        try:
            text = repr(value)
        except Exception as exc:
            text = f"<repr failed: {type(exc).__name__}>"
        if len(text) > 200:
            text = text[:197] + "..."
        row = {"name": name, "type": type(value).__name__, "repr": text}
        shape = getattr(value, "shape", None)
        if isinstance(shape, tuple):
            row["shape"] = list(shape)
        rows.append(row)
    print(json.dumps(rows))
__kernel_agent_variables()
del __kernel_agent_variables
"""


@dataclass
class KernelSession:
    """One session's kernel, folder and bookkeeping."""

    id: str
    folder: Path
    kernel: KernelConnection | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    created: float = field(default_factory=time.time)
    last_activity: float = field(default_factory=time.monotonic)
    notice: str | None = None
    """Told with the next result: why earlier state is gone (culled, restarted)."""
    background: OutputCollector = field(default_factory=lambda: OutputCollector(_BACKGROUND_CAP))
    closed: bool = False
    settling: asyncio.Task[None] | None = None
    """Interrupt/restart after a cancelled call; the next request waits for it."""

    def set_settling(self, task: asyncio.Task[None]) -> None:
        self.settling = task

    @property
    def busy(self) -> bool:
        return self.lock.locked()


def validate_session_id(session_id: str) -> str:
    """Return `session_id` if it can name a folder, else raise InvalidSessionId."""
    if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
        raise InvalidSessionId(
            "session id must be 1-128 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return session_id


class SessionManager:
    """Owns all kernels: sessions, pool, culling."""

    def __init__(self, settings: Settings, backend: KernelBackend | None = None) -> None:
        if backend is None:
            from .local_kernel import LocalBackend

            backend = LocalBackend(settings)
        self.settings = settings
        self._backend = backend
        self._sessions: dict[str, KernelSession] = {}
        self._pool = KernelPool(backend, settings.pool_size, settings.workspace / ".pool")
        self._cull_task: asyncio.Task[None] | None = None
        self._starting = 0

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        self.settings.workspace.mkdir(parents=True, exist_ok=True)
        await self._backend.start()
        await self._pool.start()
        self._cull_task = asyncio.create_task(self._cull_loop(), name="kernel-culler")
        logger.info(
            "session manager started: workspace %s, pool %d, max %d kernels",
            self.settings.workspace,
            self.settings.pool_size,
            self.settings.max_kernels,
        )

    async def close(self) -> None:
        if self._cull_task is not None:
            self._cull_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._cull_task
        await self._pool.close()
        kernels = [s.kernel for s in self._sessions.values() if s.kernel is not None]
        for session in self._sessions.values():
            session.kernel = None
        await asyncio.gather(*(k.shutdown() for k in kernels), return_exceptions=True)
        await self._backend.close()
        logger.info("session manager closed (%d kernels shut down)", len(kernels))

    async def __aenter__(self) -> SessionManager:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- sessions -------------------------------------------------------------

    def session(self, session_id: str) -> KernelSession:
        """The session for `session_id`, created (without a kernel) if new."""
        session = self._sessions.get(session_id)
        if session is None:
            validate_session_id(session_id)
            folder = self.settings.workspace / session_id
            folder.mkdir(parents=True, exist_ok=True)
            session = KernelSession(id=session_id, folder=folder)
            self._sessions[session_id] = session
        return session

    def existing(self, session_id: str) -> KernelSession:
        session = self._sessions.get(session_id)
        if session is None:
            raise SessionNotFound(f"no session {session_id!r}")
        return session

    def sessions(self) -> list[KernelSession]:
        return list(self._sessions.values())

    def stats(self) -> dict[str, Any]:
        return {
            "sessions": len(self._sessions),
            "kernels_running": sum(1 for s in self._sessions.values() if s.kernel is not None),
            "pool_ready": len(self._pool),
            "pool_size": self.settings.pool_size,
            "max_kernels": self.settings.max_kernels,
        }

    async def close_session(self, session_id: str) -> bool:
        """Shut the session's kernel down (after any running call) and forget it."""
        session = self._sessions.get(session_id)
        if session is None:
            return False
        async with session.lock:
            session.closed = True  # calls queued on this session start over on a new one
            if self._sessions.get(session_id) is session:
                del self._sessions[session_id]
            if session.kernel is not None:
                kernel, session.kernel = session.kernel, None
                await kernel.shutdown()
        return True

    @contextlib.asynccontextmanager
    async def _locked(self, session_id: str) -> AsyncIterator[KernelSession]:
        """The session, its lock held; a session closed meanwhile is replaced by a new one."""
        while True:
            session = self.session(session_id)
            await session.lock.acquire()
            if not session.closed:
                break
            session.lock.release()
        try:
            yield session
        finally:
            session.lock.release()

    # -- kernel operations ------------------------------------------------------

    async def execute(
        self,
        session_id: str,
        code: str,
        timeout: float | None = None,
        on_output: Callable[[Message], None] | None = None,
    ) -> ExecutionResult:
        """Run `code` in the session's kernel, after any earlier call on it."""
        settings = self.settings
        timeout = settings.execute_timeout if timeout is None else timeout
        if not 0 < timeout <= settings.max_execute_timeout:
            raise ValueError(f"timeout must be in (0, {settings.max_execute_timeout:g}] seconds")
        async with self._locked(session_id) as session:
            kernel = await self._kernel_for(session)
            background = session.background
            session.background = OutputCollector(_BACKGROUND_CAP)
            try:
                result = await run_code(
                    kernel,
                    code,
                    timeout=timeout,
                    grace=settings.interrupt_grace,
                    output_cap=settings.output_cap_bytes,
                    cwd=session.folder,
                    on_output=on_output,
                    on_cancel=session.set_settling,
                    iopub_quiet=settings.iopub_quiet,
                )
            finally:
                session.last_activity = time.monotonic()
        result.background_outputs = background.outputs()
        if session.notice:
            result.message = " ".join(filter(None, [session.notice, result.message]))
            result.state_lost = True
            session.notice = None
        return result

    async def interrupt(self, session_id: str) -> bool:
        """Interrupt the running code; False when the session has no kernel."""
        session = self.existing(session_id)
        if session.kernel is None:
            return False
        await session.kernel.interrupt()
        return True

    async def restart(self, session_id: str) -> None:
        """Restart the session's kernel (its variables are lost)."""
        session = self.session(session_id)
        if session.kernel is None:
            async with self._locked(session_id) as session:
                await self._kernel_for(session)
            return
        await session.kernel.restart(session.folder)
        session.notice = None
        session.last_activity = time.monotonic()

    async def list_variables(self, session_id: str) -> list[dict[str, Any]]:
        """Names, types and short reprs of the user's variables."""
        async with self._locked(session_id) as session:
            kernel = await self._kernel_for(session)
            result = await run_code(
                kernel,
                _LIST_VARIABLES,
                timeout=self.settings.internal_timeout,
                grace=self.settings.interrupt_grace,
                output_cap=4 * 1024 * 1024,
                cwd=session.folder,
            )
        text = "".join(
            o["text"]
            for o in result.outputs
            if o["output_type"] == "stream" and o["name"] == "stdout"
        )
        if result.status != "ok":
            raise KernelError(f"listing variables failed: {result.status} {result.message or ''}")
        rows: list[dict[str, Any]] = json.loads(text.strip().splitlines()[-1])
        return rows

    async def kernel_info(self, session_id: str) -> KernelInfo:
        """Kernel id, pid, connection file and language of the session's kernel."""
        async with self._locked(session_id) as session:
            kernel = await self._kernel_for(session)
        return kernel.info()

    # -- internals ------------------------------------------------------------

    async def _kernel_for(self, session: KernelSession) -> KernelConnection:
        """The session's kernel, claimed or started on first use. Hold session.lock."""
        if session.settling is not None:
            settling, session.settling = session.settling, None
            await asyncio.shield(settling)
        if session.kernel is not None:
            return session.kernel
        running = sum(1 for s in self._sessions.values() if s.kernel is not None) + self._starting
        if running >= self.settings.max_kernels:
            raise CapacityError(
                f"all {self.settings.max_kernels} kernels are in use; close an idle session "
                "or raise KERNEL_MCP_MAX_KERNELS"
            )
        self._starting += 1
        try:
            kernel = await self._pool.claim()
            if kernel is not None:
                try:
                    await self._move_to(kernel, session.folder)
                    kernel.assign()
                except BaseException:
                    await asyncio.shield(kernel.shutdown())  # never leak a claimed kernel
                    raise
            else:
                kernel = await self._backend.start_kernel(session.folder)
        finally:
            self._starting -= 1
        kernel.on_orphan = lambda msg: self._on_background(session, msg)
        session.kernel = kernel
        session.last_activity = time.monotonic()
        logger.info("session %s: kernel %s", session.id, kernel.kernel_id)
        return kernel

    @staticmethod
    def _on_background(session: KernelSession, msg: Message) -> None:
        session.background.add_message(msg)

    async def _move_to(self, kernel: KernelConnection, folder: Path) -> None:
        code = f"import os as __ka_os; __ka_os.chdir({str(folder)!r}); del __ka_os"
        result = await run_code(
            kernel,
            code,
            timeout=self.settings.internal_timeout,
            grace=self.settings.interrupt_grace,
            output_cap=65536,
            cwd=folder,
        )
        if result.status != "ok":
            raise KernelStartError(f"a pooled kernel could not move to {folder}: {result.status}")

    async def _cull_loop(self) -> None:
        interval = min(self.settings.cull_interval, self.settings.idle_timeout / 2)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.cull_idle()
            except Exception:
                logger.exception("culling failed")

    async def cull_idle(self) -> int:
        """Shut down kernels idle past the timeout; returns how many."""
        now = time.monotonic()
        culled = 0
        for session in list(self._sessions.values()):
            idle = now - session.last_activity
            if session.kernel is None or session.busy or idle < self.settings.idle_timeout:
                continue
            kernel, session.kernel = session.kernel, None
            session.notice = (
                f"This session's previous kernel was shut down after {idle:.0f} s idle and a "
                "fresh one started; variables defined earlier are gone."
            )
            await kernel.shutdown()
            culled += 1
            logger.info("session %s: kernel culled after %.0f s idle", session.id, idle)
        return culled
