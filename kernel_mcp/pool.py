"""A warm pool of pre-started kernels: each claimed once, refilled in the background."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from .backend import KernelBackend, KernelConnection

logger = logging.getLogger(__name__)


class KernelPool:
    """Keeps up to `size` idle kernels ready; `claim` hands one out for good."""

    def __init__(self, backend: KernelBackend, size: int, folder: Path) -> None:
        self._backend = backend
        self._size = size
        self._folder = folder
        self._ready: list[KernelConnection] = []
        self._wanted = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.paused = False

    def __len__(self) -> int:
        return len(self._ready)

    async def start(self) -> None:
        if self._size == 0:
            return
        self._folder.mkdir(parents=True, exist_ok=True)
        self._task = asyncio.create_task(self._refill(), name="kernel-pool-refill")
        self._wanted.set()

    async def claim(self) -> KernelConnection | None:
        """A live ready kernel, or None when the pool is empty."""
        while self._ready:
            kernel = self._ready.pop(0)
            self._wanted.set()
            if await kernel.is_alive():
                return kernel
            logger.warning("pool: kernel %s died while waiting; discarded", kernel.kernel_id)
            await kernel.shutdown()
        self._wanted.set()
        return None

    async def _refill(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            while len(self._ready) < self._size and not self.paused:
                try:
                    kernel = await self._backend.start_kernel(self._folder, pooled=True)
                except Exception:
                    logger.exception("pool: could not start a kernel; retrying in 5 s")
                    await asyncio.sleep(5)
                    continue
                self._ready.append(kernel)
                logger.debug("pool: %d/%d kernels ready", len(self._ready), self._size)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        kernels, self._ready = self._ready, []
        await asyncio.gather(*(k.shutdown() for k in kernels), return_exceptions=True)
