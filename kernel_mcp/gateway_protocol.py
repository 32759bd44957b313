"""Jupyter kernel messages over a gateway's WebSocket: framings and small listeners.

The `v1.kernel.websocket.jupyter.org` framing (offsets, channel, then the header, parent
header, metadata and content as separate JSON parts, then buffers) lets the gateway relay
frames without re-serializing them; the legacy framing is one JSON text (or, with buffers,
a binary frame of offsets, JSON and buffers). Nothing here does I/O.
"""

from __future__ import annotations

import asyncio
import json
import struct

from .backend import Loss, Message

V1_PROTOCOL = "v1.kernel.websocket.jupyter.org"


def pack_v1(msg: Message) -> bytes:
    parts = [
        json.dumps(msg[key], default=str).encode()
        for key in ("header", "parent_header", "metadata", "content")
    ]
    channel = msg["channel"].encode()
    offsets = [8 * (1 + 1 + len(parts) + 1)]
    offsets.append(offsets[-1] + len(channel))
    for part in parts:
        offsets.append(offsets[-1] + len(part))
    head = len(offsets).to_bytes(8, "little") + b"".join(o.to_bytes(8, "little") for o in offsets)
    return b"".join([head, channel, *parts])


def unpack_v1(data: bytes) -> Message:
    count = int.from_bytes(data[:8], "little")
    offsets = [int.from_bytes(data[8 * (i + 1) : 8 * (i + 2)], "little") for i in range(count)]
    offsets.append(len(data))
    channel = data[offsets[0] : offsets[1]].decode()
    parts = [data[offsets[i] : offsets[i + 1]] for i in range(1, len(offsets) - 1)]
    header, parent, metadata, content = (json.loads(p) for p in parts[:4])
    return {
        "channel": channel,
        "header": header,
        "msg_id": header.get("msg_id"),
        "msg_type": header.get("msg_type"),
        "parent_header": parent,
        "metadata": metadata,
        "content": content,
        "buffers": parts[4:],
    }


def unpack_legacy(data: str | bytes) -> Message:
    if isinstance(data, str):
        msg: Message = json.loads(data)
        return msg
    # Legacy binary frame (a message with buffers): offsets, then JSON, then the buffers.
    count = struct.unpack("!i", data[:4])[0]
    offsets = list(struct.unpack("!" + "I" * count, data[4 : 4 * (count + 1)]))
    offsets.append(len(data))
    bufs = [data[offsets[i] : offsets[i + 1]] for i in range(count)]
    msg = json.loads(bufs[0])
    msg["buffers"] = bufs[1:]
    return msg


class Reply:
    """Listener of one internal request: its reply status, or the loss."""

    def __init__(self) -> None:
        self.status: str | None = None
        self.done = asyncio.Event()

    def on_iopub(self, msg: Message) -> None:
        return None

    def on_reply(self, msg: Message) -> None:
        self.status = msg["content"].get("status")
        self.done.set()

    def on_kernel_lost(self, reason: Loss) -> None:
        self.status = str(reason)
        self.done.set()


class ReadyProbe:
    """kernel_info handshake: a reply on shell plus idle on IOPub for the same request."""

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
