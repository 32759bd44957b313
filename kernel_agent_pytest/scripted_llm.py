"""A scripted OpenAI-compatible LLM server for tests (the `agent` fixture's `.llm`).

`ScriptedLLM` serves real HTTP on 127.0.0.1 (uvicorn in a background thread, free port), so
litellm's real client and streaming parser run against it. Each `POST /v1/chat/completions`
consumes the next scripted step; every request body is kept in `llm.requests`.

    async with ScriptedLLM() as llm:
        llm.script(ToolCall("execute_code", {"code": "1+1"}), Text("It is 2."))
        ...  # point the code under test at llm.base_url ("http://127.0.0.1:PORT/v1")
        assert llm.requests[1]["messages"][-1]["role"] == "tool"

Steps:
    Text(content)             content streamed in several deltas, finish_reason "stop"
    ToolCall(name, arguments) one tool call; arguments (JSON text or a dict) split into fragments
    ToolCalls([...], text="") parallel tool calls (index 0, 1, ...), finish_reason "tool_calls"
    Error(status, message)    HTTP error with OpenAI error JSON, before any streaming
    MidStreamError(after_text, mode)
                              streams `after_text`, then "disconnect" (connection closed without
                              the end of the chunked body: the client sees a broken transfer) or
                              "malformed" (a `data:` line that is not JSON, then the body ends
                              without `data: [DONE]`)
    Stall(seconds, then)      waits before answering (no response headers meanwhile), then `then`
    Hold(gate, then)          waits until `gate` (a `Gate`) is opened, then answers `then`

A plain `str` passed to `script()` means `Text(str)`. When the script runs out, the server
answers 500 "fake LLM script exhausted", so a test that makes an unplanned call fails visibly.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import json
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

__all__ = [
    "Error",
    "Gate",
    "Hold",
    "MidStreamError",
    "ScriptedLLM",
    "Stall",
    "Step",
    "Text",
    "ToolCall",
    "ToolCalls",
]

_START_TIMEOUT = 30.0  # a deadline on a loaded machine, not a speed claim
_STOP_TIMEOUT = 5.0


@dataclass(frozen=True)
class Text:
    """A plain answer, streamed as deltas of at most `chunk_chars` characters."""

    content: str
    chunk_chars: int = 4
    delay: float = 0.0  # seconds between chunks
    finish_reason: str = "stop"


@dataclass(frozen=True)
class ToolCall:
    """One function call; `arguments` is JSON text (sent verbatim, may be invalid) or a dict."""

    name: str
    arguments: str | Mapping[str, Any] = "{}"
    call_id: str | None = None  # default: "call_fake_<n>", unique per server

    @property
    def arguments_json(self) -> str:
        if isinstance(self.arguments, str):
            return self.arguments
        return json.dumps(self.arguments)


@dataclass(frozen=True)
class ToolCalls:
    """Parallel tool calls (OpenAI streams them one after another, index 0, 1, ...)."""

    calls: Sequence[ToolCall]
    text: str = ""  # content streamed before the calls, as some models do
    fragments: int = 3  # pieces each call's arguments are split into
    delay: float = 0.0


@dataclass(frozen=True)
class Error:
    """An HTTP error answered before any streaming, with an OpenAI-shaped error body."""

    status: int = 500
    message: str = "fake LLM error"
    type: str | None = None  # default by status: "requests" for 429, "server_error" for 5xx
    code: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)  # e.g. {"retry-after": "0"}


@dataclass(frozen=True)
class MidStreamError:
    """Streams `after_text`, then breaks the stream (see the module docstring)."""

    after_text: str = "partial"
    mode: Literal["disconnect", "malformed"] = "disconnect"


@dataclass(frozen=True)
class Stall:
    """Sends nothing for `seconds` (cut short when the server stops), then answers `then`."""

    seconds: float
    then: Step = Text("")


class Gate:
    """Opened by a test (any thread) to release the `Hold` steps waiting on it."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def open(self) -> None:
        self._event.set()

    @property
    def is_open(self) -> bool:
        return self._event.is_set()


@dataclass(frozen=True)
class Hold:
    """Sends nothing until `gate` is opened (or the server stops), then answers `then`."""

    gate: Gate
    then: Step = Text("")


Step = Text | ToolCall | ToolCalls | Error | MidStreamError | Stall | Hold

# uvicorn logs an error when a response ends unfinished; a deliberate break marks its request
# task so the filter below drops that one record and nothing else.
_deliberate_break: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "fake_llm_deliberate_break", default=False
)


def _drop_deliberate_break(record: logging.LogRecord) -> bool:
    return not _deliberate_break.get()


class _Stopping(Exception):
    """The server is stopping while a step waits."""


class _Server(uvicorn.Server):
    """uvicorn's server, started from a thread, stopped at once rather than on a 0.1 s tick."""

    def __init__(self, config: uvicorn.Config, stop: asyncio.Event) -> None:
        super().__init__(config)
        self._stop = stop
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()

    async def main_loop(self) -> None:
        await self.on_tick(0)  # sets the default headers once
        await self._stop.wait()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn's own shutdown sleeps a fixed 0.1 s and polls every 0.1 s: that is per test.
        for server in self.servers:
            server.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()  # closes idle keep-alive connections now
        if self.server_state.tasks:  # waiting steps end on the stop event at once
            await asyncio.wait(set(self.server_state.tasks), timeout=1.0)
        for task in self.server_state.tasks:
            task.cancel()
        await self.lifespan.shutdown()


class ScriptedLLM:
    """A scripted OpenAI-compatible chat completions server on 127.0.0.1.

    Attributes:
        base_url: "http://127.0.0.1:PORT/v1", valid once started.
        requests: the JSON body of every chat completion request received, in order.
        request_headers: the headers of those requests (lower-case names).
    """

    def __init__(self, *steps: Step | str, model: str = "fake") -> None:
        self.model = model
        self.requests: list[dict[str, Any]] = []
        self.request_headers: list[dict[str, str]] = []
        self._steps: deque[Step] = deque()
        self._lock = threading.Lock()
        self._waiters: list[Callable[[], None]] = []
        self._call_ids = itertools.count(1)
        self._port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._server: _Server | None = None
        self._thread_error: BaseException | None = None
        self.script(*steps)

    # -- script -------------------------------------------------------------------------

    def script(self, *steps: Step | str) -> ScriptedLLM:
        """Queue answers; each chat completion request consumes the next one."""
        for step in steps:
            self._steps.append(Text(step) if isinstance(step, str) else step)
        return self

    @property
    def remaining(self) -> int:
        """Scripted steps not consumed yet."""
        return len(self._steps)

    def reset(self) -> None:
        """Drop the remaining script and the recorded requests."""
        with self._lock:
            self._steps.clear()
            self.requests.clear()
            self.request_headers.clear()

    @property
    def last_request(self) -> dict[str, Any]:
        return self.requests[-1]

    async def wait_for_requests(self, count: int, within: float = 5.0) -> list[dict[str, Any]]:
        """Wait until at least `count` requests have arrived; return the recorded bodies.

        Raises:
            TimeoutError: fewer arrived within `within` seconds.
        """
        loop = asyncio.get_running_loop()
        arrived = asyncio.Event()

        def check() -> None:
            if len(self.requests) >= count:
                loop.call_soon_threadsafe(arrived.set)

        with self._lock:
            self._waiters.append(check)
            check()
        try:
            async with asyncio.timeout(within):
                await arrived.wait()
        except TimeoutError:
            msg = f"{len(self.requests)} of {count} requests reached the fake LLM in {within} s"
            raise TimeoutError(msg) from None
        finally:
            with self._lock:
                self._waiters.remove(check)
        return list(self.requests)

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("ScriptedLLM is not started")
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> ScriptedLLM:
        """Bind a free port and serve from a background thread; returns once accepting."""
        if self._thread is not None:
            raise RuntimeError("ScriptedLLM is already started")
        logging.getLogger("uvicorn.error").addFilter(_drop_deliberate_break)
        # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets; without it each
        # request on a kept-alive connection waits ~40 ms for a delayed ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app(),
            http="h11",  # the same wire behaviour whether or not httptools is installed
            ws="none",
            lifespan="off",
            log_config=None,  # with log_level and access_log left alone: no global logging changes
            timeout_graceful_shutdown=1,
        )
        self._thread = threading.Thread(
            target=self._run, args=(config, sock), name=f"fake-llm-{self._port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline and self._thread.is_alive():
            if self._server is not None and self._server.ready.wait(0.005):
                return self
        self.stop()
        raise RuntimeError(f"fake LLM did not start: {self._thread_error!r}")

    def stop(self) -> None:
        """Stop serving: waiting steps end at once, open streams are closed."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stop.set)
        thread.join(_STOP_TIMEOUT)
        if thread.is_alive():
            raise RuntimeError(f"fake LLM thread {thread.name} did not stop in {_STOP_TIMEOUT} s")
        self._thread = self._loop = self._stop = self._server = None

    def _run(self, config: uvicorn.Config, sock: socket.socket) -> None:
        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._server = _Server(config, self._stop)
            await self._server.serve(sockets=[sock])

        try:
            asyncio.run(serve())
        except BaseException as exc:  # reported by start(), or lost if it dies later
            self._thread_error = exc
            raise

    def __enter__(self) -> ScriptedLLM:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def __aenter__(self) -> ScriptedLLM:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.to_thread(self.stop)

    # -- HTTP ---------------------------------------------------------------------------

    def _app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/models", self._models, methods=["GET"]),
            ]
        )

    async def _models(self, request: Request) -> Response:
        model = {"id": self.model, "object": "model", "created": 0, "owned_by": "fake-llm"}
        return JSONResponse({"object": "list", "data": [model]})

    async def _chat(self, request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return _error_response(Error(400, "request body is not JSON", "invalid_request_error"))
        if not isinstance(body, dict):
            return _error_response(Error(400, "request body is not an object"))
        with self._lock:
            self.requests.append(body)
            self.request_headers.append(dict(request.headers))
            number = len(self.requests)
            step = self._steps.popleft() if self._steps else None
            for check in self._waiters:
                check()
        if step is None:
            message = f"fake LLM script exhausted: request {number} has no scripted step"
            return _final_error(500, message, "fake_llm_script_exhausted")
        return _StepResponse(self, step, body, number)

    def _next_call_id(self) -> str:
        return f"call_fake_{next(self._call_ids)}"

    async def _hold(self, gate: Gate) -> None:
        """Wait for the gate (polled: it is opened from another thread), or raise _Stopping."""
        assert self._stop is not None
        while not gate.is_open:
            if self._stop.is_set():
                raise _Stopping
            await asyncio.sleep(0.005)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, or raise _Stopping as soon as the server stops."""
        if seconds <= 0:
            return
        assert self._stop is not None
        try:
            async with asyncio.timeout(seconds):
                await self._stop.wait()
        except TimeoutError:
            return
        raise _Stopping


def _error_response(error: Error) -> JSONResponse:
    error_type = error.type or (
        "requests" if error.status == 429 else "server_error" if error.status >= 500 else None
    )
    error_type = error_type or "invalid_request_error"
    payload = {"message": error.message, "type": error_type, "param": None, "code": error.code}
    return JSONResponse({"error": payload}, status_code=error.status, headers=dict(error.headers))


def _final_error(status: int, message: str, code: str) -> JSONResponse:
    """An error of the fake itself; `x-should-retry: false` stops the openai SDK retrying it."""
    return _error_response(Error(status, message, code=code, headers={"x-should-retry": "false"}))


def _split(text: str, size: int) -> list[str]:
    size = max(size, 1)
    return [text[i : i + size] for i in range(0, len(text), size)]


def _fragments(text: str, count: int) -> list[str]:
    """Split `text` into up to `count` non-empty pieces of near-equal length."""
    if not text:
        return []
    return _split(text, -(-len(text) // max(count, 1)))


def _as_calls(step: Step) -> ToolCalls:
    assert isinstance(step, ToolCall | ToolCalls), f"not a tool call step: {step!r}"
    return ToolCalls([step]) if isinstance(step, ToolCall) else step


class _StepResponse(Response):
    """Answers one request from one step, streaming (SSE) or not, as the request asks."""

    def __init__(self, llm: ScriptedLLM, step: Step, body: dict[str, Any], number: int) -> None:
        super().__init__()
        self.llm, self.step, self.request_body = llm, step, body
        self.stream = bool(body.get("stream"))
        options = body.get("stream_options") or {}
        self.include_usage = bool(options.get("include_usage"))
        self.completion_id = f"chatcmpl-fake-{number}"
        self.created = int(time.time())
        self.model = str(body.get("model") or llm.model)
        self.started = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        step = self.step
        try:
            while isinstance(step, Stall | Hold):
                if isinstance(step, Stall):
                    await self.llm._sleep(step.seconds)
                else:
                    await self.llm._hold(step.gate)
                step = step.then
            if isinstance(step, Error):
                await _error_response(step)(scope, receive, send)
            elif self.stream:
                await self._answer_stream(step, send)
            else:
                await self._answer_whole(step, send)
        except _Stopping:
            if not self.started:
                stopped = _final_error(503, "fake LLM stopped", "fake_llm_stopped")
                await stopped(scope, receive, send)
            else:
                _deliberate_break.set(True)  # leave the body unfinished

    async def _start(self, send: Send, content_type: bytes) -> None:
        headers = [(b"content-type", content_type), (b"x-request-id", self.completion_id.encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        self.started = True

    async def _send_event(self, send: Send, data: str) -> None:
        event = f"data: {data}\n\n".encode()
        await send({"type": "http.response.body", "body": event, "more_body": True})

    async def _send_chunk(self, send: Send, delta: dict[str, Any], finish: str | None) -> None:
        chunk: dict[str, Any] = {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if self.include_usage:
            chunk["usage"] = None
        await self._send_event(send, json.dumps(chunk))

    async def _answer_stream(self, step: Step, send: Send) -> None:
        await self._start(send, b"text/event-stream; charset=utf-8")
        if isinstance(step, MidStreamError):
            await self._send_chunk(send, {"role": "assistant", "content": ""}, None)
            for piece in _split(step.after_text, 4):
                await self._send_chunk(send, {"content": piece}, None)
            if step.mode == "malformed":
                await self._send_event(send, '{"id": "' + self.completion_id + '", "choices": [')
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                _deliberate_break.set(True)  # return with the chunked body unfinished
            return
        if isinstance(step, Text):
            await self._send_chunk(send, {"role": "assistant", "content": ""}, None)
            for piece in _split(step.content, step.chunk_chars):
                await self.llm._sleep(step.delay)
                await self._send_chunk(send, {"content": piece}, None)
            finish, completion = step.finish_reason, step.content
        else:
            calls = _as_calls(step)
            first: dict[str, Any] = {"role": "assistant", "content": None}
            if calls.text:
                await self._send_chunk(send, {"role": "assistant", "content": ""}, None)
                for piece in _split(calls.text, 4):
                    await self.llm._sleep(calls.delay)
                    await self._send_chunk(send, {"content": piece}, None)
                first = {}
            for index, call in enumerate(calls.calls):
                head = {
                    "index": index,
                    "id": call.call_id or self.llm._next_call_id(),
                    "type": "function",
                    "function": {"name": call.name, "arguments": ""},
                }
                await self._send_chunk(send, {**first, "tool_calls": [head]}, None)
                first = {}
                for piece in _fragments(call.arguments_json, calls.fragments):
                    await self.llm._sleep(calls.delay)
                    tail = {"index": index, "function": {"arguments": piece}}
                    await self._send_chunk(send, {"tool_calls": [tail]}, None)
            finish = "tool_calls"
            completion = calls.text + "".join(c.arguments_json for c in calls.calls)
        await self._send_chunk(send, {}, finish)
        if self.include_usage:
            usage = {
                "id": self.completion_id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": self._usage(completion),
            }
            await self._send_event(send, json.dumps(usage))
        await self._send_event(send, "[DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _answer_whole(self, step: Step, send: Send) -> None:
        message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
        if isinstance(step, MidStreamError):
            await self._start(send, b"application/json")
            partial = f'{{"id": "{self.completion_id}", "choices": [{{"message": {{"content": "'
            body = (partial + step.after_text).encode()
            await send({"type": "http.response.body", "body": body, "more_body": True})
            if step.mode == "malformed":
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                _deliberate_break.set(True)
            return
        if isinstance(step, Text):
            await self.llm._sleep(step.delay)
            message["content"] = step.content
            finish, completion = step.finish_reason, step.content
        else:
            calls = _as_calls(step)
            await self.llm._sleep(calls.delay)
            message["content"] = calls.text or None
            message["tool_calls"] = [
                {
                    "id": call.call_id or self.llm._next_call_id(),
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments_json},
                }
                for call in calls.calls
            ]
            finish = "tool_calls"
            completion = calls.text + "".join(c.arguments_json for c in calls.calls)
        payload = {
            "id": self.completion_id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_fake",
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            ],
            "usage": self._usage(completion),
        }
        await self._start(send, b"application/json")
        body = json.dumps(payload).encode()
        await send({"type": "http.response.body", "body": body, "more_body": False})

    def _usage(self, completion: str) -> dict[str, int]:
        """Token counts estimated at four characters a token: stable, not realistic."""
        prompt = json.dumps(self.request_body.get("messages", []))
        prompt_tokens, completion_tokens = len(prompt) // 4 + 1, len(completion) // 4 + 1
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
