"""Live kernels for tests: kernel_mcp's kernel layer on an event loop of the plugin's own.

The kernel layer is async and its kernels belong to the loop that started them. Tests may
be plain functions or coroutines on loops of any scope, so the plugin runs one event loop
in a background thread per test session (`LoopThread`) and every `SessionManager` on it;
`Kernel.execute` waits with `run_coroutine_threadsafe`, `Kernel.aexecute` awaits the same
call from the test's own loop. A wait that is cut short (Ctrl-C, pytest-timeout, a
cancelled task) cancels the call, which interrupts the kernel, so teardown never waits
for a runaway cell.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from kernel_mcp.backend import KernelInfo
    from kernel_mcp.config import Settings
    from kernel_mcp.execution import ExecutionResult
    from kernel_mcp.sessions import SessionManager

logger = logging.getLogger(__name__)

T = TypeVar("T")

_MARGIN = 30.0  # seconds beyond the kernel layer's own deadlines before a wait gives up


class LoopThread:
    """An asyncio event loop running in a daemon thread."""

    def __init__(self, name: str = "kernel-agent-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
            tasks = asyncio.all_tasks(self.loop)
            for task in tasks:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def run(self, coro: Coroutine[Any, Any, T], within: float) -> T:
        """Run `coro` on the loop and wait for its result, at most `within` seconds.

        Raises:
            TimeoutError: no result in time (the call is cancelled).
        """
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(within)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no result from the kernel layer in {within:.0f} s") from None
        except BaseException:
            future.cancel()  # Ctrl-C or pytest-timeout in the waiting thread: stop the call too
            raise

    async def arun(self, coro: Coroutine[Any, Any, T], within: float) -> T:
        """`run` for a coroutine on another event loop: await the result there."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            async with asyncio.timeout(within):
                return await asyncio.wrap_future(future)
        finally:
            future.cancel()  # no-op once done; stops the call if this wait was cut short

    def stop(self, within: float = 30.0) -> None:
        if self.loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # already stopped
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(within)
        if self._thread.is_alive():
            raise RuntimeError(f"the kernel-agent event loop did not stop in {within:.0f} s")


def _text_of(outputs: list[dict[str, Any]]) -> str:
    from kernel_mcp.rendering import strip_ansi

    parts: list[str] = []
    for output in outputs:
        kind = output.get("output_type")
        if kind == "stream":
            parts.append(output.get("text", ""))
            continue
        if kind == "error":
            lines = output.get("traceback") or [f"{output.get('ename')}: {output.get('evalue')}"]
            piece = "\n".join(lines)
        elif kind in ("execute_result", "display_data"):
            piece = output.get("data", {}).get("text/plain", "")
        else:
            continue
        if piece:
            parts.append(piece if piece.endswith("\n") else piece + "\n")
    return strip_ansi("".join(parts))


@dataclass(frozen=True)
class KernelResult:
    """What one execution produced.

    Attributes:
        status: "ok", "error" (an exception in the code), "timeout_interrupted",
            "restarted_state_lost" or "kernel_died".
        execution_count: the cell's `In[n]`, None if it never ran.
        outputs: nbformat v4 output dicts (stream, execute_result, display_data, error).
        message: a sentence from the kernel layer on a timeout, restart or lost state.
        raw: the kernel layer's `ExecutionResult` (truncation, background output, ...).
    """

    status: str
    execution_count: int | None
    outputs: list[dict[str, Any]]
    message: str | None
    raw: ExecutionResult = field(repr=False)

    @classmethod
    def of(cls, result: ExecutionResult) -> KernelResult:
        return cls(
            status=result.status,
            execution_count=result.execution_count,
            outputs=list(result.outputs),
            message=result.message,
            raw=result,
        )

    @property
    def text(self) -> str:
        """All text output joined, ANSI codes stripped: streams, `text/plain` of results and
        displays, and the traceback of an error."""
        return _text_of(self.outputs)

    @property
    def error(self) -> dict[str, Any] | None:
        """The error output (`ename`, `evalue`, `traceback`), if the code raised."""
        return next((o for o in self.outputs if o.get("output_type") == "error"), None)


class KernelHost:
    """The plugin's event-loop thread and every kernel layer (SessionManager) on it."""

    def __init__(self) -> None:
        self.loop = LoopThread()
        self._managers: list[SessionManager] = []

    def start_manager(self, settings: Settings) -> SessionManager:
        """Start a SessionManager (and its warm pool) with `settings` on the loop."""
        from kernel_mcp.sessions import SessionManager

        async def start() -> SessionManager:
            manager = SessionManager(settings)
            await manager.start()
            return manager

        manager = self.loop.run(start(), settings.startup_timeout + _MARGIN)
        self._managers.append(manager)
        return manager

    def close_manager(self, manager: SessionManager) -> None:
        """Shut down every kernel of `manager`."""
        if manager in self._managers:
            self._managers.remove(manager)
            self.loop.run(manager.close(), _lifecycle_deadline(manager.settings))

    def close(self) -> None:
        try:
            for manager in list(self._managers):
                try:
                    self.close_manager(manager)
                except Exception:
                    logger.exception("kernel-agent: closing a kernel layer failed")
        finally:
            self.loop.stop()


def _lifecycle_deadline(settings: Settings) -> float:
    return (
        settings.startup_timeout
        + settings.shutdown_timeout
        + 2 * settings.interrupt_grace
        + settings.internal_timeout
        + _MARGIN
    )


class Kernel:
    """One live kernel session for a test: a persistent kernel and its private folder.

    Attributes:
        session_id: the session's id in the kernel layer.
        folder: the session folder on this machine (the kernel's working folder; a
            sandboxed kernel sees it as /home/session).
    """

    def __init__(self, host: KernelHost, manager: SessionManager, session_id: str) -> None:
        self._host = host
        self._manager = manager
        self.session_id = session_id
        self.folder: Path = manager.settings.workspace / session_id
        self.closed = False

    def __repr__(self) -> str:
        return f"<Kernel session {self.session_id}>"

    @property
    def settings(self) -> Settings:
        """The kernel layer's settings this kernel runs with."""
        return self._manager.settings

    def _execute_deadline(self, timeout: float | None) -> float:
        settings = self._manager.settings
        return (timeout or settings.execute_timeout) + _lifecycle_deadline(settings)

    async def _execute(self, code: str, timeout: float | None) -> KernelResult:
        return KernelResult.of(await self._manager.execute(self.session_id, code, timeout))

    def execute(self, code: str, timeout: float | None = None) -> KernelResult:
        """Run `code` and return what it produced; an exception in `code` is a result.

        `timeout` defaults to the kernel layer's `execute_timeout`; past it the kernel is
        interrupted (its state kept) and the status says `timeout_interrupted`.
        """
        return self._host.loop.run(self._execute(code, timeout), self._execute_deadline(timeout))

    async def aexecute(self, code: str, timeout: float | None = None) -> KernelResult:
        """`execute` for asyncio tests (any event loop)."""
        coro = self._execute(code, timeout)
        return await self._host.loop.arun(coro, self._execute_deadline(timeout))

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._host.loop.run(coro, _lifecycle_deadline(self._manager.settings))

    async def _arun(self, coro: Coroutine[Any, Any, T]) -> T:
        return await self._host.loop.arun(coro, _lifecycle_deadline(self._manager.settings))

    def interrupt(self) -> None:
        """Interrupt the running cell (from another thread, or see `ainterrupt`)."""
        self._run(self._manager.interrupt(self.session_id))

    async def ainterrupt(self) -> None:
        await self._arun(self._manager.interrupt(self.session_id))

    def restart(self) -> None:
        """Restart the kernel: its variables are gone, its files are kept."""
        self._run(self._manager.restart(self.session_id))

    async def arestart(self) -> None:
        await self._arun(self._manager.restart(self.session_id))

    def list_variables(self) -> list[dict[str, Any]]:
        """Names, types and short descriptions of the user's variables (runs no user code)."""
        return self._run(self._manager.list_variables(self.session_id))

    def info(self) -> KernelInfo:
        """Kernel id, pid and connection file (attach with `jupyter console --existing`)."""
        return self._run(self._manager.kernel_info(self.session_id))

    def shutdown(self) -> None:
        """Shut the kernel down and delete its folder (done for you after the test)."""
        if self.closed:
            return
        self.closed = True
        if self._host.loop.alive:
            self._run(self._manager.delete_session(self.session_id))


class KernelFactory:
    """Starts kernels for one test and shuts every one of them down after it.

    `kernel_factory()` starts a kernel with the plugin's kernel settings (the
    `kernel_mcp_settings` fixture); keyword arguments override settings of the kernel
    layer for that kernel (`kernel_factory(memory_limit_bytes=2**30)`), which then runs
    under a kernel layer of its own.
    """

    def __init__(
        self, host: KernelHost, shared: Callable[[], SessionManager], settings: Settings
    ) -> None:
        self._host = host
        self._shared = shared  # returns the shared SessionManager, started on first use
        self._settings = settings
        self._kernels: list[Kernel] = []
        self._own_managers: list[SessionManager] = []

    def __call__(self, session_id: str | None = None, **settings: Any) -> Kernel:
        """Start a kernel and wait until it is ready; returns it."""
        if settings:
            manager = self._host.start_manager(self._settings_with(settings))
            self._own_managers.append(manager)
        else:
            manager = self._shared()
        kernel = Kernel(self._host, manager, session_id or f"test-{uuid.uuid4().hex[:12]}")
        self._kernels.append(kernel)
        kernel.info()  # starts the kernel now: a test's first execution does not wait for it
        return kernel

    @property
    def kernels(self) -> list[Kernel]:
        """The kernels started so far."""
        return list(self._kernels)

    def _settings_with(self, overrides: dict[str, Any]) -> Settings:
        base = self._settings
        folder = base.workspace.parent / f"own-{uuid.uuid4().hex[:8]}"
        values = {
            **base.model_dump(),
            "pool_size": 0,
            "workspace": folder / "ws",
            "runtime_dir": folder / "rt",
            **overrides,
        }
        return type(base)(**values)

    def close(self) -> None:
        """Shut down every kernel this factory started (whatever happened in the test)."""
        errors: list[BaseException] = []
        for kernel in self._kernels:
            try:
                kernel.shutdown()
            except Exception as exc:
                errors.append(exc)
        for manager in self._own_managers:
            try:
                self._host.close_manager(manager)
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
