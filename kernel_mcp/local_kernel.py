"""Local kernels through jupyter_client: the only module that imports it.

Each kernel gets two reader tasks that drain IOPub and the shell channel
continuously (ZeroMQ drops IOPub messages silently past its high-water mark when
nobody reads) and route every message by its parent msg_id. Process death is
seen at once through a pidfd (a short poll where pidfd is unavailable).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import stat
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import psutil
import zmq
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from . import sandbox
from .backend import (
    ExecutionListener,
    KernelBackend,
    KernelConnection,
    KernelInfo,
    Loss,
    Message,
)
from .config import Settings
from .errors import KernelStartError

logger = logging.getLogger(__name__)

_LAUNCHER = str(Path(__file__).with_name("_kernel_launcher.py"))
# The name written into connection files: JupyterLab shows attached kernels as Python 3.
_KERNEL_NAME = "python3"
_OUTPUT_TYPES = frozenset({"stream", "display_data", "execute_result", "error"})
_READ_RECHECK = 0.5  # seconds
_IPC_PATH_MAX = 100  # sun_path is 108 bytes; leave room for "-<port>"


class _SpecManager(KernelSpecManager):
    """Serves our one in-memory kernel spec."""

    spec: KernelSpec | None = None

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        assert self.spec is not None
        return self.spec


class _ReadyProbe:
    """Listener for the kernel_info handshake: a reply on shell plus idle on IOPub.

    Every attempt stays registered: under load a reply may come after the next
    attempt was sent, and any attempt seen on both channels proves readiness.
    """

    def __init__(self) -> None:
        self.replies: dict[str, Message] = {}
        self.idle: set[str] = set()
        self.ready: Message | None = None
        self.lost = False
        self.done = asyncio.Event()

    def on_iopub(self, msg: Message) -> None:
        if msg["header"]["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            self.idle.add(msg["parent_header"]["msg_id"])
            self._check(msg["parent_header"]["msg_id"])

    def on_reply(self, msg: Message) -> None:
        self.replies[msg["parent_header"]["msg_id"]] = msg
        self._check(msg["parent_header"]["msg_id"])

    def on_kernel_lost(self, reason: Loss) -> None:
        self.lost = True
        self.done.set()

    def _check(self, msg_id: str) -> None:
        if msg_id in self.replies and msg_id in self.idle:
            self.ready = self.replies[msg_id]
            self.done.set()


class LocalKernel(KernelConnection):
    """A kernel process on this machine, driven through jupyter_client."""

    def __init__(self, km: AsyncKernelManager, settings: Settings) -> None:
        self._km = km
        self._settings = settings
        self._kc = km.client()
        self.kernel_id: str = km.kernel_id or ""
        self.generation = 0
        self._listeners: dict[str, ExecutionListener] = {}
        self._readers: list[asyncio.Task[None]] = []
        self._watch_fd: int | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._dead = False
        self._language_info: dict[str, Any] = {}
        self.on_orphan = None

    # -- lifecycle ------------------------------------------------------------

    async def open(self, timeout: float) -> None:
        """Connect the channels, start the readers and wait for the kernel."""
        self._open_channels()
        self._watch_process()
        await self._wait_ready(timeout)

    def _open_channels(self) -> None:
        # No receive high-water mark: ZeroMQ queues IOPub on its own I/O thread however far
        # our reader lags, instead of letting the kernel's PUB socket drop messages past 1,000.
        # The output cap bounds what we keep once read.
        self._kc.context.setsockopt(zmq.RCVHWM, 0)
        self._kc.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=False)
        self._readers = [
            asyncio.create_task(self._read(self._kc.iopub_channel, iopub=True)),
            asyncio.create_task(self._read(self._kc.shell_channel, iopub=False)),
        ]

    async def _close_channels(self) -> None:
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        self._readers = []
        self._kc.stop_channels()

    async def _wait_ready(self, timeout: float) -> None:
        # Repeat kernel_info until one is answered on shell and reported idle on IOPub:
        # then IOPub is connected and no output of the next request can be missed.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        probe = _ReadyProbe()
        sent: list[str] = []
        interval = 0.1
        try:
            while loop.time() < deadline:
                if self._dead or probe.lost:
                    raise KernelStartError(f"kernel {self.kernel_id} exited during start-up")
                msg_id = self._kc.kernel_info()
                sent.append(msg_id)
                self._listeners[msg_id] = probe
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(probe.done.wait(), interval)
                if probe.ready is not None:
                    self._language_info = probe.ready["content"].get("language_info", {})
                    return
                interval = min(interval * 2, 1.0)
        finally:
            for msg_id in sent:
                self._listeners.pop(msg_id, None)
        raise KernelStartError(f"kernel {self.kernel_id} did not become ready in {timeout:.0f} s")

    @property
    def dead(self) -> bool:
        return self._dead

    async def restart(self, cwd: Path) -> None:
        # Called only by the kernel's supervisor, one at a time, never cancelled half-way.
        self._lose_all(Loss.RESTARTED)
        self.generation += 1
        self._unwatch_process()
        children = self._children()
        try:
            # Fresh channels: requests queued for the old process must never reach the new one.
            await self._close_channels()
            await self._km.restart_kernel(now=True, newports=False, cwd=str(cwd))
            _kill_all(children)
            self._dead = False
            self.exit_code = None
            self._kc = self._km.client()
            self._open_channels()
            self._watch_process()
            await self._wait_ready(self._settings.startup_timeout)
        except BaseException:
            self._dead = True  # the next call finds it dead and asks for another restart
            raise
        logger.info("kernel %s restarted (generation %d)", self.kernel_id, self.generation)

    async def shutdown(self) -> None:
        self._dead = True
        self._lose_all(Loss.SHUT_DOWN)
        self._unwatch_process()
        children = self._children()
        pgid = getattr(self._km.provisioner, "pgid", None)
        await self._close_channels()
        try:
            async with asyncio.timeout(self._settings.shutdown_timeout):
                await self._km.shutdown_kernel(now=True)
        except Exception:
            logger.exception("kernel %s: shutdown failed; killing its processes", self.kernel_id)
        if pgid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        _kill_all(children)
        with contextlib.suppress(OSError):
            os.unlink(self._km.connection_file)
        _remove_sockets(self._km)
        logger.info("kernel %s shut down", self.kernel_id)

    # -- requests -------------------------------------------------------------

    def execute(self, code: str, listener: ExecutionListener, *, silent: bool = False) -> str:
        if self._dead:
            # Died while idle: do not send (a restart could deliver the queued request to the
            # new kernel and run the code unasked); report the loss at once instead.
            unsent = f"unsent-{uuid.uuid4()}"
            self._listeners[unsent] = listener
            asyncio.get_running_loop().call_soon(self._lose, unsent, Loss.DIED_IDLE)
            return unsent
        msg_id: str = self._kc.execute(
            code, silent=silent, store_history=not silent, allow_stdin=False, stop_on_error=True
        )
        self._listeners[msg_id] = listener
        return msg_id

    def forget(self, msg_id: str) -> None:
        self._listeners.pop(msg_id, None)

    async def is_alive(self) -> bool:
        return not self._dead and bool(await self._km.is_alive())

    async def interrupt(self) -> None:
        await self._km.interrupt_kernel()

    def info(self) -> KernelInfo:
        return KernelInfo(
            kernel_id=self.kernel_id,
            pid=self._kernel_pid(),
            connection_file=self._km.connection_file,
            language_info=self._language_info,
            generation=self.generation,
            kernel_name=self._km.kernel_name,
        )

    def assign(self, session_id: str) -> None:
        # JupyterLab lists external kernels with ids of its own and the connection file's
        # kernel_name: that name is how a person finds the session's kernel there.
        current = Path(self._km.connection_file)
        target = self._settings.connection_dir / current.name
        info = json.loads(current.read_text())
        info["kernel_name"] = self._km.kernel_name = f"kernel-agent-{session_id}"
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".kernel-", suffix=".tmp")
        with os.fdopen(fd, "w") as handle:  # mkstemp: mode 0600, as the key needs
            json.dump(info, handle, indent=1)
        os.replace(tmp, target)
        if current != target:
            current.unlink(missing_ok=True)
            self._km.connection_file = str(target)

    def memory_rss(self) -> int | None:
        pid = self._kernel_pid()
        if pid is None:
            return None
        try:
            return int(psutil.Process(pid).memory_info().rss)
        except psutil.Error:
            return None

    # -- internals ------------------------------------------------------------

    async def _read(self, channel: Any, *, iopub: bool) -> None:
        session = channel.session
        # A bounded wait: each timeout re-arms the receive, which re-checks the socket for
        # real (zmq.EVENTS), so a wake-up lost on ZeroMQ's edge-triggered descriptor costs at
        # most this. pyzmq's own receive timeout, never a cancellation: a cancelled receive
        # can drop a message it already took off the socket. One receive per message, not
        # the poll and receive of `get_msg(timeout)`: less of this reader's CPU under load.
        if channel.socket is None:  # channels already stopped
            return
        channel.socket.rcvtimeo = int(_READ_RECHECK * 1000)
        while True:
            try:
                try:
                    raw = await channel.socket.recv_multipart()
                except zmq.Again:
                    continue
                _, parts = session.feed_identities(raw)
                msg = session.deserialize(parts)
            except asyncio.CancelledError:
                raise
            except Exception:
                if channel.socket is None:  # channels stopped
                    return
                logger.exception("kernel %s: unreadable message dropped", self.kernel_id)
                continue
            parent = msg.get("parent_header", {})
            parent_id = parent.get("msg_id")
            listener = self._listeners.get(parent_id) if parent_id else None
            if listener is None:
                # Output of an earlier request of ours (a background thread) is reported with
                # the next result. Output with no parent is the kernel's start-up noise, and
                # output of another client's request (an attached console) is not the session's.
                if (
                    iopub
                    and parent_id
                    and self.on_orphan
                    and parent.get("session") == self._kc.session.session
                    and msg["header"]["msg_type"] in _OUTPUT_TYPES
                ):
                    self.on_orphan(msg)
                continue
            try:
                if iopub:
                    listener.on_iopub(msg)
                else:
                    listener.on_reply(msg)
            except Exception:  # a listener bug must not stop the reader, or every call hangs
                logger.exception("kernel %s: message handler failed", self.kernel_id)

    def _lose(self, msg_id: str, reason: Loss) -> None:
        listener = self._listeners.pop(msg_id, None)
        if listener is not None:
            listener.on_kernel_lost(reason)

    def _lose_all(self, reason: Loss) -> None:
        listeners, self._listeners = self._listeners, {}
        for listener in listeners.values():
            listener.on_kernel_lost(reason)

    def _pid(self) -> int | None:
        pid = getattr(self._km.provisioner, "pid", None)
        return int(pid) if pid else None

    def _kernel_pid(self) -> int | None:
        """The ipykernel process; in a sandbox, a descendant of the bwrap we launched."""
        pid = self._pid()
        if pid is not None and self._settings.sandbox == "bwrap":
            return sandbox.kernel_pid(pid) or pid
        return pid

    def _children(self) -> list[psutil.Process]:
        pid = self._pid()
        if pid is None:
            return []
        try:
            return list(psutil.Process(pid).children(recursive=True))
        except psutil.Error:
            return []

    def _watch_process(self) -> None:
        pid = self._pid()
        if pid is None:
            return
        loop = asyncio.get_running_loop()
        try:
            self._watch_fd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self._watch_task = asyncio.create_task(self._poll_process())
            return
        loop.add_reader(self._watch_fd, self._on_exit)

    def _unwatch_process(self) -> None:
        if self._watch_fd is not None:
            asyncio.get_running_loop().remove_reader(self._watch_fd)
            os.close(self._watch_fd)
            self._watch_fd = None
        if self._watch_task is not None:
            self._watch_task.cancel()
            self._watch_task = None

    async def _poll_process(self) -> None:
        while await self._km.is_alive():  # noqa: ASYNC110 - polling a process, no event exists
            await asyncio.sleep(self._settings.liveness_interval)
        self._on_exit()

    def _on_exit(self) -> None:
        self._unwatch_process()
        self._dead = True
        process = getattr(self._km.provisioner, "process", None)
        code = process.poll() if process is not None else None
        if self._settings.sandbox == "bwrap":
            code = sandbox.exit_code(code)
        self.exit_code = code
        logger.warning("kernel %s died (exit code %s)", self.kernel_id, code)
        self._lose_all(Loss.DIED)


def _remove_sockets(km: AsyncKernelManager) -> None:
    """Remove a kernel's IPC socket folder (see LocalBackend.start_kernel)."""
    if km.transport == "ipc":
        shutil.rmtree(Path(km.ip).parent, ignore_errors=True)


def _kill_all(processes: list[psutil.Process]) -> None:
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.kill()


class LocalBackend(KernelBackend):
    """Starts ipykernels as child processes of this server, each in its own sandbox."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._lock_fd: int | None = None
        self._sandbox: sandbox.BwrapSandbox | None = None
        self._slots: dict[str, Path] = {}
        """Pooled kernels' own folders, until a session claims the kernel."""
        self._kernel_argv = [
            sys.executable,
            _LAUNCHER,
            str(settings.memory_limit_bytes),
            "-f",
            "{connection_file}",
            # Output caching off, so large results are not pinned by Out/_ .
            "--InteractiveShell.cache_size=0",
            # No history database: concurrent kernels would contend on its lock.
            "--HistoryManager.enabled=False",
        ]

    def kernel_spec(self, sockets: Path | None = None) -> KernelSpec:
        """The kernel spec of one kernel: the launcher, in a sandbox unless it is off."""
        if self._sandbox is None:
            return KernelSpec(
                argv=list(self._kernel_argv),
                display_name="Python 3 (kernel-agent)",
                language="python",
                interrupt_mode="signal",
            )
        assert sockets is not None
        return KernelSpec(
            argv=self._sandbox.command(self._kernel_argv, sockets),
            display_name="Python 3 (kernel-agent, sandboxed)",
            language="python",
            # The kernel runs in a session and PID namespace of its own, where the SIGINT
            # jupyter_client sends to bwrap's process group does not reach it: interrupt
            # over the control channel (the kernel manager opens its own control socket).
            interrupt_mode="message",
        )

    async def start(self) -> None:
        runtime = self._settings.runtime_dir
        runtime.mkdir(parents=True, exist_ok=True)
        runtime.chmod(stat.S_IRWXU)
        for folder in ("ipython", "kernels", "pool", "sockets"):
            (runtime / folder).mkdir(exist_ok=True)
        if self._settings.sandbox == "bwrap":
            box = sandbox.BwrapSandbox.locate(self._settings)
            box.prepare()
            await box.check()
            self._sandbox = box
            self._slot_root.mkdir(parents=True, exist_ok=True)
            logger.info(
                "kernels run sandboxed (bwrap, uid %d, network %s)",
                self._settings.sandbox_uid,
                self._settings.kernel_network,
            )
        else:
            logger.warning("%s", sandbox.UNSANDBOXED_WARNING)
        # Every live server holds a shared lock on the folder; whoever gets it exclusively
        # is alone, so the kernel files there are left over from a crashed run.
        self._lock_fd = os.open(runtime / ".lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("another server uses %s; stale files are left to it", runtime)
        else:
            self._remove_stale_files()
        fcntl.flock(self._lock_fd, fcntl.LOCK_SH)

    def _remove_stale_files(self) -> None:
        runtime = self._settings.runtime_dir
        stale = [p for p in runtime.iterdir() if p.name.startswith(("kernel-", "k-"))]
        for files in (self._settings.connection_dir, self._settings.pool_connection_dir):
            stale += list(files.iterdir())
        for path in stale:
            with contextlib.suppress(OSError):
                path.unlink()
        folders = list((runtime / "sockets").iterdir())
        if self._slot_root.is_dir():
            folders += list(self._slot_root.iterdir())
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
        if stale or folders:
            logger.info("removed %d stale kernel files and folders", len(stale) + len(folders))

    async def close(self) -> None:
        slots, self._slots = list(self._slots.values()), {}
        for slot in slots:  # pooled kernels never claimed
            shutil.rmtree(slot, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def _slot_root(self) -> Path:
        # In the workspace, so a slot can become a session folder by an atomic rename.
        return self._settings.workspace / ".slots"

    def kernel_env(self) -> dict[str, str]:
        """The scrubbed environment every kernel starts with."""
        env = {k: v for k, v in os.environ.items() if k in self._settings.kernel_env_allow}
        env["PYTHONPATH"] = str(self._settings.skills_dir)
        env["KERNEL_AGENT_SKILLS_DIR"] = str(self._settings.skills_dir)
        env["IPYTHONDIR"] = str(self._settings.runtime_dir / "ipython")
        env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
        env["PYTHONUNBUFFERED"] = "1"
        # Importing skill helpers must not write __pycache__ into the skills folder.
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"  # debugpy's start-up warning on stderr
        # The kernel's own output cap (see _kernel_launcher.py), a little under ours so the
        # marker and the tail it sends are kept whole here.
        env["KERNEL_AGENT_OUTPUT_CAP"] = str(max(self._settings.output_cap_bytes - 4096, 1024))
        env["KERNEL_AGENT_IMAGE_CAP"] = str(self._settings.image_cap_bytes)
        env["KERNEL_AGENT_SPOOL_LIMIT"] = str(self._settings.output_spool_bytes)
        if self._settings.sandbox == "bwrap":
            env = sandbox.kernel_env(env)
        return env

    def kernel_path(self, folder: Path) -> str:
        """Sandboxed kernels see their session folder at /home/session."""
        return sandbox.SESSION_FOLDER if self._settings.sandbox == "bwrap" else str(folder)

    def claim_folder(self, kernel: KernelConnection, folder: Path) -> Path:
        """Give a pooled kernel its session's folder; returns the path the kernel sees."""
        slot = self._slots.pop(kernel.kernel_id, None)
        if self._sandbox is None or slot is None:
            return folder
        # The sandbox bound the slot at start; renaming it onto the session folder (with the
        # folder's files moved in first) makes the kernel see that folder without a restart.
        sandbox.adopt_folder(slot, folder)
        return Path(sandbox.SESSION_FOLDER)

    async def start_kernel(self, cwd: Path, *, pooled: bool = False) -> LocalKernel:
        kernel_id = str(uuid.uuid4())
        runtime = self._settings.runtime_dir
        folder = self._settings.pool_connection_dir if pooled else self._settings.connection_dir
        sockets = runtime / "sockets" / kernel_id[:8]
        specs = _SpecManager()
        specs.spec = self.kernel_spec(sockets)
        km = AsyncKernelManager(
            kernel_name=_KERNEL_NAME,
            kernel_spec_manager=specs,
            connection_file=str(folder / f"kernel-{kernel_id}.json"),
        )
        ipc_prefix = sockets / "k"
        if self._settings.transport == "ipc" and len(str(ipc_prefix)) < _IPC_PATH_MAX:
            km.transport = "ipc"
            km.ip = str(ipc_prefix)
        elif self._sandbox is not None and self._settings.kernel_network == "none":
            raise KernelStartError(
                f"IPC socket paths under {runtime} would exceed {_IPC_PATH_MAX} characters, and "
                "a sandboxed kernel without network has no other transport: choose a shorter "
                "KERNEL_MCP_RUNTIME_DIR"
            )
        else:
            km.transport = "tcp"
            km.ip = "127.0.0.1"
        sockets.mkdir(mode=0o700)
        if pooled and self._sandbox is not None:
            cwd = self._slot_root / kernel_id
            cwd.mkdir(mode=0o700)
            self._slots[kernel_id] = cwd
        try:
            await km.start_kernel(kernel_id=kernel_id, cwd=str(cwd), env=self.kernel_env())
        except BaseException as exc:
            # Cancelled or failed half-way: never leave a process behind.
            with contextlib.suppress(Exception):
                await asyncio.shield(km.shutdown_kernel(now=True))
            self._forget(kernel_id, sockets)
            if isinstance(exc, Exception):
                raise KernelStartError(f"could not start a kernel: {exc}") from exc
            raise
        kernel = LocalKernel(km, self._settings)
        try:
            await kernel.open(self._settings.startup_timeout)
        except BaseException:
            await kernel.shutdown()
            self._forget(kernel_id, sockets)
            raise
        logger.info("kernel %s started (pid %s) in %s", kernel_id, kernel.info().pid, cwd)
        return kernel

    def _forget(self, kernel_id: str, sockets: Path) -> None:
        shutil.rmtree(sockets, ignore_errors=True)
        slot = self._slots.pop(kernel_id, None)
        if slot is not None:
            shutil.rmtree(slot, ignore_errors=True)
