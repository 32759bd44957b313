"""The typed contract of kernel_mcp's tool results, shared by server and clients.

kernel_mcp declares these models as its tools' output schemas and fills their
`structuredContent` with them; agent_service (or any client) validates a result
into the same model. The module depends on pydantic alone, so a client imports
the contract without importing kernel_mcp, jupyter_client or fastmcp.

Compatibility: fields are only ever added (with defaults), and unknown fields are
ignored when validating, so an older client keeps reading a newer server.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

__all__ = [
    "DisplayDataOutput",
    "ErrorInfo",
    "ErrorOutput",
    "ExecuteResult",
    "ExecuteResultOutput",
    "ExecutionStatus",
    "KernelInfoResult",
    "NewSessionResult",
    "Output",
    "StreamOutput",
    "incarnation_of",
    "typed_outputs",
]

ExecutionStatus = Literal[
    "ok", "error", "timeout_interrupted", "restarted_state_lost", "kernel_died"
]
"""What became of the code: `ok`; `error` (the code raised: a result, not a tool error);
`timeout_interrupted` (stopped at its deadline, state kept); `restarted_state_lost` (the
kernel had to be restarted: variables are gone); `kernel_died` (the process died, restarted)."""

_OPEN = ConfigDict(extra="allow")


class StreamOutput(BaseModel):
    """nbformat v4 `stream` output."""

    model_config = _OPEN
    output_type: Literal["stream"]
    name: str = Field(description="stdout or stderr")
    text: str


class DisplayDataOutput(BaseModel):
    """nbformat v4 `display_data` output: a MIME bundle."""

    model_config = _OPEN
    output_type: Literal["display_data"]
    data: dict[str, Any]
    metadata: dict[str, Any] = Field(default_factory=dict)


class ExecuteResultOutput(BaseModel):
    """nbformat v4 `execute_result` output: the value of the cell's last expression."""

    model_config = _OPEN
    output_type: Literal["execute_result"]
    data: dict[str, Any]
    metadata: dict[str, Any] = Field(default_factory=dict)
    execution_count: int | None = None


class ErrorOutput(BaseModel):
    """nbformat v4 `error` output: an exception raised by the cell."""

    model_config = _OPEN
    output_type: Literal["error"]
    ename: str
    evalue: str
    traceback: list[str] = Field(default_factory=list)


Output = Annotated[
    StreamOutput | DisplayDataOutput | ExecuteResultOutput | ErrorOutput,
    Field(discriminator="output_type"),
]
"""One nbformat v4 output, as a notebook stores it."""

_OUTPUTS: TypeAdapter[list[Output]] = TypeAdapter(list[Output])


def typed_outputs(outputs: list[dict[str, Any]]) -> list[Output]:
    """`ExecuteResult.outputs` as typed models (the result keeps them as plain dicts)."""
    return _OUTPUTS.validate_python(outputs)


class ErrorInfo(BaseModel):
    """The exception the user's code raised (its traceback is in `outputs`)."""

    ename: str
    evalue: str


class ExecuteResult(BaseModel):
    """`execute_code`'s structured result."""

    model_config = ConfigDict(extra="ignore")

    status: ExecutionStatus
    execution_count: int | None = Field(description="The cell's In[n]; null if it did not run.")
    outputs: list[dict[str, Any]] = Field(
        description="The cell's outputs as nbformat v4 output dicts (images full size as far "
        "as the result's byte budget allows); `typed_outputs` gives them as models."
    )
    elapsed: float = Field(description="Seconds from request to result.")
    error: ErrorInfo | None = Field(
        default=None, description="Set when status is `error`: the exception the code raised."
    )
    truncated: bool = Field(default=False, description="Output was dropped to fit the caps.")
    truncated_bytes: int = Field(default=0, description="How many output bytes were dropped.")
    output_file: str | None = Field(
        default=None,
        description="Where the full text of cut output is kept, relative to the session folder.",
    )
    kernel_restarted: bool = Field(default=False, description="The kernel process was replaced.")
    state_lost: bool = Field(
        default=False,
        description="Variables defined before this call are gone (restart, death, culling).",
    )
    message: str | None = Field(
        default=None,
        description="One sentence on anything beyond the code's own outputs (timeout, "
        "restart, lost state), written for the model.",
    )
    background_outputs: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Output printed between calls by code still running (threads).",
    )
    images_downscaled: int = Field(
        default=0,
        description="Images in `outputs` replaced by a smaller copy to fit the result; each "
        "carries `metadata.kernel_agent.original_file`, its full-size file in the session "
        "folder.",
    )
    session: str | None = Field(
        default=None,
        description="The session handle to pass back as `session` to keep this kernel "
        "(null when the session comes from X-Session-Id or the MCP session).",
    )
    session_created: bool = Field(
        default=False, description="This call started a new session (no handle was given)."
    )
    kernel_id: str | None = Field(default=None, description="The kernel that holds the state.")
    kernel_generation: int | None = Field(
        default=None, description="Restart counter of that kernel (0 for a fresh one)."
    )
    incarnation: str | None = Field(
        default=None,
        description="Opaque id of the kernel process holding the session's state now. It "
        "changes whenever that process is replaced (restart, death, culling, eviction, a "
        "restart of kernel_mcp) and never repeats: compare it across calls to detect lost "
        "state.",
    )


class KernelInfoResult(BaseModel):
    """`kernel_info`'s structured result."""

    model_config = ConfigDict(extra="ignore")

    session_id: str = Field(description="The session's key inside kernel_mcp.")
    session: str | None = Field(default=None, description="The session handle, if any.")
    running: bool = Field(
        default=True, description="False when the session has no kernel yet (start=false)."
    )
    kernel_id: str | None = None
    kernel_name: str | None = Field(
        default=None, description="The name JupyterLab lists the kernel under."
    )
    kernel_generation: int = 0
    incarnation: str | None = None
    pid: int | None = None
    language_info: dict[str, Any] = Field(default_factory=dict)
    connection_file: str | None = None
    console_command: str | None = None
    folder: str


class NewSessionResult(BaseModel):
    """`new_session`'s structured result."""

    session: str = Field(description="Pass this as `session` to every later call.")


def incarnation_of(kernel_id: str, generation: int) -> str:
    """The incarnation id of `kernel_id` after `generation` restarts."""
    return f"{kernel_id}.{generation}"
