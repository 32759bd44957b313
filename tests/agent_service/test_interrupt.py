"""Stopping a running turn: `POST /v1/sessions/{id}/interrupt` over the openai SDK and HTTP."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from agent_service.agent import STOPPED
from kernel_agent_pytest.scripted_llm import Gate, Hold, Text, ToolCall
from tests.support.streams import LONG_CELL, read_all, read_until

from .conftest import Stack

pytestmark = pytest.mark.kernel

MODEL = "kernel-agent"


async def test_stop_interrupts_the_cell_and_the_kernel_keeps_its_variables(stack: Stack) -> None:
    stack.llm.script(ToolCall("execute_code", {"code": LONG_CELL}))  # and no answer after it
    client = stack.new_async_client()
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "sleep a long time"}],
        stream=True,
        extra_headers={"X-Session-Id": "long"},
    )
    content = await read_until(stream, "sleeping now")
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
        stopped = await http.post("/v1/sessions/long/interrupt")
        assert stopped.status_code == 200
        assert stopped.json() == {"id": "long", "object": "session", "interrupted": True}
        content = await read_all(stream, content)
        assert "KeyboardInterrupt" in content
        assert "Stopped: you stopped this turn." in content
        assert len(stack.llm.requests) == 1  # the model was not asked to go on
        session = (await http.get("/v1/sessions/long")).json()
        assert not session["busy"]
        assert [e["kind"] for e in session["events"] if e["type"] == "note"] == ["stopped"]
        # Nothing runs now: the kernel is left alone.
        idle = (await http.post("/v1/sessions/long/interrupt")).json()
        assert idle["interrupted"] is False

    stack.llm.script(ToolCall("execute_code", {"code": "print(x + 1)"}), Text("Still here."))
    reply = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "is x still there?"}],
        extra_headers={"X-Session-Id": "long"},
    )
    assert "```text\n42\n```" in reply.choices[0].message.content
    told = stack.llm.requests[1]["messages"]
    assert any("The user stopped the previous turn" in str(m.get("content")) for m in told)
    assert told[-1] == {"role": "user", "content": "is x still there?"}


async def test_stop_a_code_run_and_the_routes_ownership(start_stack) -> None:
    stack: Stack = start_stack(api_keys=["k-alice", "k-bob"])
    alice = {"Authorization": "Bearer k-alice"}
    bob = {"Authorization": "Bearer k-bob"}
    async with httpx.AsyncClient(base_url=stack.url, timeout=120) as http:
        run = asyncio.create_task(
            http.post("/v1/sessions/box/execute", json={"code": LONG_CELL}, headers=alice)
        )

        async def running() -> None:
            while True:
                response = await http.get("/v1/sessions/box", headers=alice)
                if response.status_code == 200 and response.json()["busy"]:
                    return
                await asyncio.sleep(0.05)

        await asyncio.wait_for(running(), 60)
        foreign = await http.post("/v1/sessions/box/interrupt", headers=bob)
        assert foreign.status_code == 404
        assert foreign.json()["error"]["code"] == "session_not_found"
        assert (await http.post("/v1/sessions/box/interrupt")).status_code == 401
        stopped = await http.post("/v1/sessions/box/interrupt", headers=alice)
        assert stopped.json()["interrupted"] is True
        result = (await run).json()
        assert result["status"] == "error"
        assert "KeyboardInterrupt" in result["text"]
        after = await http.post("/v1/sessions/box/execute", json={"code": "x + 1"}, headers=alice)
        assert after.json()["text"] == "42"
        missing = await http.post("/v1/sessions/nope/interrupt", headers=alice)
        assert missing.status_code == 404


async def test_stop_while_the_model_thinks_cuts_its_call(start_stack) -> None:
    stack: Stack = start_stack(llm_timeout=600)  # the model call ends by the stop alone
    gate = Gate()  # never opened: the model would answer only when the test ends
    stack.llm.script(Hold(gate, Text("never said")))
    client = stack.new_async_client()
    # The response starts with the turn's first words: here, the note that it stopped.
    started = asyncio.create_task(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "think slowly"}],
            stream=True,
            extra_headers={"X-Session-Id": "slow"},
        )
    )
    await stack.llm.wait_for_requests(1, within=60)
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
        stopped = await http.post("/v1/sessions/slow/interrupt")
        assert stopped.json()["interrupted"] is True
        content = ""
        async for chunk in await started:
            content += "".join(c.delta.content or "" for c in chunk.choices)
        assert content == f"> **Note:** {STOPPED}\n\n"
        events = (await http.get("/v1/sessions/slow")).json()["events"]
        assert [e["type"] for e in events] == ["user", "note"]
    stack.llm.script(Text("Go on then."))
    reply = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "go on"}],
        extra_headers={"X-Session-Id": "slow"},
    )
    assert reply.choices[0].message.content == "Go on then."
    told = stack.llm.requests[1]["messages"]
    assert any("The user stopped the previous turn" in str(m.get("content")) for m in told)
    assert not gate.is_open
