"""Long conversations and clients that are not ours: budget, continuation, tasks, parameters."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import httpx
import litellm
import pytest

from agent_service.store import Event
from kernel_agent_pytest.scripted_llm import Gate, Hold, Text, ToolCall

from .conftest import Stack
from .test_chat import stream_turn

pytestmark = pytest.mark.kernel

MODEL = "kernel-agent"
BUDGET = 2500  # the skills prompt and the tool definitions take ~950 of it


def tokens(request: dict[str, Any]) -> int:
    """What litellm's offline counter says a request to the model costs."""
    return int(
        litellm.token_counter(
            model="hosted_vllm/fake", messages=request["messages"], tools=request.get("tools")
        )
    )


@pytest.mark.timeout(240)
@pytest.mark.both_stores
async def test_forty_turns_stay_within_the_budget_and_remember_turn_one(start_stack) -> None:
    stack: Stack = start_stack(max_input_tokens=BUDGET)
    stack.llm.script(
        ToolCall("execute_code", {"code": "data = list(range(1000))\nprint(data)"}),
        Text("Stored 1000 numbers."),
    )
    await stream_turn(stack, "long-1", "Store the numbers 0..999 as data")
    for i in range(2, 40):
        stack.llm.script(
            ToolCall(
                "execute_code", {"code": f"step_{i} = {i} ** 2\nprint('step', {i}, step_{i})"}
            ),
            Text(f"Step {i} is {i * i}."),
        )
        await stream_turn(stack, "long-1", f"Square {i}, please, and keep it as step_{i}")
    stack.llm.script(ToolCall("execute_code", {"code": "print(sum(data))"}), Text("The sum."))
    content, _ = await stream_turn(stack, "long-1", "What is the sum of data?")

    assert "499500" in content, "turn 40 used a variable from turn 1"
    costs = [tokens(r) for r in stack.llm.requests]
    assert max(costs) <= BUDGET, f"requests over the budget: {[c for c in costs if c > BUDGET]}"
    last = stack.llm.requests[-2]["messages"]  # turn 40's first model request
    notes = [m["content"] for m in last if m["role"] == "system"]
    assert any("To fit your input limit" in n for n in notes), "the model is told"
    assert any("oldest part of the conversation is left out" in n for n in notes)
    users = [m["content"] for m in last if m["role"] == "user"]
    assert "Store the numbers 0..999 as data" not in users, "the oldest turns were left out"
    assert users[-1] == "What is the sum of data?"
    # Before turns were left out, the long output of turn 1 was elided, not dropped.
    elided = [
        m["content"]
        for r in stack.llm.requests
        for m in r["messages"]
        if m["role"] == "tool" and "elided to fit the context" in m["content"]
    ]
    assert elided
    assert elided[0].startswith("[0, 1, 2, 3")
    # The transcript and the notebook keep everything.
    async with httpx.AsyncClient(base_url=stack.url) as http:
        session = (await http.get("/v1/sessions/long-1")).json()
    assert session["turns"] == 40
    first = next(e for e in session["events"] if e["type"] == "tool_result")
    assert first["text"].startswith("[0, 1, 2")
    assert first["text"].rstrip().endswith("999]")


@pytest.mark.both_stores
async def test_a_turn_reads_only_what_fits(start_stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """300 stored turns with a plot each: the next turn reads a few small rows, no outputs."""
    stack: Stack = start_stack(max_input_tokens=BUDGET)
    store = stack.services.store
    store.create_session("big-1", MODEL)
    png = base64.b64encode(b"\x89PNG" + bytes(100_000)).decode()
    for turn in range(1, 301):
        call = {"id": f"c{turn}", "name": "execute_code", "arguments": '{"code": "plot()"}'}
        store.append("big-1", turn, "user", {"content": f"plot {turn}"})
        store.append("big-1", turn, "assistant", {"content": "", "tool_calls": [call]})
        outputs = [{"output_type": "display_data", "data": {"image/png": png}, "metadata": {}}]
        store.append(
            "big-1",
            turn,
            "tool_result",
            {
                "call_id": f"c{turn}",
                "name": "execute_code",
                "arguments": {"code": "plot()"},
                "text": "[image/png image shown to the user]",
                "is_error": False,
                "structured": {"status": "ok", "execution_count": turn, "outputs": outputs},
            },
        )
        store.append("big-1", turn, "assistant", {"content": f"Plot {turn}."})
    read: list[Event] = []
    newest = store.newest_events

    def counting(session_id: str, before_turn: int) -> Any:
        for event in newest(session_id, before_turn):
            read.append(event)
            yield event

    def whole_transcript(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the turn read the whole transcript")

    monkeypatch.setattr(store, "newest_events", counting)
    monkeypatch.setattr(store, "events", whole_transcript)
    monkeypatch.setattr(stack.services.exporter, "schedule", lambda sid: None)
    stack.llm.script(Text("Three hundred plots."))
    content, _ = await stream_turn(stack, "big-1", "How many plots?")
    assert content == "Three hundred plots."
    assert 0 < len(read) < 300, f"{len(read)} of 1,200 events read"
    assert all("outputs" not in (e.data.get("structured") or {}) for e in read)
    sent = stack.llm.requests[0]["messages"]
    assert sent[-1] == {"role": "user", "content": "How many plots?"}
    assert tokens(stack.llm.requests[0]) <= BUDGET


@pytest.mark.both_stores
async def test_full_history_client_without_an_id_keeps_its_kernel(stack: Stack) -> None:
    """The README's example with no header: the same session, turn after turn."""
    client = stack.new_async_client()
    messages: list[dict[str, str]] = [{"role": "system", "content": "Be brief."}]
    sessions = []
    for code, question, answer in [
        ("xs = list(range(1, 11))\nsum(xs)", "Load 1..10 into xs and sum it", "It is 55."),
        ("sum(x * x for x in xs)", "Now the sum of squares", "It is 385."),
        ("max(xs)", "And the largest?", "It is 10."),
    ]:
        stack.llm.script(ToolCall("execute_code", {"code": code}), Text(answer))
        messages.append({"role": "user", "content": question})
        raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=messages)
        reply = raw.parse().choices[0].message.content
        assert reply.endswith(answer)
        sessions.append(raw.headers["x-session-id"])
        messages.append({"role": "assistant", "content": reply})
    assert len(set(sessions)) == 1, sessions
    tool_results = [m for m in stack.llm.requests[-1]["messages"] if m["role"] == "tool"]
    assert tool_results[-1]["content"] == "10", "the kernel kept xs"
    # A new conversation (or one that differs) gets a session of its own.
    stack.llm.script(Text("Hello."), Text("Edited."))
    fresh = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Load 1..10 into xs and sum it"}]
    )
    assert fresh.headers["x-session-id"] not in sessions
    edited = [*messages[:2], {"role": "assistant", "content": "Something else."}, messages[3]]
    forked = await client.chat.completions.with_raw_response.create(model=MODEL, messages=edited)
    assert forked.headers["x-session-id"] not in sessions
    async with httpx.AsyncClient(base_url=stack.url) as http:
        listed = (await http.get("/v1/sessions")).json()["data"]
    assert sessions[0] in [s["id"] for s in listed]
    assert len(listed) == 3


async def test_request_parameters_reach_the_model_under_the_cap(start_stack) -> None:
    stack: Stack = start_stack(max_tokens=64)
    client = stack.new_async_client()
    stack.llm.script(Text("one"), Text("two"), Text("three"))
    await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=500,
        temperature=0.2,
        top_p=0.9,
        stop=["END"],
        seed=7,
        extra_headers={"X-Session-Id": "params-1"},
    )
    await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "again"}],
        max_completion_tokens=20,
        extra_headers={"X-Session-Id": "params-1"},
    )
    await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "no limits"}]
    )
    first, second, third = stack.llm.requests
    assert first["max_tokens"] == 64, "AGENT_MAX_TOKENS caps what the request asks"
    assert (first["temperature"], first["top_p"], first["stop"], first["seed"]) == (
        0.2,
        0.9,
        ["END"],
        7,
    )
    assert second["max_tokens"] == 20
    assert third["max_tokens"] == 64
    assert "temperature" not in third
    assert "seed" not in third
    async with httpx.AsyncClient(base_url=stack.url) as http:
        bad = await http.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_p": 3},
        )
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "top_p"


async def test_models_setting_lists_and_routes_models(start_stack) -> None:
    stack: Stack = start_stack(models=["hosted_vllm/other", "hosted_vllm/third"])
    client = stack.new_async_client()
    listed = [m.id for m in (await client.models.list()).data]
    assert listed == ["kernel-agent", "hosted_vllm/fake", "hosted_vllm/other", "hosted_vllm/third"]
    stack.llm.script(Text("default"), Text("other"))
    await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a"}])
    await client.chat.completions.create(
        model="hosted_vllm/other", messages=[{"role": "user", "content": "b"}]
    )
    assert [r["model"] for r in stack.llm.requests] == ["fake", "other"]
    from openai import NotFoundError

    with pytest.raises(NotFoundError):
        await client.chat.completions.create(
            model="hosted_vllm/unlisted", messages=[{"role": "user", "content": "c"}]
        )


def _title_request(chat: str) -> dict[str, Any]:
    """Open WebUI 0.12's title task as it reaches a model: metadata removed, not streamed."""
    template = (
        "### Task:\nGenerate a concise title summarizing the chat history.\n### Output:\n"
        'JSON format: { "title": "your concise title here" }\n### Chat History:\n'
        f"<chat_history>\n{chat}\n</chat_history>"
    )
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": template}],
        "stream": False,
        "max_completion_tokens": 1000,
    }


async def test_openwebui_title_request_racing_the_first_turn(stack: Stack) -> None:
    headers = {"X-OpenWebUI-Chat-Id": "owui-race-1"}
    gate = Gate()
    stack.llm.script(
        Hold(gate, Text('{ "title": "Summing numbers" }')),
        ToolCall("execute_code", {"code": "total = 2 + 3\ntotal"}),
        Text("The total is 5."),
        Text('{ "tags": ["Math"] }'),
        Text('{ "follow_ups": ["Why 5?"] }'),
    )
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
        title = asyncio.create_task(
            http.post(
                "/v1/chat/completions",
                json=_title_request("USER: add 2 and 3"),
                headers=headers,
            )
        )
        await stack.llm.wait_for_requests(1)  # the title task is with the model, held
        client = stack.new_async_client(max_retries=0)
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "add 2 and 3"}],
            stream=True,
            extra_headers=headers,
        )
        content = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert content.endswith("The total is 5.")
        gate.open()
        answered = await title
        assert answered.status_code == 200, answered.text
        assert (
            answered.json()["choices"][0]["message"]["content"] == '{ "title": "Summing numbers" }'
        )
        for task in ("tags", "follow_ups"):
            body = _title_request("USER: add 2 and 3\nASSISTANT: The total is 5.")
            body["messages"][0]["content"] = body["messages"][0]["content"].replace("title", task)
            response = await http.post("/v1/chat/completions", json=body, headers=headers)
            assert response.status_code == 200, response.text
            assert task in response.json()["choices"][0]["message"]["content"]
        session = (await http.get("/v1/sessions/owui-race-1")).json()
        notebook = (await http.get("/v1/sessions/owui-race-1/notebook")).json()
    task_request = stack.llm.requests[0]
    assert "tools" not in task_request, "a task gets no tools"
    assert task_request["messages"] == _title_request("USER: add 2 and 3")["messages"]
    assert task_request["max_tokens"] == 1000
    assert [e["type"] for e in session["events"]] == [
        "user", "assistant", "tool_started", "tool_result", "assistant",
    ]  # fmt: skip
    assert session["title"] == "add 2 and 3"
    sources = json.dumps(notebook["cells"])
    assert "chat_history" not in sources
    assert "Summing numbers" not in sources
