"""A randomized stateful test of sessions on live kernels (hypothesis RuleBasedStateMachine).

Two sessions get random interleavings of execute, concurrent execute, cancel, interrupt,
restart, concurrent restart, SIGKILL of the kernel, cull and close. After every step:
at most one kernel process per session, the manager tracks exactly the kernels that run,
and every result holds its own cell's output and says whether earlier state was lost.
Set KERNEL_AGENT_STATEFUL_EXAMPLES to run more examples than CI does.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kernel_mcp.config import Settings
from kernel_mcp.sessions import SessionManager

from .conftest import RecordingBackend, wait_for_exit, wait_until

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(900)]

SESSIONS = st.sampled_from(["a", "b"])
RUNNING = "import time\nprint('running', flush=True)\ntime.sleep(3600)"


def _code(n: int) -> str:
    return f"print('out-{n}', v if 'v' in globals() else 'none')\nv = {n}"


class KernelSessions(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.folder = Path(tempfile.mkdtemp(prefix="ka-sm-"))
        config = Settings(
            workspace=self.folder / "ws",
            runtime_dir=self.folder / "rt",
            pool_size=0,
            idle_timeout=3600,
        )
        self.backend = RecordingBackend(config)
        self.manager = SessionManager(config, self.backend)
        self.run(self.manager.start())
        self.model: dict[str, Any] = {"a": None, "b": None}
        self.counter = 0

    def run(self, awaitable: Any) -> Any:
        return self.loop.run_until_complete(awaitable)

    def next_value(self) -> int:
        self.counter += 1
        return self.counter

    def check(self, session: str, n: int, result: Any) -> None:
        """`result` of `_code(n)`: its own output only, and any loss of state reported."""
        if result.status == "kernel_died":  # killed by the sigkill rule: said, never silent
            assert result.state_lost
            assert "not run" in (result.message or ""), result.message
            assert result.outputs == []
            self.model[session] = None
            return
        assert result.status == "ok", (result.status, result.message)
        printed = "".join(o["text"] for o in result.outputs if o["output_type"] == "stream")
        first, _, previous = printed.strip().partition(" ")
        assert first == f"out-{n}", printed
        expected = self.model[session]
        if result.state_lost:
            assert previous == "none", printed
        else:
            assert previous == ("none" if expected is None else str(expected)), (
                f"state changed silently: {printed!r}, expected {expected!r}"
            )
        self.model[session] = n

    @rule(session=SESSIONS)
    def execute(self, session: str) -> None:
        n = self.next_value()
        self.check(session, n, self.run(self.manager.execute(session, _code(n), timeout=60)))

    @rule(session=SESSIONS)
    def concurrent_execute(self, session: str) -> None:
        first, second = self.next_value(), self.next_value()

        async def both() -> list[Any]:
            return list(
                await asyncio.gather(
                    self.manager.execute(session, _code(first), timeout=60),
                    self.manager.execute(session, _code(second), timeout=60),
                )
            )

        one, two = self.run(both())
        self.check(session, first, one)
        self.check(session, second, two)

    def revive(self, session: str) -> None:
        """A kernel killed while idle reports its death on the next call: make that call."""
        sessions = {s.id: s for s in self.manager.sessions()}
        kernel = sessions[session].kernel if session in sessions else None
        if kernel is not None and kernel.state == "dead":
            self.execute(session)

    async def _running(self, session: str) -> asyncio.Task[Any]:
        seen: list[str] = []

        def on_output(msg: dict[str, Any]) -> None:
            seen.append(msg["content"].get("text", ""))

        task = asyncio.create_task(
            self.manager.execute(session, RUNNING, timeout=300, on_output=on_output)
        )
        while "running\n" not in "".join(seen):
            assert not task.done(), task.result()
            await asyncio.sleep(0.02)
        return task

    @rule(session=SESSIONS)
    def cancel(self, session: str) -> None:
        self.revive(session)

        async def go() -> None:
            task = await self._running(session)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        self.run(go())
        # State is kept when the interrupt works, else the next call is told.

    @rule(session=SESSIONS)
    def interrupt(self, session: str) -> None:
        self.revive(session)

        async def go() -> Any:
            task = await self._running(session)
            assert await self.manager.interrupt(session)
            return await task

        result = self.run(go())
        assert result.outputs[-1]["ename"] == "KeyboardInterrupt"
        assert not result.kernel_restarted
        if result.state_lost:  # a notice (culled before) was told with this result
            self.model[session] = None

    @rule(session=SESSIONS, times=st.integers(1, 3))
    def restart(self, session: str, times: int) -> None:
        async def go() -> None:
            await asyncio.gather(*(self.manager.restart(session) for _ in range(times)))

        self.run(go())
        self.model[session] = None  # asked for: the tool says so, the next call need not

    @rule(session=SESSIONS)
    def sigkill(self, session: str) -> None:
        sessions = {s.id: s for s in self.manager.sessions()}
        kernel = sessions[session].kernel if session in sessions else None
        if kernel is None or kernel.connection.dead:
            return
        pid = kernel.connection.info().pid
        assert pid is not None
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # exited already: a settling restart is replacing it
            return
        self.run(wait_for_exit(pid))
        # Then until kernel_mcp has seen it (or a settling restart already replaced it).
        self.run(
            wait_until(
                lambda: kernel.connection.dead or kernel.connection.info().pid != pid,
                "the death to be seen",
            )
        )

    @rule(session=SESSIONS)
    def cull(self, session: str) -> None:
        sessions = {s.id: s for s in self.manager.sessions()}
        if session in sessions:
            sessions[session].last_activity = -1e9
        self.run(self.manager.cull_idle())

    @rule(session=SESSIONS)
    def close(self, session: str) -> None:
        self.run(self.manager.close_session(session))
        self.model[session] = None

    @invariant()
    def one_kernel_process_per_session(self) -> None:
        live = [s for s in self.manager.sessions() if s.kernel is not None]
        assert self.manager.stats()["kernels_running"] == len(live)
        files = {s.id: s.kernel.connection.info().connection_file for s in live if s.kernel}
        counts = dict.fromkeys(files, 0)
        for process in psutil.process_iter(["cmdline", "status", "name"]):
            # bwrap, the sandbox around a kernel, names the connection file too.
            if process.info["status"] == psutil.STATUS_ZOMBIE or process.info["name"] == "bwrap":
                continue
            cmdline = " ".join(process.info["cmdline"] or [])
            for session, connection_file in files.items():
                if connection_file and os.path.basename(connection_file) in cmdline:
                    counts[session] += 1
        assert all(count <= 1 for count in counts.values()), counts

    def teardown(self) -> None:
        try:
            self.run(self.manager.close())
            pids = set(self.backend.pids)
            pids.update(p for k in self.backend.kernels if (p := k.info().pid))
            gone = psutil.wait_procs([_process(p) for p in pids if psutil.pid_exists(p)], 30)
            assert not [p.pid for p in gone[1] if p.status() != psutil.STATUS_ZOMBIE]
        finally:
            self.loop.close()
            shutil.rmtree(self.folder, ignore_errors=True)


def _process(pid: int) -> psutil.Process:
    return psutil.Process(pid)


KernelSessions.TestCase.settings = settings(
    max_examples=int(os.environ.get("KERNEL_AGENT_STATEFUL_EXAMPLES", "3")),
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_kernel_sessions = KernelSessions.TestCase
