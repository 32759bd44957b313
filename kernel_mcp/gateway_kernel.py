"""Kernels on a Jupyter Kernel or Enterprise Gateway: the only module speaking its protocols.

Lifecycle goes over the Jupyter Server REST API (`/api/kernels`: start, interrupt,
restart, shutdown, and `GET` to tell a live kernel from a gone one); messages go over
one WebSocket per kernel (`/api/kernels/{id}/channels`), in the binary
`v1.kernel.websocket.jupyter.org` framing when the gateway offers it, else the legacy
JSON framing. One reader task routes every message by its parent msg_id, as the local
backend does; output of our own earlier requests is orphan output, other clients'
output is not the session's.

A kernel is found lost when its WebSocket closes and `GET` no longer finds it, when it
announces its shutdown (a `shutdown_reply` on IOPub: a DELETE, the gateway's culler), or
when the gateway reports it `restarting` (it restarted a dead kernel) or `dead`. Messages that
come from another kernel process than before (each process signs with a session id of
its own) mean another client restarted it: the session is told its state is gone.

Shared mode (`KERNEL_MCP_GATEWAY_SHARED`, Enterprise Gateway): a session's kernel id is
derived from the session id, so any kernel_mcp replica finds it with one `GET`; calls on
one session are serialized across replicas by a lock file in the shared workspace, which
also records the kernel process last seen, so a replica that finds the kernel replaced or
gone says so. See docs/decisions.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import struct
import time
import uuid
import weakref
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from .backend import ExecutionListener, KernelBackend, KernelConnection, KernelInfo, Loss, Message
from .config import Settings
from .errors import CapacityError, KernelError, KernelStartError
from .gateway_protocol import V1_PROTOCOL, ReadyProbe, Reply, pack_v1, unpack_legacy, unpack_v1
from .gateway_records import SessionRecord

logger = logging.getLogger(__name__)

_PROTOCOL_VERSION = "5.3"
_OUTPUT_TYPES = frozenset({"stream", "display_data", "execute_result", "error"})
# Status messages the gateway itself sends (not the kernel): restarted, or gave up.
_SERVER_STATES = frozenset({"restarting", "autorestarting", "dead"})
_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)
_MAX_MESSAGE = 256 * 1024 * 1024


class GatewayError(KernelError):
    """The gateway refused a request or could not be reached."""


def derived_kernel_id(namespace: uuid.UUID, session_id: str) -> str:
    """The kernel id of `session_id`: the same on every replica, shaped as a version-4 UUID.

    Enterprise Gateway accepts a client-chosen id (`KERNEL_ID`) only in version-4 form, so
    the name-based uuid5 has its version bits set to 4.
    """
    return str(uuid.UUID(bytes=uuid.uuid5(namespace, session_id).bytes, version=4))


# -- one kernel -------------------------------------------------------------------------


class GatewayKernel(KernelConnection):
    """A kernel on the gateway: REST for its lifecycle, one WebSocket for its messages."""

    def __init__(
        self,
        backend: GatewayBackend,
        kernel_id: str,
        *,
        session_id: str | None = None,
        record: SessionRecord | None = None,
    ) -> None:
        self._backend = backend
        self._settings = backend.settings
        self.kernel_id = kernel_id
        self.session_id = session_id
        self._record = record
        self.generation = 0
        self.on_orphan = None
        self.notice: str | None = None
        self.keep_running = False
        self._client_session = uuid.uuid4().hex
        self._listeners: dict[str, ExecutionListener] = {}
        self._ws: ClientConnection | None = None
        self._v1 = False
        self._reader: asyncio.Task[None] | None = None
        self._closed_task: asyncio.Task[None] | None = None
        self._dead = False
        self._closing = False
        self._replaced = False
        self._restart_told = False  # calls running at another client's restart were told
        self._resync = False  # another client restarted the kernel: catch_up before sending
        self._handshaking = False
        """The gateway (or another client) already put a new process behind this id."""
        self._process: str | None = None
        """Session id of the kernel process we talk to: every message it sends carries it."""
        self._language_info: dict[str, Any] = {}

    # -- lifecycle ------------------------------------------------------------

    async def open(self, timeout: float) -> None:
        """Connect the WebSocket, start the reader and wait for the kernel."""
        await self._connect()
        await self._wait_ready(timeout)

    async def _connect(self) -> None:
        url = f"{self._backend.ws_base}/api/kernels/{self.kernel_id}/channels"
        try:
            self._ws = await connect(
                f"{url}?session_id={self._client_session}",
                subprotocols=[V1_PROTOCOL],  # type: ignore[list-item]
                additional_headers=self._backend.headers,
                ssl=self._backend.ssl_context if url.startswith("wss:") else None,
                max_size=_MAX_MESSAGE,
                open_timeout=self._settings.gateway_request_timeout,
                compression=None,  # kernel messages are small and latency-bound
            )
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise GatewayError(f"kernel {self.kernel_id}: WebSocket failed: {exc}") from exc
        self._v1 = self._ws.subprotocol == V1_PROTOCOL
        self._quickack()
        self._reader = asyncio.create_task(self._read(self._ws), name=f"gw-{self.kernel_id[:8]}")

    async def _disconnect(self) -> None:
        watcher, self._closed_task = self._closed_task, None
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()  # a reconnect in progress: the caller replaces the connection
            await asyncio.gather(watcher, return_exceptions=True)
        ws, self._ws = self._ws, None
        reader, self._reader = self._reader, None
        if ws is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._settings.shutdown_timeout):
                    await ws.close()
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _wait_ready(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        probe = ReadyProbe()
        sent: list[str] = []
        interval = 0.1
        self._handshaking = True
        try:
            while loop.time() < deadline:
                if self._dead or probe.lost:
                    raise KernelStartError(f"kernel {self.kernel_id} was lost during start-up")
                msg_id = self._send("kernel_info_request", {}, "shell", probe)
                sent.append(msg_id)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(probe.done.wait(), interval)
                if probe.ready is not None:
                    self._language_info = probe.ready["content"].get("language_info", {})
                    process = probe.ready["header"].get("session")
                    if self._process is not None and process and process != self._process:
                        self._new_process(process)  # restarted while we were not looking
                    self._process = process
                    return
                interval = min(interval * 2, 1.0)
        finally:
            self._handshaking = False
            for msg_id in sent:
                self._listeners.pop(msg_id, None)
        raise KernelStartError(f"kernel {self.kernel_id} did not become ready in {timeout:.0f} s")

    @property
    def dead(self) -> bool:
        return self._dead

    def assign(self, session_id: str) -> None:
        self._backend.claimed(self, session_id)

    async def restart(self, cwd: Path) -> None:
        # Called only by the kernel's supervisor, one at a time, never cancelled half-way.
        self._lose_all(Loss.RESTARTED)
        replaced, self._replaced = self._replaced, False
        try:
            await self._disconnect()
            if not replaced:
                await self._backend.restart_or_recreate(self, cwd)
            self._dead = False
            self._process = None
            await self.open(self._settings.startup_timeout)
            await self._backend.move_to(self, cwd)
        except BaseException:
            self._dead = True  # the next call finds it dead and asks for another restart
            raise
        self.generation += 1
        self._remember()
        logger.info("kernel %s restarted (generation %d)", self.kernel_id, self.generation)

    async def shutdown(self) -> None:
        self._closing = True
        self._dead = True
        self._lose_all(Loss.SHUT_DOWN)
        await self._disconnect()
        if self.keep_running:
            # Shared gateway: other replicas may use this kernel; stop it only when idle there.
            await self._backend.shutdown_if_idle(self)
            return
        await self._backend.delete(self.kernel_id)
        if self._record is not None:
            # Shut down on purpose: the next kernel starts without a notice, under the next
            # generation (so the incarnation, kernel id and generation, never repeats).
            self._record.write({"kernel_id": self.kernel_id, "generation": self.generation})
        logger.info("kernel %s shut down", self.kernel_id)

    # -- requests -------------------------------------------------------------

    def execute(self, code: str, listener: ExecutionListener, *, silent: bool = False) -> str:
        if self._dead or self._ws is None:
            # Lost while idle: do not send (a restart could deliver it to the new kernel).
            unsent = f"unsent-{uuid.uuid4()}"
            self._listeners[unsent] = listener
            asyncio.get_running_loop().call_soon(self._lose, unsent, Loss.DIED_IDLE)
            return unsent
        content = {
            "code": code,
            "silent": silent,
            "store_history": not silent,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        }
        return self._send("execute_request", content, "shell", listener)

    def _send(self, msg_type: str, content: dict[str, Any], channel: str, listener: Any) -> str:
        msg_id = uuid.uuid4().hex
        header = {
            "msg_id": msg_id,
            "msg_type": msg_type,
            "username": self._settings.gateway_username,
            "session": self._client_session,
            "date": datetime.now(UTC).isoformat(),
            "version": _PROTOCOL_VERSION,
        }
        msg = {
            "header": header,
            "parent_header": {},
            "metadata": {},
            "content": content,
            "channel": channel,
            "buffers": [],
        }
        self._listeners[msg_id] = listener
        ws = self._ws
        assert ws is not None
        data: bytes | str = pack_v1(msg) if self._v1 else json.dumps(msg)
        # The send is queued on the connection; a failure shows as the connection closing.
        task = asyncio.ensure_future(ws.send(data))
        task.add_done_callback(_log_send_failure)
        return msg_id

    def forget(self, msg_id: str) -> None:
        self._listeners.pop(msg_id, None)

    async def is_alive(self) -> bool:
        if self._dead:
            return False
        return await self._backend.exists(self.kernel_id)

    async def interrupt(self) -> None:
        await self._backend.post_action(self.kernel_id, "interrupt")

    def info(self) -> KernelInfo:
        return KernelInfo(
            kernel_id=self.kernel_id,
            pid=None,
            connection_file=None,
            language_info=self._language_info,
            generation=self.generation,
        )

    def memory_rss(self) -> int | None:
        return None  # the kernel runs on the gateway's side

    # -- shared sessions --------------------------------------------------------

    def adopt(self, record: dict[str, Any] | None, *, started: bool) -> None:
        """Compare with what the session's record says, then record this kernel process."""
        if record is not None and "process" not in record:  # shut down on purpose before
            self.generation = int(record.get("generation", 0)) + 1
        elif record is not None:
            if started:
                self.notice = (
                    "This session's kernel was gone (the gateway restarted, or the kernel was "
                    "culled there) and a fresh one was started; variables defined earlier are "
                    "gone."
                )
                self.generation = int(record.get("generation", 0)) + 1
            elif record.get("process") not in (None, self._process):
                self.notice = (
                    "This session's kernel was replaced on the gateway since this session's "
                    "last call; variables defined earlier are gone."
                )
                self.generation = int(record.get("generation", 0)) + 1
            else:
                self.generation = int(record.get("generation", 0))
        self._remember()

    def changed_elsewhere(self) -> bool:
        if self._dead or self._ws is None:
            return False
        if self._resync:  # we saw another client's restart (its shutdown_reply)
            return True
        known = self._record.read() if self._record is not None else None
        return known is not None and known.get("process") not in (None, self._process)

    async def catch_up(self) -> None:
        """Another replica restarted the kernel (we saw its shutdown_reply, or the session's
        record names another kernel process than ours). Wait until the new process is heard
        on IOPub too.

        Our WebSocket's channels on the gateway reconnect to the new process by themselves,
        shell at once, but IOPub delivers only once its subscription is through (ZeroMQ's
        slow joiner): a request sent before then would lose its output and its idle status.
        A kernel_info handshake (its reply and its idle) proves both channels live, as
        Jupyter Server's own nudge does; its reply also tells the session (`_new_process`).
        The record then names the process we hear (a restart by a client that is no replica
        left it naming the old one), so the handshake is made once per restart.
        """
        logger.info("kernel %s: a new process since our last call; waiting for it", self.kernel_id)
        self._resync = False
        try:
            await self._wait_ready(self._settings.startup_timeout)
        except KernelStartError:
            if not self._dead:
                raise
            return  # died meanwhile: the next request is lost as on any dead kernel
        self._remember()

    def _remember(self) -> None:
        if self._record is not None:
            self._record.write(
                {
                    "kernel_id": self.kernel_id,
                    "process": self._process,
                    "generation": self.generation,
                    "updated": time.time(),
                }
            )

    # -- internals --------------------------------------------------------------

    def _quickack(self) -> None:
        # Linux clears TCP_QUICKACK on its own; re-armed after each message it keeps small
        # request/reply exchanges from waiting on a delayed ACK (~40 ms each).
        if self._ws is None or _TCP_QUICKACK is None or not self._settings.gateway_quickack:
            return
        sock = self._ws.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for data in ws:
                self._quickack()
                try:
                    msg = unpack_v1(data) if isinstance(data, bytes) and self._v1 else None
                    msg = msg or unpack_legacy(data)
                except (ValueError, KeyError, struct.error):
                    logger.exception("kernel %s: unreadable message dropped", self.kernel_id)
                    continue
                self._route(msg)
        except ConnectionClosed:
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("kernel %s: WebSocket reader failed", self.kernel_id)
        if self._ws is ws and not self._closing:
            self._closed_task = asyncio.get_running_loop().create_task(self._on_closed())

    async def _on_closed(self) -> None:
        """The WebSocket closed under us: a gone kernel is lost, a live one is reconnected."""
        self._ws = None
        alive = False
        with contextlib.suppress(Exception):
            alive = await self._backend.exists(self.kernel_id)
        if alive and not self._closing:
            try:
                await self._connect()
                await self._wait_ready(self._settings.startup_timeout)
                logger.warning("kernel %s: WebSocket reconnected", self.kernel_id)
                return
            except Exception:
                logger.warning("kernel %s: reconnect failed", self.kernel_id, exc_info=True)
        if not self._closing:
            self._mark_dead(f"kernel {self.kernel_id} is gone from the gateway")

    def _route(self, msg: Message) -> None:
        channel = msg.get("channel")
        header = msg.get("header") or {}
        msg_type = header.get("msg_type")
        content = msg.get("content") or {}
        if msg_type == "status" and content.get("execution_state") in _SERVER_STATES:
            # Sent by the gateway: it restarted the kernel after a death, or gave up on it.
            state = content["execution_state"]
            self._replaced = state != "dead"
            self._mark_dead(f"kernel {self.kernel_id}: the gateway reports it {state}")
            return
        if channel == "iopub" and msg_type == "shutdown_reply":
            if not content.get("restart"):
                # The kernel tells every client it is being shut down (a DELETE, the gateway's
                # culler); the WebSocket may stay open after it is gone.
                self._mark_dead(f"kernel {self.kernel_id} is being shut down by the gateway")
            elif not self._handshaking:
                # (While handshaking, it is a restart's message the server replays to our
                # reconnected WebSocket; the handshake itself sees a new process.)
                # Another client (a replica's restart_kernel) restarts it: what the old
                # process runs never replies, and those calls are told. This WebSocket's
                # IOPub may miss the new process's first messages: resync before sending.
                self._restart_told = bool(self._listeners)
                self._lose_all(Loss.RESTARTED)
                self._resync = True
            return
        parent = msg.get("parent_header") or {}
        parent_id = parent.get("msg_id")
        process = header.get("session")
        known = self._process
        if known is not None and process and process != known and channel in ("iopub", "shell"):
            self._new_process(process)
        listener = self._listeners.get(parent_id) if parent_id else None
        if listener is None:
            if (
                channel == "iopub"
                and parent_id
                and self.on_orphan
                and parent.get("session") == self._client_session
                and msg_type in _OUTPUT_TYPES
            ):
                self.on_orphan(msg)
            return
        try:
            if channel == "iopub":
                listener.on_iopub(msg)
            elif channel == "shell":
                listener.on_reply(msg)
        except Exception:  # a listener bug must not stop the reader, or every call hangs
            logger.exception("kernel %s: message handler failed", self.kernel_id)

    def _new_process(self, process: str) -> None:
        """Another client (a replica) restarted the kernel: requests sent since run there."""
        self._process = process
        told, self._restart_told = self._restart_told, False
        known = self._record.read() if self._record is not None else None
        if known is not None and known.get("process") == process:
            self.generation = int(known.get("generation", self.generation + 1))
        else:
            self.generation += 1
        logger.warning("kernel %s was restarted by another client", self.kernel_id)
        if self.on_notice is not None and not told:
            self.on_notice(
                "The kernel was restarted by another client of the gateway (another kernel_mcp "
                "replica, or its restart_kernel) before this call; variables defined earlier "
                "are gone."
            )

    def _mark_dead(self, why: str) -> None:
        if self._dead:
            return
        self._dead = True
        logger.warning("%s", why)
        self._lose_all(Loss.DIED)

    def _lose(self, msg_id: str, reason: Loss) -> None:
        listener = self._listeners.pop(msg_id, None)
        if listener is not None:
            listener.on_kernel_lost(reason)

    def _lose_all(self, reason: Loss) -> None:
        listeners, self._listeners = self._listeners, {}
        for listener in listeners.values():
            listener.on_kernel_lost(reason)


def _log_send_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.debug("a kernel message was not sent: %s", task.exception())


# -- the backend ------------------------------------------------------------------------


class GatewayBackend(KernelBackend):
    """Starts kernels on a Jupyter Kernel Gateway or Enterprise Gateway."""

    def __init__(self, settings: Settings) -> None:
        assert settings.gateway_url
        self.settings = settings
        self.shared = settings.gateway_shared
        base = settings.gateway_url.rstrip("/")
        self.http_base = base
        self.ws_base = (settings.gateway_ws_url or base.replace("http", "ws", 1)).rstrip("/")
        self.headers: dict[str, str] = {}
        if settings.gateway_token is not None:
            self.headers["Authorization"] = f"token {settings.gateway_token.get_secret_value()}"
        self.ssl_context = self._ssl_context()
        self._http: httpx.AsyncClient | None = None
        self._session_records: weakref.WeakValueDictionary[str, SessionRecord] = (
            weakref.WeakValueDictionary()
        )

    def _ssl_context(self) -> ssl.SSLContext:
        s = self.settings
        context = ssl.create_default_context(cafile=str(s.gateway_ca_certs or "") or None)
        if not s.gateway_validate_cert:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if s.gateway_client_cert:
            context.load_cert_chain(s.gateway_client_cert, s.gateway_client_key)
        return context

    async def start(self) -> None:
        self._http = httpx.AsyncClient(
            base_url=self.http_base,
            headers=self.headers,
            verify=self.ssl_context,
            timeout=self.settings.gateway_request_timeout,
        )
        if self.shared:
            self._records.mkdir(parents=True, exist_ok=True)
        logger.info(
            "kernels on the gateway at %s (kernelspec %s, %s)",
            self.http_base,
            self.settings.gateway_kernel_name,
            "shared: kernel ids derived from sessions" if self.shared else "gateway-chosen ids",
        )

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    @property
    def _records(self) -> Path:
        return self.settings.workspace / ".kernels"

    def _record(self, session_id: str) -> SessionRecord:
        record = self._session_records.get(session_id)
        if record is None:
            record = SessionRecord(self._records / f"{session_id}.lock")
            self._session_records[session_id] = record
        return record

    def session_guard(self, session_id: str) -> contextlib.AbstractAsyncContextManager[None]:
        if not self.shared:
            return contextlib.nullcontext()
        return self._record(session_id).locked()

    async def find_kernel(self, session_id: str, cwd: Path) -> GatewayKernel | None:
        """The session's kernel running on the gateway (any replica may have started it)."""
        kernel_id = await self._shared_kernel(session_id)
        if kernel_id is None:
            return None
        record = self._record(session_id)
        known = record.read()
        kernel = GatewayKernel(self, kernel_id, session_id=session_id, record=record)
        await self._open(kernel, cwd)
        kernel.adopt(known, started=False)
        logger.info("session %s: kernel %s found", session_id, kernel_id)
        return kernel

    async def shut_session_kernel(self, session_id: str) -> bool:
        kernel_id = await self._shared_kernel(session_id)
        if kernel_id is None:
            return False
        record = self._record(session_id)
        known = record.read() or {}
        await self.delete(kernel_id)
        # Shut down on purpose: the next kernel starts without a notice, in a new generation.
        record.write({"kernel_id": kernel_id, "generation": int(known.get("generation", 0))})
        logger.info("session %s: kernel %s shut down through REST", session_id, kernel_id)
        return True

    async def interrupt_session(self, session_id: str) -> bool:
        kernel_id = await self._shared_kernel(session_id)
        if kernel_id is None:
            return False
        await self.post_action(kernel_id, "interrupt")
        return True

    async def restart_session(self, session_id: str) -> bool:
        kernel_id = await self._shared_kernel(session_id)
        if kernel_id is None:
            return False
        record = self._record(session_id)
        known = record.read() or {}
        await self.post_action(kernel_id, "restart")
        # Restarted on purpose: the replica that opens it next starts the next generation
        # without a notice (a record without "process"); one holding it sees the new process.
        record.write({"kernel_id": kernel_id, "generation": int(known.get("generation", 0))})
        logger.info("session %s: kernel %s restarted through REST", session_id, kernel_id)
        return True

    async def _shared_kernel(self, session_id: str) -> str | None:
        """The id of the session's kernel on the gateway, if shared and running there: the
        one its record names (a pooled kernel it claimed), else the id derived from it."""
        if not self.shared:
            return None
        recorded = (self._record(session_id).read() or {}).get("kernel_id")
        derived = derived_kernel_id(self.settings.gateway_namespace, session_id)
        for kernel_id in dict.fromkeys(k for k in (recorded, derived) if isinstance(k, str)):
            if await self.exists(kernel_id):
                return kernel_id
        return None

    # -- starting -------------------------------------------------------------

    async def start_kernel(self, cwd: Path, *, pooled: bool = False) -> GatewayKernel:
        kernel_id = await self._post_kernel(cwd, None)
        return await self._open(GatewayKernel(self, kernel_id), cwd)

    async def open_kernel(self, session_id: str, cwd: Path) -> GatewayKernel:
        """The session's kernel on the gateway, or a new one under its derived id."""
        if not self.shared:
            return await self.start_kernel(cwd)
        found = await self.find_kernel(session_id, cwd)
        if found is not None:
            return found
        kernel_id = derived_kernel_id(self.settings.gateway_namespace, session_id)
        record = self._record(session_id)
        known = record.read()
        kernel = GatewayKernel(self, kernel_id, session_id=session_id, record=record)
        await self._post_kernel(cwd, kernel_id)
        await self._open(kernel, cwd)
        kernel.adopt(known, started=True)
        logger.info("session %s: kernel %s started", session_id, kernel_id)
        return kernel

    def claimed(self, kernel: GatewayKernel, session_id: str) -> None:
        """A session claimed pooled `kernel`: on a shared gateway, its record names it now."""
        if not self.shared or kernel.session_id is not None:
            return
        kernel.session_id = session_id
        kernel._record = record = self._record(session_id)
        kernel.adopt(record.read(), started=True)

    async def _open(self, kernel: GatewayKernel, cwd: Path) -> GatewayKernel:
        try:
            await kernel.open(self.settings.startup_timeout)
            await self.move_to(kernel, cwd)
        except BaseException:
            if kernel.session_id is None:  # ours alone: never leave it running
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.delete(kernel.kernel_id))
            await kernel._disconnect()
            raise
        return kernel

    def kernel_env(self, cwd: Path, kernel_id: str | None) -> dict[str, str]:
        """What the start request asks for: gateways pass `KERNEL_*` variables to the kernel."""
        s = self.settings
        env = {
            "KERNEL_USERNAME": s.gateway_username,
            "KERNEL_WORKING_DIR": self.kernel_path(cwd),
            "KERNEL_LAUNCH_TIMEOUT": str(int(s.startup_timeout)),
            # Read by our launcher (gateway_kernelspec): the output cap, as locally.
            "KERNEL_AGENT_OUTPUT_CAP": str(max(s.output_cap_bytes - 4096, 1024)),
            "KERNEL_AGENT_IMAGE_CAP": str(s.image_cap_bytes),
            "KERNEL_AGENT_SPOOL_LIMIT": str(s.output_spool_bytes),
            "KERNEL_AGENT_MEMORY_LIMIT": str(s.memory_limit_bytes),
        }
        if kernel_id is not None:
            env["KERNEL_ID"] = kernel_id
        return env

    def kernel_path(self, folder: Path) -> str:
        """`folder` as the kernels see it."""
        root = self.settings.gateway_kernel_workspace
        if root is None:
            return str(folder)
        return str(Path(root) / folder.relative_to(self.settings.workspace))

    async def _post_kernel(self, cwd: Path, kernel_id: str | None) -> str:
        body = {"name": self.settings.gateway_kernel_name, "env": self.kernel_env(cwd, kernel_id)}
        try:
            response = await self._client.post(
                "/api/kernels", json=body, timeout=self.settings.startup_timeout + 10
            )
        except httpx.HTTPError as exc:
            raise KernelStartError(f"could not reach the gateway to start a kernel: {exc}") from exc
        if response.status_code == 403:
            raise CapacityError(f"the gateway refused another kernel: {_reason(response)}")
        if response.status_code >= 400:
            raise KernelStartError(
                f"the gateway could not start a kernel ({response.status_code}): "
                f"{_reason(response)}"
            )
        started: str = response.json()["id"]
        if kernel_id is not None and started != kernel_id:
            await self.delete(started)
            raise KernelStartError(
                "this gateway does not accept client-chosen kernel ids (KERNEL_ID), so replicas "
                "cannot find each other's kernels: use Jupyter Enterprise Gateway, or set "
                "KERNEL_MCP_GATEWAY_SHARED=false and run one kernel_mcp"
            )
        return started

    def claim_folder(self, kernel: KernelConnection, folder: Path) -> Path:
        return Path(self.kernel_path(folder))

    async def move_to(self, kernel: GatewayKernel, folder: Path) -> None:
        """Change the kernel's working folder (gateways start kernels in their own)."""
        path = self.kernel_path(folder)
        code = f"import os as __ka_os; __ka_os.chdir({path!r}); del __ka_os"
        reply = Reply()
        msg_id = kernel.execute(code, reply, silent=True)
        try:
            async with asyncio.timeout(self.settings.internal_timeout):
                await reply.done.wait()
        except TimeoutError:
            raise KernelStartError(f"kernel {kernel.kernel_id} did not answer a chdir") from None
        finally:
            kernel.forget(msg_id)
        if reply.status != "ok":
            raise KernelStartError(f"kernel {kernel.kernel_id} could not move to {path}")

    # -- REST -------------------------------------------------------------------

    @property
    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            raise GatewayError("the gateway backend is not started")
        return self._http

    async def exists(self, kernel_id: str) -> bool:
        """Whether the gateway has the kernel (404: gone)."""
        try:
            response = await self._client.get(f"/api/kernels/{kernel_id}")
        except httpx.HTTPError as exc:
            raise GatewayError(f"the gateway is unreachable: {exc}") from exc
        if response.status_code == 404:
            return False
        if response.status_code >= 400:
            raise GatewayError(f"GET kernel {kernel_id}: {response.status_code}")
        return True

    async def model(self, kernel_id: str) -> dict[str, Any] | None:
        response = await self._client.get(f"/api/kernels/{kernel_id}")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    async def post_action(self, kernel_id: str, action: str) -> None:
        """POST /api/kernels/{id}/{action} (interrupt, restart)."""
        timeout = self.settings.startup_timeout + 10 if action == "restart" else None
        try:
            response = await self._client.post(
                f"/api/kernels/{kernel_id}/{action}",
                json={},
                timeout=timeout or self.settings.gateway_request_timeout,
            )
        except httpx.HTTPError as exc:
            raise GatewayError(f"{action} of kernel {kernel_id} failed: {exc}") from exc
        if response.status_code >= 400:
            raise GatewayError(
                f"{action} of kernel {kernel_id} failed ({response.status_code}): "
                f"{_reason(response)}"
            )

    async def restart_or_recreate(self, kernel: GatewayKernel, cwd: Path) -> None:
        """Restart the kernel through REST; one the gateway lost is started anew."""
        if await self.exists(kernel.kernel_id):
            try:
                await self.post_action(kernel.kernel_id, "restart")
                return
            except GatewayError:
                if await self.exists(kernel.kernel_id):
                    raise
        # Gone (the gateway restarted, or culled it): same id when shared, else a new one.
        kernel.kernel_id = await self._post_kernel(
            cwd, kernel.kernel_id if kernel.session_id is not None else None
        )

    async def delete(self, kernel_id: str) -> None:
        try:
            async with asyncio.timeout(self.settings.shutdown_timeout + 10):
                response = await self._client.delete(f"/api/kernels/{kernel_id}")
        except (httpx.HTTPError, TimeoutError) as exc:
            logger.warning("kernel %s: shutdown request failed: %s", kernel_id, exc)
            return
        if response.status_code not in (204, 404):
            logger.warning("kernel %s: shutdown answered %s", kernel_id, response.status_code)

    async def shutdown_if_idle(self, kernel: GatewayKernel) -> None:
        """Stop a shared kernel only if no client used it for the idle timeout."""
        try:
            model = await self.model(kernel.kernel_id)
        except (httpx.HTTPError, ValueError) as exc:
            logger.warning("kernel %s: left running (%s)", kernel.kernel_id, exc)
            return
        if model is None:
            return
        last = _parse_time(model.get("last_activity"))
        idle = time.time() - last if last is not None else 0.0
        # Culled here after our own idle timeout; the gateway saw the same last message.
        if idle + self.settings.cull_interval >= self.settings.idle_timeout:
            await self.delete(kernel.kernel_id)
            logger.info("kernel %s shut down after %.0f s idle", kernel.kernel_id, idle)
        else:
            logger.info("kernel %s left running on the gateway", kernel.kernel_id)


def _reason(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:300]
    return str(data.get("message") or data.get("reason") or data)[:300]


def _parse_time(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


__all__ = ["V1_PROTOCOL", "GatewayBackend", "GatewayError", "GatewayKernel", "derived_kernel_id"]
