"""Run one piece of code on a kernel, as nbclient does, with a timeout ladder.

The shell reply, the IOPub idle status and the kernel's liveness are awaited
together. Past the deadline the kernel is interrupted (state kept); if it does
not answer within a grace period it is restarted (state lost). A kernel that
dies is restarted and the result says so. Code is never re-run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from .backend import KernelConnection, Loss, Message
from .outputs import Output, OutputCollector

logger = logging.getLogger(__name__)

Status = Literal["ok", "error", "timeout_interrupted", "restarted_state_lost", "kernel_died"]


@dataclass
class ExecutionResult:
    """What an execution produced, in nbformat v4 terms."""

    status: Status
    execution_count: int | None
    outputs: list[Output]
    elapsed: float
    truncated: bool = False
    truncated_bytes: int = 0
    kernel_restarted: bool = False
    state_lost: bool = False
    message: str | None = None
    """One sentence on anything beyond the code's own outputs (timeout, restart, lost state)."""
    background_outputs: list[Output] = field(default_factory=list)
    """Output printed between calls by code still running in the background (threads)."""

    def to_dict(self) -> dict[str, Any]:
        # Shallow on purpose: outputs are never mutated after the result is made, and a deep
        # copy (dataclasses.asdict) costs ~9 ms for 1,000 display outputs.
        return {f.name: getattr(self, f.name) for f in fields(self)}


class _Execution:
    """Listener collecting one request's messages."""

    def __init__(self, cap: int, on_output: Callable[[Message], None] | None) -> None:
        self.collector = OutputCollector(cap)
        self.reply: Message | None = None
        self.idle = False
        self.lost: Loss | None = None
        self.done = asyncio.Event()
        self.replied = asyncio.Event()
        self.last_message = time.monotonic()
        self._on_output = on_output

    def on_iopub(self, msg: Message) -> None:
        self.last_message = time.monotonic()
        msg_type = msg["header"]["msg_type"]
        if msg_type == "status":
            if msg["content"]["execution_state"] == "idle":
                self.idle = True
                if self.reply is not None:
                    self.done.set()
            return
        self.collector.add_message(msg)
        if self._on_output is not None and msg_type != "execute_input":
            try:
                self._on_output(msg)
            except Exception:
                logger.exception("live output callback failed")

    def on_reply(self, msg: Message) -> None:
        self.reply = msg
        self.replied.set()
        if self.idle:
            self.done.set()

    def on_kernel_lost(self, reason: Loss) -> None:
        self.lost = reason
        self.replied.set()
        self.done.set()


def _death_sentence(exit_code: int | None) -> str:
    if exit_code is not None and exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        cause = {
            "SIGKILL": " (killed: possibly out of memory)",
            "SIGSEGV": " (segmentation fault)",
        }.get(name, "")
        return f"was killed by {name}{cause}"
    if exit_code is not None:
        return f"exited with code {exit_code}"
    return "died"


async def _wait_done(execution: _Execution, timeout: float, quiet_limit: float) -> bool:
    """Wait for reply+idle; True when finished (or lost) before `timeout`."""
    deadline = time.monotonic() + timeout
    if not execution.replied.is_set():
        try:
            async with asyncio.timeout(timeout):
                await execution.replied.wait()
        except TimeoutError:
            return False
    # The reply is in, but output may still be on its way (20,000 displays take seconds to
    # read on a loaded machine): wait for IOPub idle as long as messages keep coming.
    while not execution.done.is_set():
        now = time.monotonic()
        quiet = now - execution.last_message
        if now >= deadline or quiet >= quiet_limit:
            logger.warning("IOPub idle not seen %.1f s after the last output; it may be cut", quiet)
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(deadline - now, quiet_limit - quiet)):
                await execution.done.wait()
    return True


async def run_code(
    kernel: KernelConnection,
    code: str,
    *,
    timeout: float,
    grace: float,
    output_cap: int,
    cwd: Path,
    on_output: Callable[[Message], None] | None = None,
    on_cancel: Callable[[asyncio.Task[None]], None] | None = None,
    iopub_quiet: float = 2.0,
) -> ExecutionResult:
    """Execute `code`, apply the timeout ladder, and return what happened.

    If the caller is cancelled, the code is interrupted (or the kernel restarted) by
    a task handed to `on_cancel`, which the next request on this kernel must await.
    """
    started = time.perf_counter()
    execution = _Execution(output_cap, on_output)
    msg_id = kernel.execute(code, execution)
    restarted = False
    cancelled = False
    status: Status
    message: str | None = None
    try:
        finished = await _wait_done(execution, timeout, iopub_quiet)
        if not finished:
            logger.info(
                "kernel %s: %.3g s timeout reached; interrupting", kernel.kernel_id, timeout
            )
            await kernel.interrupt()
            finished = await _wait_done(execution, grace, iopub_quiet)
            if finished and execution.lost is None:
                status = "timeout_interrupted"
                message = (
                    f"Execution exceeded the {timeout:g} s timeout and was interrupted; "
                    "the kernel and the variables defined before are intact."
                )
            elif execution.lost is None:
                logger.warning("kernel %s ignored the interrupt; restarting", kernel.kernel_id)
                await kernel.restart(cwd)
                restarted = True
                status = "restarted_state_lost"
                message = (
                    f"Execution exceeded the {timeout:g} s timeout and did not stop when "
                    "interrupted, so the kernel was restarted; variables defined earlier are "
                    "gone. Re-run the cells needed to rebuild state, with less work per call."
                )
        if message is None and execution.lost is not None:
            status, message, restarted = await _after_loss(kernel, execution.lost, cwd)
        elif message is None:
            reply_status = execution.reply["content"]["status"] if execution.reply else "ok"
            status = "ok" if reply_status == "ok" else "error"
            if reply_status == "aborted":
                message = "Execution was aborted by the kernel because a previous request failed."
    except asyncio.CancelledError:
        # Cancellation may be re-delivered at every await (anyio scopes): settle in a task.
        cancelled = True
        settle = asyncio.create_task(
            _settle_after_cancel(kernel, execution, grace, cwd, msg_id, iopub_quiet)
        )
        if on_cancel is not None:
            on_cancel(settle)
        raise
    finally:
        if not cancelled:
            kernel.forget(msg_id)
    collector = execution.collector
    count = collector.execution_count
    if execution.reply is not None:
        count = execution.reply["content"].get("execution_count", count)
    return ExecutionResult(
        status=status,
        execution_count=count,
        outputs=collector.outputs(),
        elapsed=time.perf_counter() - started,
        truncated=collector.truncated,
        truncated_bytes=collector.dropped_bytes,
        kernel_restarted=restarted,
        state_lost=restarted,
        message=message,
    )


async def _after_loss(
    kernel: KernelConnection, reason: Loss, cwd: Path
) -> tuple[Status, str, bool]:
    if not reason.died:
        return (
            "restarted_state_lost",
            f"The kernel was {reason} while this code ran; variables defined earlier are gone.",
            True,
        )
    how = _death_sentence(kernel.exit_code)
    await kernel.restart(cwd)
    if reason is Loss.DIED_IDLE:
        what = (
            f"The kernel {how} after the previous call, so this code was not run. A fresh "
            "kernel was started; variables defined earlier are gone. Re-create what the code "
            "needs, then run it again."
        )
    else:
        what = (
            f"The kernel {how} while running this code and was restarted; variables defined "
            "earlier are gone. Do not re-run the same code unchanged."
        )
    return "kernel_died", what, True


async def _settle_after_cancel(
    kernel: KernelConnection,
    execution: _Execution,
    grace: float,
    cwd: Path,
    msg_id: str,
    iopub_quiet: float,
) -> None:
    """A cancelled caller: stop the code, so the next request finds an idle kernel."""
    try:
        if execution.done.is_set():
            return
        logger.info("kernel %s: caller cancelled; interrupting", kernel.kernel_id)
        await kernel.interrupt()
        finished = await _wait_done(execution, grace, iopub_quiet)
        if (not finished and execution.lost is None) or (execution.lost and execution.lost.died):
            await kernel.restart(cwd)
    except Exception:
        logger.exception("kernel %s: could not settle after a cancelled call", kernel.kernel_id)
    finally:
        kernel.forget(msg_id)
