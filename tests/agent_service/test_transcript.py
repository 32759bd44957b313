"""A transcript that never lies: restarts, kills, signals, bad text, kernel_mcp down."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import nbformat
import pytest

from kernel_agent_pytest.scripted_llm import Text, ToolCall

from .conftest import Stack
from .test_chat import stream_turn
from .test_notebook import on_disk

pytestmark = pytest.mark.kernel

MODEL = "kernel-agent"
KERNEL_AGENT = Path(sys.executable).with_name("kernel-agent")
COUNTING = (
    "import time\nfor i in range(600):\n    print(f'line {i}', flush=True)\n    time.sleep(0.1)"
)


async def test_kernel_mcp_restart_is_noted_and_the_notebook_replays(stack: Stack) -> None:
    stack.llm.script(ToolCall("execute_code", {"code": "x = 41"}), Text("Set."))
    await stream_turn(stack, "kc-1", "set x")
    stack.restart_kernel_mcp()
    stack.llm.script(
        ToolCall("execute_code", {"code": "print(x + 1)"}), Text("x is gone; redefining.")
    )
    content, _ = await stream_turn(stack, "kc-1", "x + 1?")
    assert "> **Note:** The session's kernel was replaced" in content, "the user is told"
    told = stack.llm.requests[2]["messages"]
    notes = [
        m["content"]
        for m in told
        if m["role"] == "user" and "Note from the service" in m["content"]
    ]
    assert len(notes) == 1
    assert "kernel was replaced" in notes[0], "the model is told, in that turn"
    assert "NameError" in stack.llm.requests[3]["messages"][-1]["content"]
    # The next turn sees no new note: the kernel is the same since.
    stack.llm.script(Text("ok"))
    await stream_turn(stack, "kc-1", "fine")
    later = [m for m in stack.llm.requests[4]["messages"] if "Note from the service" in str(m)]
    assert len(later) == 1, "the note stays where it happened, once"
    path = stack.agent_settings.notebooks_dir / "kc-1.ipynb"
    notebook = await on_disk(path, 2)
    marked = [c for c in notebook.cells if c.metadata.get("kernel_agent", {}).get("kernel_changed")]
    assert len(marked) == 1
    assert marked[0].source.startswith("> **Note:** The session's kernel was replaced")
    replay = await asyncio.to_thread(
        subprocess.run,
        [str(KERNEL_AGENT), "replay", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert replay.returncode == 0, replay.stdout + replay.stderr
    # Cells are named by their index in the notebook: the second code cell's.
    second_code = [i for i, c in enumerate(notebook.cells) if c.cell_type == "code"][1]
    assert f"kernel restarted before cell {second_code}" in replay.stdout
    assert "2 matched, 0 differ" in replay.stdout


async def test_killed_mid_turn_keeps_the_output_and_says_result_unknown(
    stack: Stack, agent_process
) -> None:
    agent = await agent_process()
    stack.llm.script(ToolCall("execute_code", {"code": COUNTING}))
    stream = await agent.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "count slowly"}],
        stream=True,
        extra_headers={"X-Session-Id": "kill-1"},
    )
    seen = ""
    async for chunk in stream:
        seen += (chunk.choices[0].delta.content or "") if chunk.choices else ""
        if "line 3\n" in seen:
            break
    agent.process.kill()  # SIGKILL: nothing of the service runs after this
    assert await agent.wait_exit() == -signal.SIGKILL
    await stream.close()

    again = await agent_process()
    async with httpx.AsyncClient(base_url=again.url) as http:
        session = (await http.get("/v1/sessions/kill-1")).json()
        started = next(e for e in session["events"] if e["type"] == "tool_started")
        assert "line 0\nline 1\nline 2\nline 3\n" in started["live_output"]
        assert not [e for e in session["events"] if e["type"] == "tool_result"]
        stack.llm.script(Text("It ran; I do not know how far."))
        reply = await again.client().chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "what happened?"}],
            extra_headers={"X-Session-Id": "kill-1"},
        )
        assert reply.choices[0].message.content == "It ran; I do not know how far."
        tool = next(m for m in stack.llm.requests[-1]["messages"] if m["role"] == "tool")
        assert tool["content"].startswith("[ran, result unknown")
        assert "line 3" in tool["content"]
        assert "not executed" not in tool["content"]
        notebook = nbformat.reads(
            (await http.get("/v1/sessions/kill-1/notebook")).text, as_version=4
        )
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code[0].metadata.kernel_agent.status == "unknown"
    assert "line 3" in code[0].outputs[0]["text"]
    notes = [c.source for c in notebook.cells if c.cell_type == "markdown"]
    assert any(n.startswith("> **Result unknown") for n in notes)


async def _sse_lines(response: httpx.Response) -> AsyncIterator[str]:
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            yield line.removeprefix("data: ")


async def test_sigterm_mid_stream_sends_an_error_event_and_done(
    stack: Stack, agent_process
) -> None:
    agent = await agent_process(AGENT_SHUTDOWN_GRACE="1")
    stack.llm.script(ToolCall("execute_code", {"code": COUNTING}))
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "count"}]}
    events: list[str] = []
    signalled = False
    async with (
        httpx.AsyncClient(base_url=agent.url, timeout=60) as http,
        http.stream(
            "POST", "/v1/chat/completions", json=body, headers={"X-Session-Id": "term-1"}
        ) as response,
    ):
        assert response.status_code == 200
        async for data in _sse_lines(response):
            events.append(data)
            if "line 2\\n" in data and not signalled:  # once: a second SIGTERM forces exit
                agent.process.send_signal(signal.SIGTERM)
                signalled = True
    assert events[-1] == "[DONE]", events[-3:]
    error = json.loads(events[-2])["error"]
    assert error["code"] == "service_shutting_down"
    assert "kept in the session's transcript" in error["message"]
    # uvicorn ends by re-raising the signal it caught, once shutdown is complete.
    assert await agent.wait_exit() == -signal.SIGTERM, agent.output()
    assert "waiting for 1 running turns" in agent.output()

    again = await agent_process()
    async with httpx.AsyncClient(base_url=again.url) as http:
        session = (await http.get("/v1/sessions/term-1")).json()
    result = next(e for e in session["events"] if e["type"] == "tool_result")
    assert result["structured"]["status"] == "unknown"
    assert result["text"].startswith("[interrupted: the service shut down")
    assert "line 2" in result["live_output"]
    assert session["events"][-1]["type"] == "error"


@pytest.mark.both_stores
async def test_lone_surrogates_are_refused_and_nothing_is_stored(stack: Stack) -> None:
    bad = '{"model": "kernel-agent", "messages": [{"role": "user", "content": "hi \\ud800"}]}'
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
        fresh = await http.post("/v1/chat/completions", content=bad, headers=headers)
        assert fresh.status_code == 400, fresh.text
        assert fresh.json()["error"]["type"] == "invalid_request_error"
        assert (await http.get("/v1/sessions")).json()["data"] == []
        stack.llm.script(Text("fine"))
        await stream_turn(stack, "sur-1", "hello")
        existing = await http.post(
            "/v1/chat/completions", content=bad, headers={**headers, "X-Session-Id": "sur-1"}
        )
        assert existing.status_code == 400
        parts = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "x"}]}]}).replace('"x"', '"\\udfff"')  # fmt: skip
        as_parts = await http.post(
            "/v1/chat/completions", content=parts, headers={**headers, "X-Session-Id": "sur-1"}
        )
        assert as_parts.status_code == 400
        code = await http.post(
            "/v1/sessions/sur-1/execute", content='{"code": "\\ud800"}', headers=headers
        )
        assert code.status_code == 400
        session = (await http.get("/v1/sessions/sur-1")).json()
    assert [e["type"] for e in session["events"]] == ["user", "assistant"]
    assert len(stack.llm.requests) == 1


async def test_kernel_mcp_down_says_computation_is_unavailable(stack: Stack) -> None:
    stack.kernel_mcp.stop()
    stack.llm.script(Text(""))
    completion = await stack.new_async_client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "compute 2 + 2"}],
        extra_headers={"X-Session-Id": "down-1"},
    )
    content = completion.choices[0].message.content
    assert content.startswith("> **Note:** Computation is unavailable")
    assert "tools" not in stack.llm.requests[0]
    async with httpx.AsyncClient(base_url=stack.url) as http:
        session = (await http.get("/v1/sessions/down-1")).json()
    notes = [e for e in session["events"] if e["type"] == "note"]
    assert notes[0]["kind"] == "kernel_unavailable"


async def test_chunked_body_over_the_limit_is_413(stack: Stack) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"model": "kernel-agent", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"x" * 100_000
        yield b'"}]}'

    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
        response = await http.post(
            "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}
        )
        assert response.status_code == 413, response.text
        assert response.json()["error"]["code"] == "request_too_large"
        small = await http.post(
            "/v1/chat/completions",
            content=_one_chunk(
                b'{"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}'
            ),
            headers={"content-type": "application/json"},
        )
    assert small.status_code == 404, "a chunked body within the limit is read as usual"
    assert stack.llm.requests == []


async def _one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_too_many_messages_are_refused(start_stack) -> None:
    stack: Stack = start_stack(max_request_messages=50)
    messages = [{"role": "user", "content": f"m{i}"} for i in range(51)]
    async with httpx.AsyncClient(base_url=stack.url) as http:
        response = await http.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": messages}
        )
    assert response.status_code == 413
    assert "51 messages" in response.json()["error"]["message"]


async def test_health_says_when_the_service_is_warm(stack: Stack, agent_process) -> None:
    agent = await agent_process()
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient(base_url=agent.url) as http:
        while True:
            health = (await http.get("/health")).json()
            if health["warm"]:
                break
            assert time.monotonic() < deadline, "never warm"
            await asyncio.sleep(0.05)
    assert health["status"] == "ok"
    assert "litellm loaded" in agent.output(), "imported at start-up, before any request"
    assert stack.llm.requests == []
