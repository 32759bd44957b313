"""A session's record in the shared workspace: the lock of its calls, and its kernel.

Replicas of kernel_mcp on one gateway share the workspace (the session folders); each
session also has ``<workspace>/.kernels/<session>.lock``. An exclusive `flock` on it is
held around each call on the session, so calls of one session are serialized across
replicas (and two replicas never both start its kernel); it holds the kernel id, the
kernel process's session id and the generation, so a replica can tell a kernel that was
replaced or lost behind its back.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_LOCK_POLL = (0.005, 0.1)  # first and longest wait between tries of a busy session lock


class SessionRecord:
    """A session's lock file in the shared workspace, and the kernel it last knew.

    The file is locked (flock) around each call on the session, so calls of one session are
    serialized across replicas; it holds the kernel id, the kernel process's session id and
    the generation, so a replica can tell a kernel that was replaced or lost behind its back.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        """The locked descriptor while a call holds the lock: reads and writes go through it
        (over NFS, closing any other descriptor of the file would drop the lock)."""

    def read(self) -> dict[str, Any] | None:
        try:
            if self._fd is not None:
                text = os.pread(self._fd, 1 << 16, 0).decode()
            else:
                text = self.path.read_text()
            data = json.loads(text or "null")
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def write(self, data: dict[str, Any] | None) -> None:
        # Rewritten in place: the file is also the lock, and a rename would swap it.
        text = json.dumps(data).encode() if data else b""
        try:
            if self._fd is not None:
                os.ftruncate(self._fd, 0)
                os.pwrite(self._fd, text, 0)
                return
            with self.path.open("r+b") as handle:
                handle.truncate(0)
                handle.write(text)
        except OSError:
            logger.warning("could not write the session record %s", self.path, exc_info=True)

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
        """Hold the session's lock (one holder per record object: the session's own lock)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:  # the records folder was removed under us
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            wait = _LOCK_POLL[0]
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(wait)  # another replica runs a call of this session
                    wait = min(wait * 2, _LOCK_POLL[1])
            self._fd = fd
            yield
        finally:
            self._fd = None
            os.close(fd)  # releases the lock
