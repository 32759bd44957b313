"""Kernel processes of this test run: finding them, telling whose they are, stopping them.

A kernel process is a live descendant of the pytest process whose command line runs
ipykernel (jupyter_client's `ipykernel_launcher`, kernel_mcp's `_kernel_launcher.py`, or
bwrap around either). Its *root* is its ancestor that is a direct child of pytest: the
kernel itself (or its bwrap) when pytest started it, or a server process that did.
Processes are keyed by pid and start time, so a reused pid is a different process.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import psutil

_MARKERS = ("ipykernel", "_kernel_launcher")

Key = tuple[int, float]


@dataclass(frozen=True)
class KernelProcess:
    """One kernel process (or the bwrap sandbox around one)."""

    pid: int
    created: float
    cmdline: tuple[str, ...]
    root: Key
    """The key of its ancestor that is a direct child of this process."""

    @property
    def key(self) -> Key:
        return (self.pid, self.created)

    def describe(self) -> str:
        text = " ".join(self.cmdline)
        return f"pid {self.pid}: {text if len(text) <= 160 else text[:157] + '...'}"


def kernel_processes() -> dict[Key, KernelProcess]:
    """Every running kernel process started (directly or not) by this process."""
    me = os.getpid()
    found: dict[Key, KernelProcess] = {}
    try:
        children = psutil.Process(me).children(recursive=True)
    except psutil.Error:
        return found
    for child in children:
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = tuple(child.cmdline())
            if not any(marker in arg for arg in cmdline for marker in _MARKERS):
                continue
            root = child
            for ancestor in child.parents():
                if ancestor.pid == me:
                    break
                root = ancestor
            process = KernelProcess(child.pid, child.create_time(), cmdline, _key(root))
        except psutil.Error:
            continue
        found[process.key] = process
    return found


def child_processes() -> set[Key]:
    """The processes this process started itself (kernels, servers, anything)."""
    keys = set()
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(os.getpid()).children():
            with contextlib.suppress(psutil.Error):
                keys.add(_key(child))
    return keys


def _key(process: psutil.Process) -> Key:
    return (process.pid, process.create_time())


@dataclass(frozen=True)
class Snapshot:
    """The kernels and direct children of this process at one moment."""

    kernels: dict[Key, KernelProcess]
    children: set[Key]

    @classmethod
    def now(cls) -> Snapshot:
        return cls(kernel_processes(), child_processes())


def running(processes: Iterable[KernelProcess]) -> list[KernelProcess]:
    """Those of `processes` still running (a zombie has ended)."""
    alive = []
    for process in processes:
        try:
            handle = psutil.Process(process.pid)
            if handle.create_time() == process.created and handle.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.Error:
            continue
    return alive


def wait_for_exit(processes: Iterable[KernelProcess], within: float) -> list[KernelProcess]:
    """Poll until `processes` have ended or `within` seconds passed; returns those running."""
    deadline = time.monotonic() + within
    alive = running(processes)
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = running(alive)
    return alive


def kill(processes: Iterable[KernelProcess], within: float = 5.0) -> list[KernelProcess]:
    """SIGKILL `processes` (sandboxes first end their whole PID namespace); returns survivors."""
    handles = []
    for process in running(processes):
        with contextlib.suppress(psutil.Error):
            handle = psutil.Process(process.pid)
            handle.kill()
            handles.append(handle)
    with contextlib.suppress(psutil.Error):
        psutil.wait_procs(handles, timeout=within)
    return running(processes)


class LeakTracker:
    """Finds kernel processes a test, or a fixture wider than a test, left running.

    A kernel is a test's when its root (see the module docstring) was started while the test
    ran: it must be gone when the test's teardown ends. Kernels under processes that ran
    before the test (a server subprocess of a session fixture, say) are not the test's.
    Kernels and processes started while a module- or session-scoped fixture was set up are
    that fixture's: its kernels must be gone when it is finalized. Kernels `owned` says are
    the plugin's own, stopped with its fixtures.
    """

    def __init__(self, owned: Callable[[KernelProcess], bool], grace: float = 5.0) -> None:
        self._owned = owned
        self._grace = grace
        self._roots: set[Key] = set()
        self._fixture_roots: dict[Key, int] = {}
        self._by_fixture: dict[Key, tuple[int, str]] = {}
        self.fixture_leaks: list[tuple[str, list[KernelProcess]]] = []

    def begin_test(self) -> None:
        self._roots = child_processes()

    def fixture_started(self, fixture: int, name: str, before: Snapshot) -> None:
        """A wide-scoped fixture was set up: what started since `before` is its own.

        Args:
            fixture: an id of the fixture definition; name: its name, for the report.
        """
        for key in child_processes() - before.children:
            self._fixture_roots[key] = fixture
        for key, process in kernel_processes().items():
            if key not in before.kernels and not self._owned(process):
                self._by_fixture[key] = (fixture, name)

    def fixture_finished(self, fixture: int, name: str) -> None:
        """A fixture was finalized: any kernel it started and left running is a leak."""
        self._fixture_roots = {k: f for k, f in self._fixture_roots.items() if f != fixture}
        keys = [key for key, (owner, _) in self._by_fixture.items() if owner == fixture]
        if not keys:
            return
        current = kernel_processes()
        for key in keys:
            del self._by_fixture[key]
        left = [current[key] for key in keys if key in current]
        leaked = self._stop(left)
        if leaked:
            self.fixture_leaks.append((name, leaked))

    def take_fixture_leaks(self) -> list[tuple[str, list[KernelProcess]]]:
        leaks, self.fixture_leaks = self.fixture_leaks, []
        return leaks

    def end_test(self) -> list[KernelProcess]:
        """After a test's teardown: the kernels it started that still run, now killed."""
        left = [
            process
            for key, process in kernel_processes().items()
            if process.root not in self._roots
            and process.root not in self._fixture_roots
            and key not in self._by_fixture
            and not self._owned(process)
        ]
        return self._stop(left)

    def _stop(self, left: list[KernelProcess]) -> list[KernelProcess]:
        if not left:
            return []
        # A kernel whose owner has just been stopped (bwrap --die-with-parent, a killed
        # server) may still be on its way out: only one running past the grace is a leak.
        leaked = wait_for_exit(left, self._grace)
        kill(leaked)
        return leaked


def describe(processes: Iterable[KernelProcess]) -> str:
    return "\n".join(f"  {p.describe()}" for p in processes)
