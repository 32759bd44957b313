"""Sessions: one persistent kernel and one private folder per session key.

The manager owns every kernel: it claims them from the warm pool (or starts one
cold), runs one execution at a time per session (later calls queue in order),
culls idle kernels, evicts the least recently used idle one when every kernel is
taken, and shuts everything down on close. Each kernel's lifecycle is serialized
by its `KernelSupervisor`; retiring a session's kernel (close, cull, evict) also
holds the session's lock, so no call can meet a kernel half-way shut down.
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
    KernelClosed,
    KernelError,
    KernelStartError,
    SessionNotFound,
)
from .execution import ExecutionResult, run_code
from .files import remove_folder
from .outputs import OutputCollector
from .pool import KernelPool
from .supervisor import KernelSupervisor

logger = logging.getLogger(__name__)

_SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_BACKGROUND_CAP = 64 * 1024

# Lists the user's variables without running any of the user's code: no repr, no
# attribute access, no isinstance on user objects (each can be overridden to run code, and
# code that ignores SIGINT would cost the kernel). Values of a few builtin types show their
# value; numpy arrays and pandas frames their shape; everything else its type.
_LIST_VARIABLES = """
def __kernel_agent_variables():
    import json, sys, types
    ip = get_ipython()
    hidden = ip.user_ns_hidden
    attr = type.__dict__  # read class attributes past any metaclass of the user's
    module_of, name_of = attr["__module__"].__get__, attr["__qualname__"].__get__
    plain = (int, float, complex, bool, str, bytes, type(None))
    sized = (list, tuple, dict, set, frozenset)
    shaped = {("numpy", "ndarray"), ("pandas.core.frame", "DataFrame"),
              ("pandas.core.series", "Series")}
    rows = []
    for name, value in list(ip.user_ns.items()):
        kind = type(value)
        if (type(name) is not str or name.startswith("_") or name in hidden
                or kind is types.ModuleType):
            continue
        qualified = (module_of(kind), name_of(kind))
        row = {"name": name, "type": qualified[1]}
        if any(kind is t for t in plain):
            text = repr(value[:300] if kind is str or kind is bytes else value)
            row["repr"] = text if len(text) <= 200 else text[:197] + "..."
        elif qualified in shaped:
            row["shape"] = list(value.shape)
            row["repr"] = f"<{qualified[1]} of shape {tuple(value.shape)}>"
        elif any(kind is t for t in sized):
            row["repr"] = f"<{qualified[1]} of {len(value)} items>"
        elif kind is types.FunctionType:
            row["repr"] = f"<function {name}>"
        else:
            row["repr"] = f"<{qualified[0]}.{qualified[1]} object>"
        rows.append(row)
    sys.stdout.write(json.dumps(rows) + "\\n")
__kernel_agent_variables()
del __kernel_agent_variables
"""


@dataclass
class KernelSession:
    """One session's kernel, folder and bookkeeping."""

    id: str
    folder: Path
    kernel: KernelSupervisor | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held by each call on the session, and by whoever retires its kernel."""
    created: float = field(default_factory=time.time)
    last_activity: float = field(default_factory=time.monotonic)
    notice: str | None = None
    """Told with the next result: why earlier state is gone (culled, evicted, restarted)."""
    background: OutputCollector = field(default_factory=lambda: OutputCollector(_BACKGROUND_CAP))
    closed: bool = False

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
    """Owns all kernels: sessions, pool, culling, eviction."""

    def __init__(self, settings: Settings, backend: KernelBackend | None = None) -> None:
        if backend is None and settings.backend == "gateway":
            from .gateway_kernel import GatewayBackend

            backend = GatewayBackend(settings)
        elif backend is None:
            from .local_kernel import LocalBackend

            backend = LocalBackend(settings)
        self.settings = settings
        self._backend = backend
        self._sessions: dict[str, KernelSession] = {}
        self._kernels: set[KernelSupervisor] = set()
        """Every kernel not yet shut down, claimed by a session or being retired."""
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
        for session in self._sessions.values():
            session.kernel = None
        # Joins any shutdown already under way (a cull the cancellation interrupted).
        kernels = list(self._kernels)
        for kernel in kernels:  # shared kernels outlive this replica; the gateway culls them
            kernel.connection.keep_running = self._backend.shared
        await asyncio.gather(*(k.aclose() for k in kernels), return_exceptions=True)
        self._kernels.clear()
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

    def folder(self, session_id: str) -> Path:
        """The session's folder (which may not exist yet); InvalidSessionId if it cannot."""
        return self.settings.workspace / validate_session_id(session_id)

    def kernel_folder(self, session_id: str) -> str:
        """The session's folder as its kernel sees it (its working folder)."""
        return self._backend.kernel_path(self.folder(session_id))

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
            "kernels_running": len(self._kernels),
            "pool_ready": len(self._pool),
            "pool_size": self.settings.pool_size,
            "max_kernels": self.settings.max_kernels,
        }

    async def close_session(self, session_id: str) -> bool:
        """Shut the session's kernel down (after any running call) and forget it."""
        session = self._sessions.get(session_id)
        if session is None:
            # Shared: another replica's kernel, or one this replica let go, may still run.
            async with self._backend.session_guard(session_id):
                return await self._backend.shut_session_kernel(session_id)
        async with session.lock, self._backend.session_guard(session_id):
            session.closed = True  # calls queued on this session start over on a new one
            if self._sessions.get(session_id) is session:
                del self._sessions[session_id]
            await self._retire(session, None)
            await self._backend.shut_session_kernel(session_id)  # if this replica had none
        return True

    async def delete_session(self, session_id: str) -> bool:
        """Close the session and delete its folder, so a new session of this id starts empty.

        Returns whether the session was open.
        """
        validate_session_id(session_id)
        closed = await self.close_session(session_id)
        await asyncio.to_thread(remove_folder, self.settings.workspace / session_id)
        logger.info("session %s: folder deleted", session_id)
        return closed

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
            async with self._backend.session_guard(session_id):
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
                    image_cap=settings.image_cap_bytes,
                    on_output=on_output,
                    on_lost=lambda message: self._tell_later(session, message),
                    iopub_quiet=settings.iopub_quiet,
                )
            finally:
                session.last_activity = time.monotonic()
            notice, session.notice = session.notice, None
        result.background_outputs = background.outputs()
        if notice:
            result.message = " ".join(filter(None, [notice, result.message]))
            result.state_lost = True
        return result

    async def interrupt(self, session_id: str) -> bool:
        """Interrupt the running code; False when the session has no kernel."""
        session = self._sessions.get(session_id)
        if session is None or session.kernel is None or session.kernel.closed:
            # A shared backend: another replica may be running this session's code.
            return await self._backend.interrupt_session(session_id)
        await session.kernel.interrupt()
        return True

    async def restart(self, session_id: str) -> None:
        """Restart the session's kernel (its variables are lost).

        Not behind the session's lock, so it can stop a cell that hangs: that call is told
        the kernel was restarted. Concurrent restarts become one.
        """
        session = self.session(session_id)
        kernel = session.kernel
        if kernel is not None and not kernel.closed:
            with contextlib.suppress(KernelClosed):  # retired meanwhile: a fresh one below
                await kernel.restart()
                session.notice = None  # the caller asked for it and is told by the tool
                session.last_activity = time.monotonic()
                return
        if await self._backend.restart_session(session_id):
            # Restarted where it runs (another replica may hold it, or a cell hang in it).
            session.notice = None
            return
        async with self._locked(session_id) as session:
            await self._kernel_for(session)
            session.notice = None

    async def list_variables(self, session_id: str) -> list[dict[str, Any]]:
        """Names, types and short descriptions of the user's variables (no user code runs)."""
        result = await self._internal(session_id, _LIST_VARIABLES)
        text = "".join(
            o["text"]
            for o in result.outputs
            if o["output_type"] == "stream" and o["name"] == "stdout"
        )
        if result.status != "ok":
            raise KernelError(f"listing variables failed: {result.status} {result.message or ''}")
        rows: list[dict[str, Any]] = json.loads(text.strip().splitlines()[-1])
        return rows

    def running_kernel_info(self, session_id: str) -> KernelInfo | None:
        """The session's kernel, if it has one: a pure read that starts nothing."""
        session = self._sessions.get(session_id)
        kernel = session.kernel if session is not None else None
        if kernel is None or kernel.closed:
            return None
        return kernel.connection.info()

    async def kernel_info(self, session_id: str) -> KernelInfo:
        """Kernel id, pid, connection file and language of the session's kernel (started)."""
        async with self._locked(session_id) as session:
            kernel = await self._kernel_for(session)
        return kernel.connection.info()

    # -- internals ------------------------------------------------------------

    async def _internal(self, session_id: str, code: str) -> ExecutionResult:
        """Run our own code: silent (no count, no history), its state loss kept for later."""
        async with self._locked(session_id) as session:
            kernel = await self._kernel_for(session)
            result = await run_code(
                kernel,
                code,
                timeout=self.settings.internal_timeout,
                grace=self.settings.interrupt_grace,
                output_cap=4 * 1024 * 1024,
                on_lost=lambda message: self._tell_later(session, message),
                silent=True,
                iopub_quiet=self.settings.iopub_quiet,
            )
            if result.state_lost and result.message:
                # Nobody else sees this result: the next execution must hear of the loss.
                self._tell_later(session, result.message)
        return result

    @staticmethod
    def _tell_later(session: KernelSession, message: str) -> None:
        """The session's next execution result says `message` (why its state is gone)."""
        session.notice = " ".join(filter(None, [session.notice, message]))

    async def _kernel_for(self, session: KernelSession) -> KernelSupervisor:
        """The session's kernel, claimed or started on first use. Hold session.lock."""
        if session.kernel is not None and not session.kernel.closed:
            return session.kernel
        session.kernel = None
        if len(self._kernels) + self._starting >= self.settings.max_kernels:
            await self._evict_for(session)
        self._starting += 1
        try:
            # Shared: another replica may run the session's kernel; find it before claiming.
            connection = await self._backend.find_kernel(session.id, session.folder)
            if connection is not None:
                kernel = self._supervise(connection, session.folder)
            elif (pooled := await self._pool.claim()) is not None:
                connection = pooled
                kernel = self._supervise(connection, session.folder)
                try:
                    folder = self._backend.claim_folder(connection, session.folder)
                    await self._move_to(kernel, folder)
                    connection.assign(session.id)
                except BaseException:
                    await asyncio.shield(self._shut(kernel))  # never leak a claimed kernel
                    raise
            else:
                connection = await self._backend.open_kernel(session.id, session.folder)
                kernel = self._supervise(connection, session.folder)
                connection.assign(session.id)
        finally:
            self._starting -= 1
        if connection.notice:  # the backend found the session's earlier kernel gone
            self._tell_later(session, connection.notice)
        connection.on_orphan = lambda msg: self._on_background(session, msg)
        connection.on_notice = lambda message: self._tell_later(session, message)
        session.kernel = kernel
        session.last_activity = time.monotonic()
        logger.info("session %s: kernel %s", session.id, kernel.kernel_id)
        return kernel

    def _supervise(self, connection: KernelConnection, folder: Path) -> KernelSupervisor:
        kernel = KernelSupervisor(connection, folder, start_wait=self.settings.interrupt_grace)
        self._kernels.add(kernel)
        return kernel

    async def _shut(self, kernel: KernelSupervisor) -> None:
        try:
            await kernel.aclose()
        finally:
            self._kernels.discard(kernel)

    async def _retire(self, session: KernelSession, notice: str | None) -> None:
        """Shut the session's kernel down and say why on its next call. Hold session.lock."""
        kernel, session.kernel = session.kernel, None
        if kernel is None:
            return
        if notice and self._backend.shared:
            # Culled or evicted here, a shared kernel may serve other replicas: let go of it
            # (it is stopped if idle on the gateway too); whoever finds it gone says so.
            kernel.connection.keep_running = True
            notice = None
        if notice:
            self._tell_later(session, notice)
        await self._shut(kernel)

    async def _evict_for(self, session: KernelSession) -> None:
        """At capacity: shut the least recently used idle kernel down, or refuse."""
        idle = [
            s
            for s in self._sessions.values()
            if s is not session and s.kernel is not None and not s.busy
        ]
        if not idle:
            raise CapacityError(
                f"all {self.settings.max_kernels} kernels are busy; try again when a call "
                "finishes, or raise KERNEL_MCP_MAX_KERNELS"
            )
        victim = min(idle, key=lambda s: s.last_activity)
        async with victim.lock:  # free now (not busy): taken without waiting
            logger.info("session %s: kernel evicted to make room (at capacity)", victim.id)
            await self._retire(
                victim,
                f"This session's previous kernel was shut down to make room for another "
                f"session (all {self.settings.max_kernels} kernels were in use) and a fresh "
                "one started; variables defined earlier are gone.",
            )

    @staticmethod
    def _on_background(session: KernelSession, msg: Message) -> None:
        session.background.add_message(msg)

    async def _move_to(self, kernel: KernelSupervisor, folder: Path) -> None:
        code = f"import os as __ka_os; __ka_os.chdir({str(folder)!r}); del __ka_os"
        result = await run_code(
            kernel,
            code,
            timeout=self.settings.internal_timeout,
            grace=self.settings.interrupt_grace,
            output_cap=65536,
            silent=True,
            iopub_quiet=self.settings.iopub_quiet,
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
        culled = 0
        for session in list(self._sessions.values()):
            idle = time.monotonic() - session.last_activity
            if session.kernel is None or session.busy or idle < self.settings.idle_timeout:
                continue
            async with session.lock:  # free now (not busy): taken without waiting
                await self._retire(
                    session,
                    f"This session's previous kernel was shut down after {idle:.0f} s idle "
                    "and a fresh one started; variables defined earlier are gone.",
                )
            culled += 1
            logger.info("session %s: kernel culled after %.0f s idle", session.id, idle)
        return culled
