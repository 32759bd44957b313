"""Start an ipykernel for kernel_mcp: bounded memory, bounded output, shutdown kept to us.

Run by path (not as a package module) so the kernel imports nothing of kernel_mcp:
``python _kernel_launcher.py <limit-bytes> -f <connection file> [ipykernel args]``.

Output is capped here, at the source: stream text as it is written (in the writer's
thread, so no buffer grows), every other output where IOPub messages are sent
(`Session.send` on the IOPub socket). Per request, the first half of the cap goes out
live, the last half is held back and sent just before the request's `idle` status,
and what falls between is counted and its text written to a file in the working folder. So
neither ZeroMQ's queues nor kernel_mcp ever hold more than the cap, and a cell's
output always arrives before its own `idle`. Settings come from the environment:
``KERNEL_AGENT_OUTPUT_CAP`` (text bytes per request), ``KERNEL_AGENT_IMAGE_CAP``
(image bytes per request), ``KERNEL_AGENT_SPOOL_LIMIT`` (bytes kept in the file).
On a gateway (our kernelspec, `kernel_mcp.gateway_kernelspec`) the start request sets
them, and ``KERNEL_AGENT_MEMORY_LIMIT`` overrides the limit argument.
``KERNEL_AGENT_ALLOW_SHUTDOWN=1`` (the gateway kernelspec) lets shutdown requests through:
the gateway stops its kernels by request, and its REST API is the door anyway.
"""

import json
import os
import resource
import sys
import threading
import time
from collections import deque
from typing import Any

TRUNCATION_MIME = "application/vnd.kernel-agent.truncation+json"
_OUTPUT_TYPES = frozenset({"stream", "display_data", "execute_result", "error"})
_SPOOL_FOLDER = ".outputs"


def _size(msg_type: str, content: dict[str, Any]) -> tuple[int, int]:
    """(text bytes, image bytes) of one output message's content."""
    if msg_type == "stream":
        return len(content.get("text", "").encode("utf-8", "surrogatepass")), 0
    if msg_type == "error":
        return sum(len(line) for line in content.get("traceback", [])) + 64, 0
    text = image = 0
    for mime, value in content.get("data", {}).items():
        if isinstance(value, str):
            size = len(value)
        elif isinstance(value, bytes | bytearray | memoryview):
            size = (len(value) + 2) // 3 * 4  # sent as base64
        else:
            size = len(json.dumps(value, default=str))
        if mime.startswith("image/"):
            image += size
        else:
            text += size
    return text, image


def _encoded(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


class _Budget:
    """One request's output: head sent live, tail held back, the middle counted and spooled.

    The tail is a queue of pieces, each `[kind, payload, size]`: a stream's text as written
    (`"stream"`, `(name, text)`) or a whole message (`"msg"`, msg). Pieces are trimmed from
    the front, so each write costs what it writes, however many there are.
    """

    def __init__(self, cap: int, image_cap: int, spool_limit: int, name: str) -> None:
        self.cap = cap
        self.image_left = image_cap
        self.spool_limit = spool_limit
        self.name = name
        self.spool: Any = None
        self.spool_path: str | None = None
        self.spooled = 0
        self.finished = False
        self.reset()

    def reset(self) -> None:
        """Start over (clear_output): what was shown is gone, so is what was counted."""
        self.head_left = self.cap // 2
        self.tail: deque[list[Any]] = deque()
        self.tail_bytes = 0
        self.dropped_bytes = 0
        self.dropped_outputs = 0
        self.head_text: list[str] = []  # stream text sent live, for the spool file

    def write(self, name: str, text: str) -> str:
        """Stream text written in the kernel: the part to send now (the rest is held)."""
        size = len(text) if text.isascii() else len(_encoded(text))
        if self.finished:
            # Written by a thread after its cell ended: no tail can follow, so only a head.
            if size > self.head_left:
                return ""
            self.head_left -= size
            return text
        if not self.tail and size <= self.head_left:
            self.head_left -= size
            self.head_text.append(text)
            return text
        now = ""
        if not self.tail and self.head_left > 0:
            # Split at the head's end: the start goes now, the rest is held back.
            now = _encoded(text)[: self.head_left].decode("utf-8", "ignore")
            self.head_text.append(now)
            text = text[len(now) :]
            size -= len(_encoded(now))
        self.head_left = 0
        self._spool(text)
        self._hold(["stream", (name, text), size])
        return now

    def take(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        """A rich output or error about to be sent: the messages to send now."""
        text, image = _size(msg["header"]["msg_type"], msg["content"])
        if image:
            if image > self.image_left:
                self.dropped_outputs += 1
                return []
            self.image_left -= image
        if self.finished:
            if text > self.head_left:
                return []
            self.head_left -= text
            return [msg]
        if not self.tail and text <= self.head_left:
            self.head_left -= text
            return [msg]
        self.head_left = 0
        self._hold(["msg", msg, text])
        return []

    def _hold(self, piece: list[Any]) -> None:
        self.tail.append(piece)
        self.tail_bytes += piece[2]
        tail_cap = self.cap - self.cap // 2
        while self.tail_bytes > tail_cap:
            first = self.tail[0]
            excess = self.tail_bytes - tail_cap
            if first[0] == "stream" and first[2] > excess:
                # Keep the end of the stream text.
                name, text = first[1]
                keep = _encoded(text)[excess:].decode("utf-8", "ignore")
                removed = first[2] - len(_encoded(keep))
                first[1], first[2] = (name, keep), first[2] - removed
                self.tail_bytes -= removed
                self.dropped_bytes += removed
                return
            self.tail.popleft()
            self.tail_bytes -= first[2]
            self.dropped_bytes += first[2]
            if first[0] == "msg":
                self.dropped_outputs += 1

    def _spool(self, text: str) -> None:
        if self.spool is None:
            if self.spool_limit <= 0:
                return
            try:
                os.makedirs(_SPOOL_FOLDER, exist_ok=True)
                path = os.path.join(_SPOOL_FOLDER, f"{self.name}.txt")
                self.spool = open(path, "w", encoding="utf-8", errors="surrogatepass")  # noqa: SIM115
            except OSError:
                self.spool_limit = 0
                return
            self.spool_path = path  # relative to the working (session) folder
            for part in self.head_text:
                self._write(part)
        self.head_text = []
        self._write(text)

    def _write(self, text: str) -> None:
        room = self.spool_limit - self.spooled
        if room <= 0:
            return
        try:
            self.spool.write(text[:room])
            self.spooled += min(len(text), room)
            if self.spooled >= self.spool_limit:
                limit = f"{self.spool_limit:,}"
                self.spool.write(f"\n[... output past {limit} characters not kept ...]\n")
        except OSError:
            self.spool_limit = 0

    def finish(self, session: Any, parent: dict[str, Any]) -> list[dict[str, Any]]:
        """The held-back messages, after a marker saying what was left out."""
        self.finished = True
        self.head_left = self.cap // 2
        self.head_text = []
        if self.spool is not None:
            self.spool.close()
            self.spool = None
        held: list[dict[str, Any]] = []
        text: list[str] = []
        for index, (kind, payload, _) in enumerate(self.tail):
            if kind == "msg":
                held.append(payload)
                continue
            name, piece = payload
            text.append(piece)
            following = self.tail[index + 1] if index + 1 < len(self.tail) else None
            if following is None or following[0] != "stream" or following[1][0] != name:
                content = {"name": name, "text": "".join(text)}
                held.append(session.msg("stream", content, parent=parent))
                text = []
        self.tail, self.tail_bytes = deque(), 0
        if not (self.dropped_bytes or self.dropped_outputs):
            return held
        marker = {
            "bytes": self.dropped_bytes,
            "outputs": self.dropped_outputs,
            "path": self.spool_path,
        }
        note = session.msg(
            "display_data",
            {"data": {TRUNCATION_MIME: marker}, "metadata": {}, "transient": {}},
            parent=parent,
        )
        return [note, *held]


class OutputCap:
    """Bounds every request's IOPub output; installed on the kernel's Session and streams."""

    installed: "OutputCap | None" = None

    def __init__(self, session: Any, iopub: tuple[Any, ...]) -> None:
        self._session = session
        self._iopub = iopub
        self._send = session.send
        self._cap = int(os.environ.get("KERNEL_AGENT_OUTPUT_CAP", 512 * 1024))
        self._image_cap = int(os.environ.get("KERNEL_AGENT_IMAGE_CAP", 4 * 1024 * 1024))
        self._spool_limit = int(os.environ.get("KERNEL_AGENT_SPOOL_LIMIT", 64 * 1024 * 1024))
        self._budgets: dict[str, _Budget] = {}
        self._lock = threading.Lock()
        OutputCap.installed = self
        self._count = 0
        session.send = self.send

    def send(self, stream: Any, msg_or_type: Any, content: Any = None, parent: Any = None,
             ident: Any = None, buffers: Any = None, track: bool = False, header: Any = None,
             metadata: Any = None) -> Any:  # fmt: skip
        if self._cap <= 0 or not any(stream is s for s in self._iopub):
            return self._send(stream, msg_or_type, content, parent, ident, buffers, track,
                              header, metadata)  # fmt: skip
        if isinstance(msg_or_type, str):
            msg = self._session.msg(msg_or_type, content, parent, header, metadata)
        else:
            msg = msg_or_type
        for out in self._filter(msg):
            self._send(stream, out, ident=ident, buffers=buffers, track=track)
        return msg

    def _budget(self, msg_id: str) -> _Budget:
        budget = self._budgets.get(msg_id)
        if budget is None:
            self._count += 1
            name = time.strftime("output-%Y%m%d-%H%M%S-") + str(self._count)
            budget = _Budget(self._cap, self._image_cap, self._spool_limit, name)
            self._budgets[msg_id] = budget
            while len(self._budgets) > 64:  # ended requests: a few stay for their threads
                self._budgets.pop(next(iter(self._budgets)))
        return budget

    def _filter(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        msg_type = msg["header"]["msg_type"]
        parent = msg.get("parent_header") or {}
        if parent.get("msg_type") != "execute_request":
            return [msg]
        msg_id = parent.get("msg_id", "")
        with self._lock:
            budget = self._budgets.get(msg_id)
            if budget is None:
                if msg_type not in _OUTPUT_TYPES:
                    return [msg]
                budget = self._budget(msg_id)
            if msg_type == "status":
                if msg["content"].get("execution_state") == "idle" and not budget.finished:
                    return [*budget.finish(self._session, parent), msg]
                return [msg]
            if msg_type == "clear_output":
                budget.reset()
                return [msg]
            if msg_type not in _OUTPUT_TYPES or msg_type == "stream":
                return [msg]  # stream text was capped as it was written
            return budget.take(msg)

    def write(self, name: str, parent: dict[str, Any], text: str) -> str:
        """Stream text written under `parent`: the part to send now."""
        header = parent.get("header", parent)
        if self._cap <= 0 or header.get("msg_type") != "execute_request":
            return text
        with self._lock:
            return self._budget(header.get("msg_id", "")).write(name, text)


def main() -> None:
    limit = int(sys.argv.pop(1))
    limit = int(os.environ.get("KERNEL_AGENT_MEMORY_LIMIT", limit))
    if limit > 0:
        _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        # Hard limit too: user code must not be able to lift it (setrlimit to infinity).
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # The launcher's own folder must not shadow user modules.
    sys.path[:] = [p for p in sys.path if not p.endswith("kernel_mcp")]
    import zmq
    from ipykernel.iostream import OutStream
    from ipykernel.ipkernel import IPythonKernel
    from ipykernel.kernelapp import IPKernelApp

    class Kernel(IPythonKernel):
        async def shutdown_request(self, stream: Any, ident: Any, parent: Any) -> None:
            # kernel_mcp stops its kernels by signal; a shutdown request comes from an attached
            # console or JupyterLab, and must not destroy the session's state.
            content = {
                "status": "error",
                "ename": "ShutdownRefused",
                "evalue": "this kernel belongs to a kernel-agent session; "
                "shut it down through kernel-agent (shutdown_kernel, or delete the session)",
                "traceback": [],
                "restart": parent["content"].get("restart", False),
            }
            self.log.warning("refused a shutdown request from an attached client")
            if self.session is not None:
                self.session.send(stream, "shutdown_reply", content, parent, ident=ident)

    original_write = OutStream.write

    def capped_write(self: OutStream, string: str) -> int | None:
        # Capped as it is written, in the writer's thread: the stream's buffer never holds
        # more than the cap, and its flush before the reply is quick.
        cap = OutputCap.installed
        if cap is None or not isinstance(string, str) or self.name not in ("stdout", "stderr"):
            return original_write(self, string)
        now = cap.write(self.name, self.parent_header, string)
        if now:
            original_write(self, now)
        return len(string)

    OutStream.write = capped_write  # type: ignore[method-assign]

    class KernelApp(IPKernelApp):
        kernel_class = IPythonKernel if os.environ.get("KERNEL_AGENT_ALLOW_SHUTDOWN") else Kernel

        def init_iopub(self, context: zmq.Context) -> None:  # type: ignore[type-arg]
            # Unbounded IOPub send queue: past ZeroMQ's default 1,000 queued messages a PUB
            # socket drops output silently whenever the client reads slower than the code
            # prints. The output cap bounds what can be queued.
            context.setsockopt(zmq.SNDHWM, 0)
            super().init_iopub(context)  # type: ignore[no-untyped-call]

        def init_kernel(self) -> None:
            super().init_kernel()  # type: ignore[no-untyped-call]
            OutputCap(self.session, (self.iopub_socket, self.iopub_thread))

    KernelApp.launch_instance()


if __name__ == "__main__":
    main()
