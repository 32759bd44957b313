"""Start an ipykernel for kernel_mcp: bounded memory, bounded output, shutdown kept to us.

Run by path (not as a package module) so the kernel imports nothing of kernel_mcp:
``python _kernel_launcher.py <limit-bytes> -f <connection file> [ipykernel args]``.

Output is capped here, at the source, in the one place every IOPub message passes
(`Session.send` on the IOPub socket): per request, the first half of the cap goes out
live, the last half is held back and sent just before the request's `idle` status,
and what falls between is counted and written to a file in the working folder. So
neither ZeroMQ's queues nor kernel_mcp ever hold more than the cap, and a cell's
output always arrives before its own `idle`. Settings come from the environment:
``KERNEL_AGENT_OUTPUT_CAP`` (text bytes per request), ``KERNEL_AGENT_IMAGE_CAP``
(image bytes per request), ``KERNEL_AGENT_SPOOL_LIMIT`` (bytes kept in the file).
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
    """One request's output: head sent live, tail held back, the middle counted and spooled."""

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
        self.tail: deque[dict[str, Any]] = deque()
        self.tail_bytes = 0
        self.dropped_bytes = 0
        self.dropped_outputs = 0
        self.head_text: list[str] = []  # stream text sent live, for the spool file

    def take(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        """The messages to send now in place of `msg`."""
        msg_type = msg["header"]["msg_type"]
        content = msg["content"]
        text, image = _size(msg_type, content)
        if image:
            if image > self.image_left:
                self.dropped_outputs += 1
                return []
            self.image_left -= image
        if self.finished:
            # Output of a thread after its cell ended: no tail can follow, so only a head.
            if text > self.head_left:
                return []
            self.head_left -= text
            return [msg]
        if text <= self.head_left and not self.tail:
            self.head_left -= text
            if msg_type == "stream":
                self.head_text.append(content["text"])
            return [msg]
        sent: list[dict[str, Any]] = []
        if msg_type == "stream" and self.head_left > 0 and not self.tail:
            # Split a stream at the head's end: its start goes now, the rest is held back.
            cut = _encoded(content["text"])[: self.head_left].decode("utf-8", "ignore")
            sent.append({**msg, "content": {**content, "text": cut}})
            self.head_text.append(cut)
            msg = {**msg, "content": {**content, "text": content["text"][len(cut) :]}}
            text -= len(_encoded(cut))
        self.head_left = 0
        self._hold(msg, text)
        return sent

    def _hold(self, msg: dict[str, Any], size: int) -> None:
        if msg["header"]["msg_type"] == "stream":
            self._spool(msg["content"]["text"])
        self.tail.append(msg)
        self.tail_bytes += size
        tail_cap = self.cap - self.cap // 2
        while self.tail_bytes > tail_cap:
            first = self.tail[0]
            excess = self.tail_bytes - tail_cap
            if first["header"]["msg_type"] == "stream":
                data = _encoded(first["content"]["text"])
                if len(data) > excess:  # keep the end of the stream
                    keep = data[excess:].decode("utf-8", "ignore")
                    removed = len(data) - len(_encoded(keep))
                    first["content"] = {**first["content"], "text": keep}
                    self.tail_bytes -= removed
                    self.dropped_bytes += removed
                    return
                removed = len(data)
            else:
                removed = _size(first["header"]["msg_type"], first["content"])[0]
                self.dropped_outputs += 1
            self.tail.popleft()
            self.tail_bytes -= removed
            self.dropped_bytes += removed

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
                self.spool.write(
                    f"\n[... output past {self.spool_limit:,} characters not kept ...]\n"
                )
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
        held, self.tail, self.tail_bytes = list(self.tail), deque(), 0
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
    """Bounds every request's IOPub output; installed on the kernel's Session."""

    def __init__(self, session: Any, iopub: tuple[Any, ...]) -> None:
        self._session = session
        self._iopub = iopub
        self._send = session.send
        self._cap = int(os.environ.get("KERNEL_AGENT_OUTPUT_CAP", 512 * 1024))
        self._image_cap = int(os.environ.get("KERNEL_AGENT_IMAGE_CAP", 4 * 1024 * 1024))
        self._spool_limit = int(os.environ.get("KERNEL_AGENT_SPOOL_LIMIT", 64 * 1024 * 1024))
        self._budgets: dict[str, _Budget] = {}
        self._lock = threading.Lock()
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
                self._count += 1
                name = time.strftime("output-%Y%m%d-%H%M%S-") + str(self._count)
                budget = _Budget(self._cap, self._image_cap, self._spool_limit, name)
                self._budgets[msg_id] = budget
                while len(self._budgets) > 64:  # ended requests: a few stay for their threads
                    self._budgets.pop(next(iter(self._budgets)))
            if msg_type == "status":
                if msg["content"].get("execution_state") == "idle" and not budget.finished:
                    return [*budget.finish(self._session, parent), msg]
                return [msg]
            if msg_type == "clear_output":
                budget.reset()
                return [msg]
            if msg_type not in _OUTPUT_TYPES:
                return [msg]
            return budget.take(msg)


def main() -> None:
    limit = int(sys.argv.pop(1))
    if limit > 0:
        _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    # The launcher's own folder must not shadow user modules.
    sys.path[:] = [p for p in sys.path if not p.endswith("kernel_mcp")]
    import zmq
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

    class KernelApp(IPKernelApp):
        kernel_class = Kernel

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
