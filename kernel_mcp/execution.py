"""Run one piece of code on a kernel, as nbclient does, with a timeout ladder.

The shell reply, the IOPub idle status and the kernel's liveness are awaited
together. Past the deadline the kernel is interrupted (state kept), once it is
known to have begun the code, and a second time if the first is not answered in
a grace period; only then is it restarted (state lost). A kernel that dies is
restarted and the result says so. Code is never re-run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from .backend import Loss, Message
from .outputs import Output, OutputCollector
from .supervisor import KernelSupervisor

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
    output_file: str | None = None
    """Where the kernel kept the full text of cut output, relative to the session folder."""

    def to_dict(self) -> dict[str, Any]:
        # Shallow on purpose: outputs are never mutated after the result is made, and a deep
        # copy (dataclasses.asdict) costs ~9 ms for 1,000 display outputs.
        return {f.name: getattr(self, f.name) for f in fields(self)}


class _Execution:
    """Listener collecting one request's messages."""

    def __init__(
        self, cap: int, image_cap: int | None, on_output: Callable[[Message], None] | None
    ) -> None:
        self.collector = OutputCollector(cap, image_cap=image_cap)
        self.reply: Message | None = None
        self.idle = False
        self.lost: Loss | None = None
        self.started = asyncio.Event()
        self.restarting = False
        """This call asked for a restart (its timeout ladder, or its kernel died)."""
        self.done = asyncio.Event()
        self.replied = asyncio.Event()
        self.last_message = time.monotonic()
        self._on_output = on_output

    def on_iopub(self, msg: Message) -> None:
        self.last_message = time.monotonic()
        msg_type = msg["header"]["msg_type"]
        if msg_type == "status":
            state = msg["content"]["execution_state"]
            if state == "busy":
                self.started.set()
            elif state == "idle":
                self.idle = True
                if self.reply is not None:
                    self.done.set()
            return
        self.started.set()
        self.collector.add_message(msg)
        if self._on_output is not None and msg_type != "execute_input":
            try:
                self._on_output(msg)
            except Exception:
                logger.exception("live output callback failed")

    def on_reply(self, msg: Message) -> None:
        # The kernel holds back the end of a long output until the cell ends: after a quiet
        # cell, the wait for the rest counts from the reply.
        self.last_message = time.monotonic()
        self.reply = msg
        self.started.set()
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
    # The reply is in; the kernel sends the cell's last output before its idle status, and
    # caps it at the source, so idle follows soon: wait while messages keep coming.
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


async def _wait_started(execution: _Execution, timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await execution.started.wait()


async def run_code(
    kernel: KernelSupervisor,
    code: str,
    *,
    timeout: float,
    grace: float,
    output_cap: int,
    image_cap: int | None = None,
    on_output: Callable[[Message], None] | None = None,
    on_lost: Callable[[str], None] | None = None,
    silent: bool = False,
    iopub_quiet: float = 10.0,
) -> ExecutionResult:
    """Execute `code`, apply the timeout ladder, and return what happened.

    `silent` runs our own requests: no execution count, no history, no execute_input.
    If the caller is cancelled, the code is stopped by a task the kernel's supervisor
    waits for before it sends anything else; if that costs the kernel's state, `on_lost`
    gets the sentence to tell the session's next call.
    """
    started = time.perf_counter()
    execution = _Execution(output_cap, image_cap, on_output)
    msg_id = await kernel.send(code, execution, silent=silent)
    restarted = False
    settling = False
    status: Status
    message: str | None = None
    try:
        finished = await _wait_done(execution, timeout, iopub_quiet)
        if not finished:
            status, message, restarted = await _escalate(
                kernel, execution, timeout, grace, iopub_quiet
            )
        if message is None and execution.lost is not None:
            status, message, restarted = await _after_loss(kernel, execution)
        elif message is None:
            reply_status = execution.reply["content"]["status"] if execution.reply else "ok"
            status = "ok" if reply_status == "ok" else "error"
            if reply_status == "aborted":
                message = "Execution was aborted by the kernel because a previous request failed."
    except asyncio.CancelledError:
        # Cancellation may be re-delivered at every await (anyio scopes): settle in a task.
        settling = True
        kernel.settle(_settle_after_cancel(kernel, execution, grace, msg_id, iopub_quiet, on_lost))
        raise
    finally:
        if not settling:
            kernel.done(msg_id)
    collector = execution.collector
    count = collector.execution_count
    if execution.reply is not None:
        count = execution.reply["content"].get("execution_count", count)
    return ExecutionResult(
        status=status,
        execution_count=None if silent else count,
        outputs=collector.outputs(),
        elapsed=time.perf_counter() - started,
        truncated=collector.truncated,
        truncated_bytes=collector.total_dropped_bytes,
        kernel_restarted=restarted,
        state_lost=restarted,
        message=message,
        output_file=collector.output_file,
    )


async def _escalate(
    kernel: KernelSupervisor,
    execution: _Execution,
    timeout: float,
    grace: float,
    iopub_quiet: float,
) -> tuple[Status, str | None, bool]:
    """Past the deadline: interrupt (twice, once the code is known to run), then restart."""
    logger.info("kernel %s: %.3g s timeout reached; interrupting", kernel.kernel_id, timeout)
    if not execution.started.is_set():
        # On a loaded machine the kernel may not have begun the code yet, and an interrupt
        # that lands before it starts is lost: give it a grace to start.
        await _wait_started(execution, grace)
    for _attempt in range(2):
        if execution.done.is_set():
            break
        await kernel.interrupt()
        if await _wait_done(execution, grace, iopub_quiet):
            break
    if execution.lost is not None:
        return "ok", None, False  # reported by the caller, as any loss
    if execution.done.is_set():
        return (
            "timeout_interrupted",
            f"Execution exceeded the {timeout:g} s timeout and was interrupted; "
            "the kernel and the variables defined before are intact.",
            False,
        )
    logger.warning("kernel %s ignored two interrupts; restarting", kernel.kernel_id)
    execution.restarting = True
    await kernel.restart()
    return (
        "restarted_state_lost",
        f"Execution exceeded the {timeout:g} s timeout and did not stop when interrupted, "
        "so the kernel was restarted; variables defined earlier are gone. Re-run the cells "
        "needed to rebuild state, with less work per call.",
        True,
    )


async def _after_loss(kernel: KernelSupervisor, execution: _Execution) -> tuple[Status, str, bool]:
    reason = execution.lost
    assert reason is not None
    if not reason.died:
        return (
            "restarted_state_lost",
            f"The kernel was {reason} while this code ran; variables defined earlier are gone.",
            True,
        )
    how = _death_sentence(kernel.connection.exit_code)
    execution.restarting = True
    await kernel.restart()
    if reason is Loss.DIED_IDLE or not execution.started.is_set():
        # Dead before it began this code (also when the death was seen only after sending).
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
    kernel: KernelSupervisor,
    execution: _Execution,
    grace: float,
    msg_id: str,
    iopub_quiet: float,
    on_lost: Callable[[str], None] | None,
) -> None:
    """A cancelled caller: stop the code, so the next request finds an idle kernel."""
    try:
        if execution.restarting:
            # Cancelled while its own restart ran: that restart finishes (the supervisor
            # owns it); nobody was told of it yet.
            if on_lost is not None:
                on_lost("The kernel was restarted after a call whose caller had gone timed out "
                        "or died; variables defined earlier are gone.")  # fmt: skip
            return
        if execution.done.is_set():
            return
        logger.info("kernel %s: caller cancelled; interrupting", kernel.kernel_id)
        for _attempt in range(2):
            await kernel.interrupt()
            if await _wait_done(execution, grace, iopub_quiet):
                break
        if execution.lost is not None and execution.lost.died:
            how = _death_sentence(kernel.connection.exit_code)
            what = f"The kernel {how} while running a call whose caller had gone"
        elif not execution.done.is_set():
            what = "A call whose caller had gone did not stop when interrupted, so the kernel"
        else:
            return
        await kernel.restart()
        if on_lost is not None:
            on_lost(f"{what} and was restarted; variables defined earlier are gone.")
    finally:
        kernel.done(msg_id)
