"""The fake LLM server, and what litellm makes of it.

These tests pin the litellm behaviour the agent's model adapter relies on (exception classes,
where they are raised, tool-call deltas, retries), so a litellm upgrade that changes it fails here
first.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest

# Before litellm is imported: no model-cost-map download (and its retry thread), no hub look-ups.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import litellm
from litellm.exceptions import MidStreamFallbackError  # not exported by `litellm`

from kernel_agent_pytest.scripted_llm import (
    Error,
    Gate,
    Hold,
    MidStreamError,
    ScriptedLLM,
    Stall,
    Text,
    ToolCall,
    ToolCalls,
)

litellm.suppress_debug_info = (
    True  # else it prints "Provider List: ..." and "Give Feedback" to stdout
)

MODEL = "hosted_vllm/fake"
MESSAGES = [{"role": "user", "content": "What is 6 * 7?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "execute_code",
            "description": "Run Python code in the session's kernel.",
            "parameters": {
                "type": "object",
                "properties": {"code": {"type": "string"}},
                "required": ["code"],
            },
        },
    }
]
HAS_TENACITY = importlib.util.find_spec("tenacity") is not None


@pytest.fixture
async def llm() -> AsyncIterator[ScriptedLLM]:
    async with ScriptedLLM() as server:
        yield server


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections: bound, never listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def complete(llm: ScriptedLLM, **kwargs: Any) -> Any:
    """Call litellm the way the agent does, against the fake."""
    params: dict[str, Any] = {
        "model": MODEL,
        "api_base": llm.base_url,
        "api_key": "sk-fake",
        "messages": MESSAGES,
        "tools": TOOLS,
        "stream": True,
    }
    return await litellm.acompletion(**(params | kwargs))


async def stream(llm: ScriptedLLM, **kwargs: Any) -> list[Any]:
    response = await complete(llm, **kwargs)
    return [chunk async for chunk in response]


async def drain(response: Any, into: list[Any]) -> None:
    async for chunk in response:
        into.append(chunk)


def content_deltas(chunks: list[Any]) -> list[str]:
    return [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]


def accumulate_tool_calls(chunks: list[Any]) -> dict[int, dict[str, str]]:
    """Rebuild tool calls from deltas by hand: id and name come once, arguments in pieces."""
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        if not chunk.choices:
            continue
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call["id"] = delta.id or call["id"]
            call["name"] = delta.function.name or call["name"]
            call["arguments"] += delta.function.arguments or ""
    return calls


# -- the server itself ----------------------------------------------------------------------


async def test_starts_fast_and_stops_cleanly() -> None:
    llm = ScriptedLLM()
    started = time.perf_counter()
    await llm.__aenter__()
    start_seconds = time.perf_counter() - started
    port = llm.port
    async with httpx.AsyncClient() as client:
        models = (await client.get(f"{llm.base_url}/models")).json()
    started = time.perf_counter()
    await llm.__aexit__(None, None, None)
    stop_seconds = time.perf_counter() - started

    assert models["data"][0]["id"] == "fake"
    assert start_seconds < 0.5
    assert stop_seconds < 0.5
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as client:
            await client.get(f"http://127.0.0.1:{port}/v1/models")


def test_sync_context_manager_works_without_an_event_loop() -> None:
    with ScriptedLLM(Text("hi")) as llm:
        body = {"model": "m", "messages": [], "stream": False}
        answer = httpx.post(f"{llm.base_url}/chat/completions", json=body).json()
    assert answer["choices"][0]["message"]["content"] == "hi"


async def test_sse_wire_format(llm: ScriptedLLM) -> None:
    llm.script(ToolCall("execute_code", '{"code": "6 * 7"}', call_id="call_1"))
    body = {"model": "m", "messages": [], "stream": True, "stream_options": {"include_usage": True}}
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{llm.base_url}/chat/completions", json=body)
    lines = [line for line in response.text.split("\n") if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    head = events[0]["choices"][0]["delta"]["tool_calls"][0]
    assert head == {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "execute_code", "arguments": ""},
    }
    tails = [e["choices"][0]["delta"]["tool_calls"][0] for e in events[1:-2]]
    assert len(tails) == 3
    assert all(set(tail) == {"index", "function"} for tail in tails)
    assert "".join(t["function"]["arguments"] for t in tails) == '{"code": "6 * 7"}'
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert events[-1]["choices"] == []
    assert events[-1]["usage"]["total_tokens"] > 0


async def test_exhausted_script_and_bad_body_are_clear_errors(llm: ScriptedLLM) -> None:
    async with httpx.AsyncClient() as client:
        exhausted = await client.post(f"{llm.base_url}/chat/completions", json={"messages": []})
        not_json = await client.post(f"{llm.base_url}/chat/completions", content=b"{")
    assert exhausted.status_code == 500
    assert "fake LLM script exhausted" in exhausted.json()["error"]["message"]
    assert exhausted.headers["x-should-retry"] == "false"
    assert not_json.status_code == 400
    assert len(llm.requests) == 1  # a body that is not JSON is not recorded


async def test_wait_for_requests_and_stop_during_a_stall() -> None:
    llm = ScriptedLLM(Stall(30))
    await llm.__aenter__()
    call = asyncio.create_task(complete(llm))
    bodies = await llm.wait_for_requests(1, within=5)
    assert bodies[0]["messages"] == MESSAGES
    with pytest.raises(TimeoutError, match="1 of 2 requests"):
        await llm.wait_for_requests(2, within=0.05)

    started = time.perf_counter()
    await llm.__aexit__(None, None, None)
    assert time.perf_counter() - started < 1.0
    with pytest.raises(litellm.ServiceUnavailableError) as info:  # the fake's 503 "stopped"
        await call
    assert info.value.status_code == 503


async def test_hold_answers_once_its_gate_opens(llm: ScriptedLLM) -> None:
    gate = Gate()
    llm.script(Hold(gate, Text("released")))
    call = asyncio.create_task(complete(llm, stream=False))
    await llm.wait_for_requests(1)
    assert not call.done()
    gate.open()
    response = await asyncio.wait_for(call, 10)
    assert response.choices[0].message.content == "released"


# -- litellm against the fake: streaming ----------------------------------------------------


async def test_text_streams_in_several_deltas(llm: ScriptedLLM) -> None:
    llm.script(Text("The answer is 42."))
    chunks = await stream(llm, stream_options={"include_usage": True})

    deltas = content_deltas(chunks)
    assert len(deltas) >= 4
    assert "".join(deltas) == "The answer is 42."
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    # the usage chunk arrives as its own chunk with no choices: index [0] only after a check
    assert chunks[-1].choices == []
    assert chunks[-1].usage.total_tokens > 0
    sent = llm.last_request
    assert sent["messages"] == MESSAGES
    assert sent["tools"] == TOOLS
    assert sent["stream"] is True
    assert llm.request_headers[-1]["authorization"] == "Bearer sk-fake"


async def test_fragmented_tool_call_is_reassembled(llm: ScriptedLLM) -> None:
    arguments = json.dumps({"code": "import math\nprint(math.factorial(20))"})
    llm.script(ToolCall("execute_code", arguments, call_id="call_abc"))
    chunks = await stream(llm)

    pieces = [
        d.function.arguments
        for c in chunks
        if c.choices
        for d in c.choices[0].delta.tool_calls or []
        if d.function.arguments
    ]
    assert len(pieces) == 3
    assert accumulate_tool_calls(chunks) == {
        0: {"id": "call_abc", "name": "execute_code", "arguments": arguments}
    }
    message = litellm.stream_chunk_builder(chunks).choices[0].message
    assert message.tool_calls[0].id == "call_abc"
    assert message.tool_calls[0].function.name == "execute_code"
    assert json.loads(message.tool_calls[0].function.arguments) == json.loads(arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_parallel_tool_calls(llm: ScriptedLLM) -> None:
    llm.script(
        ToolCalls(
            [ToolCall("execute_code", {"code": "a = 6"}), ToolCall("list_variables")],
            text="Let me compute that.",
        )
    )
    chunks = await stream(llm)

    indexes = {d.index for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []}
    assert indexes == {0, 1}
    calls = accumulate_tool_calls(chunks)
    assert [calls[0]["name"], calls[1]["name"]] == ["execute_code", "list_variables"]
    assert json.loads(calls[0]["arguments"]) == {"code": "a = 6"}
    assert calls[1]["arguments"] == "{}"
    assert calls[0]["id"] != calls[1]["id"]
    message = litellm.stream_chunk_builder(chunks).choices[0].message
    assert message.content == "Let me compute that."
    assert [t.function.name for t in message.tool_calls] == ["execute_code", "list_variables"]


async def test_tool_result_round_trip_is_recorded(llm: ScriptedLLM) -> None:
    llm.script(ToolCall("execute_code", {"code": "6 * 7"}, call_id="call_1"), Text("42"))
    first = litellm.stream_chunk_builder(await stream(llm)).choices[0].message
    followup = [
        *MESSAGES,
        first.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    ]
    assert "".join(content_deltas(await stream(llm, messages=followup))) == "42"

    sent = llm.requests[1]["messages"]
    assert sent[1]["tool_calls"][0]["id"] == "call_1"
    assert sent[2] == {"role": "tool", "tool_call_id": "call_1", "content": "42"}
    assert llm.remaining == 0


async def test_non_streaming(llm: ScriptedLLM) -> None:
    llm.script(Text("plain"), ToolCall("execute_code", {"code": "1"}, call_id="call_9"))
    text = await complete(llm, stream=False)
    calls = await complete(llm, stream=False)

    assert text.choices[0].message.content == "plain"
    assert text.choices[0].finish_reason == "stop"
    assert text.usage.total_tokens > 0
    assert calls.choices[0].finish_reason == "tool_calls"
    assert calls.choices[0].message.tool_calls[0].id == "call_9"
    assert calls.choices[0].message.tool_calls[0].function.arguments == '{"code": "1"}'
    assert llm.requests[0]["stream"] is False


# -- litellm against the fake: errors -------------------------------------------------------


async def test_429_raises_rate_limit_error_before_the_first_chunk(llm: ScriptedLLM) -> None:
    llm.script(Error(429, "slow down"))
    with pytest.raises(litellm.RateLimitError) as info:
        await complete(llm)  # raised by the await itself, not while iterating
    assert info.value.status_code == 429
    assert len(llm.requests) == 1  # hosted_vllm/ makes no retries of its own


async def test_500_raises_internal_server_error(llm: ScriptedLLM) -> None:
    llm.script(Error(500, "boom"))
    with pytest.raises(litellm.InternalServerError) as info:
        await complete(llm)
    assert info.value.status_code == 500
    with pytest.raises(litellm.InternalServerError, match="fake LLM script exhausted"):
        await complete(llm)


@pytest.mark.parametrize("stream_it", [True, False])
async def test_connection_refused_raises_internal_server_error(stream_it: bool) -> None:
    with closed_port() as port, pytest.raises(litellm.InternalServerError) as info:
        await litellm.acompletion(
            model=MODEL,
            api_base=f"http://127.0.0.1:{port}/v1",
            api_key="sk-fake",
            messages=MESSAGES,
            stream=stream_it,
        )
    # not APIConnectionError: aiohttp's ClientConnectorError is mapped to a 500
    assert info.value.status_code == 500


@pytest.mark.parametrize("mode", ["disconnect", "malformed"])
async def test_mid_stream_break(
    llm: ScriptedLLM, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    llm.script(MidStreamError("partial text", mode=mode))  # type: ignore[arg-type]
    response = await complete(llm)
    received: list[Any] = []
    with pytest.raises(MidStreamFallbackError) as info:
        await drain(response, into=received)

    # every chunk sent before the break is yielded: the role chunk and three content deltas
    assert len(received) == 4
    assert "".join(content_deltas(received)) == "partial text"
    error = info.value
    assert isinstance(error, litellm.ServiceUnavailableError)
    assert isinstance(error.original_exception, litellm.APIConnectionError)
    assert error.status_code == 500  # taken from the original APIConnectionError
    assert error.generated_content == "partial text"
    assert error.is_pre_first_chunk is False
    # the deliberate break is not logged as a server error
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [r for r in errors if r.name.startswith("uvicorn")]


async def test_stall_before_headers_raises_timeout(llm: ScriptedLLM) -> None:
    llm.script(Stall(5, then=Text("late")))
    started = time.perf_counter()
    with pytest.raises(litellm.Timeout) as info:
        await complete(llm, timeout=0.3)
    assert time.perf_counter() - started < 2
    assert info.value.status_code == 408
    # litellm.Timeout is an openai.APITimeoutError, so an openai (not litellm) APIConnectionError
    assert isinstance(info.value, openai.APIConnectionError)
    assert not isinstance(info.value, litellm.APIConnectionError)


async def test_stall_between_chunks_raises_mid_stream_timeout(llm: ScriptedLLM) -> None:
    llm.script(Text("abcdefgh", chunk_chars=2, delay=2))
    response = await complete(llm, timeout=0.3)
    received: list[Any] = []
    with pytest.raises(MidStreamFallbackError) as info:
        await drain(response, into=received)
    assert len(received) == 1  # the role chunk; the timeout is per read, not for the whole call
    assert isinstance(info.value.original_exception, litellm.Timeout)
    assert info.value.status_code == 408


# -- retries --------------------------------------------------------------------------------


@pytest.mark.skipif(HAS_TENACITY, reason="documents litellm without tenacity")
async def test_num_retries_is_a_silent_no_op_without_tenacity(llm: ScriptedLLM) -> None:
    """litellm retries through tenacity, which it does not depend on: absent, it gives up."""
    llm.script(Error(429, "slow down"), Text("ok"))
    with pytest.raises(litellm.RateLimitError) as info:
        await complete(llm, num_retries=2)
    assert len(llm.requests) == 1
    assert info.value.num_retries == 2  # and its message says "LiteLLM Retried: 2 times"


@pytest.mark.skipif(not HAS_TENACITY, reason="litellm's num_retries needs tenacity")
async def test_num_retries_retries_a_429(llm: ScriptedLLM) -> None:
    llm.script(Error(429, "slow down"), Text("ok"))
    started = time.perf_counter()
    assert "".join(content_deltas(await stream(llm, num_retries=2))) == "ok"
    assert len(llm.requests) == 2
    assert time.perf_counter() - started < 1  # first retry is immediate, then 1 s, 2 s, 4 s


async def test_openai_provider_retries_inside_the_sdk_unless_max_retries_0(
    llm: ScriptedLLM,
) -> None:
    """`openai/` goes through the openai SDK, which retries 429/5xx/connection errors itself."""
    llm.script(Error(429), Text("ok"))
    with pytest.raises(litellm.RateLimitError):
        await complete(llm, model="openai/fake", max_retries=0)
    assert len(llm.requests) == 1

    llm.reset()
    llm.script(Error(429, headers={"retry-after-ms": "10"}), Text("ok"))
    chunks = await complete(llm, model="openai/fake", max_retries=1)
    assert "".join(content_deltas([c async for c in chunks])) == "ok"
    assert [h["x-stainless-retry-count"] for h in llm.request_headers] == ["0", "1"]


# -- import -------------------------------------------------------------------------------


def test_import_litellm_offline_makes_no_network_attempt() -> None:
    script = textwrap.dedent(
        """
        import json, socket, threading, time
        attempts = []
        real_getaddrinfo = socket.getaddrinfo
        def getaddrinfo(host, *args, **kwargs):
            attempts.append(str(host))
            return real_getaddrinfo(host, *args, **kwargs)
        socket.getaddrinfo = getaddrinfo
        started = time.perf_counter()
        import litellm
        litellm.acompletion, litellm.stream_chunk_builder, litellm.RateLimitError
        seconds = time.perf_counter() - started
        threads = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
        print(json.dumps({"seconds": seconds, "attempts": attempts, "threads": threads}))
        """
    )
    env = {
        **os.environ,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_OFFLINE_MODE": "true",
        "HF_HUB_OFFLINE": "1",
    }
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=50
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    logging.getLogger(__name__).info("import litellm: %.2f s", report["seconds"])
    assert report["attempts"] == []
    assert report["threads"] == []
    assert report["seconds"] < 20  # ~2-3 s here; a network stall would add far more
