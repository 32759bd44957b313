"""End to end with the official openai SDK: real service, real kernel_mcp, scripted LLM."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from kernel_agent_pytest.scripted_llm import Error, MidStreamError, Stall, Text, ToolCall, ToolCalls
from tests.kernel_mcp.conftest import wait_until

from .conftest import Stack

pytestmark = pytest.mark.kernel

MODEL = "kernel-agent"


async def stream_turn(stack: Stack, session: str, text: str) -> tuple[str, list]:
    client = stack.new_async_client()
    chunks = []
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": text}],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"X-Session-Id": session},
    )
    async for chunk in stream:
        chunks.append(chunk)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return content, chunks


@pytest.mark.both_stores
async def test_three_turns_share_state_and_a_plot_is_served(stack: Stack) -> None:
    stack.llm.script(
        ToolCall("execute_code", {"code": "data = [3, 1, 2]\nprint(sum(data))"}),
        Text("The sum is 6."),
        ToolCall("execute_code", {"code": "max(data) * 10"}),
        Text("Max times ten is 30."),
        ToolCall(
            "execute_code",
            {"code": "import matplotlib.pyplot as plt\nplt.plot(data)\nplt.show()"},
        ),
        Text("Here is the plot."),
    )
    first, chunks = await stream_turn(stack, "conv-1", "Sum my data")
    assert "```python\ndata = [3, 1, 2]" in first
    assert "```text\n6\n```" in first
    assert first.endswith("The sum is 6.")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["stop"]
    assert chunks[-1].usage is not None

    second, _ = await stream_turn(stack, "conv-1", "Max times ten?")
    assert "30" in second
    tool_message = stack.llm.requests[3]["messages"][-1]
    assert tool_message["role"] == "tool"
    assert tool_message["content"] == "30"

    third, _ = await stream_turn(stack, "conv-1", "Plot it")
    links = [part.split(")")[0] for part in third.split("](")[1:]]
    assert len(links) == 1
    async with httpx.AsyncClient() as http:
        image = await http.get(links[0])
    assert image.status_code == 200
    assert image.headers["content-type"] == "image/png"
    assert image.content.startswith(b"\x89PNG")
    # the model saw the system prompt with skills, then the whole conversation
    sent = stack.llm.requests[-1]["messages"]
    assert sent[0]["role"] == "system"
    assert "sympy-math" in sent[0]["content"]
    assert [m["role"] for m in sent[1:]] == [
        "user", "assistant", "tool", "assistant",
        "user", "assistant", "tool", "assistant",
        "user", "assistant", "tool",
    ]  # fmt: skip


async def test_non_streaming_completion(stack: Stack) -> None:
    stack.llm.script(ToolCall("execute_code", {"code": "21 * 2"}), Text("It is 42."))
    client = stack.new_async_client()
    response = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "21*2?"}]
    )
    completion = response.parse()
    session = response.headers["x-session-id"]
    assert session
    assert completion.object == "chat.completion"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.choices[0].message.content.endswith("It is 42.")
    assert "```text\n42\n```" in completion.choices[0].message.content


async def test_strict_stream_helper_parses_our_stream(stack: Stack) -> None:
    stack.llm.script(Text("Hello there."))
    client = stack.new_async_client()
    async with client.chat.completions.stream(
        model=MODEL, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_completion()
    assert final.choices[0].message.content == "Hello there."


async def test_tool_call_arguments_fragmented_and_parallel(stack: Stack) -> None:
    stack.llm.script(
        ToolCalls(
            [
                ToolCall("execute_code", {"code": "a = 2"}),
                ToolCall("execute_code", {"code": "b = a + 1\nb"}),
            ],
            fragments=5,
        ),
        Text("b is 3."),
    )
    content, _ = await stream_turn(stack, "par-1", "go")
    assert "```text\n3\n```" in content
    tool_messages = [m for m in stack.llm.requests[1]["messages"] if m["role"] == "tool"]
    assert [m["content"] for m in tool_messages] == ["[no output]", "3"]


@pytest.mark.both_stores
async def test_concurrent_turn_gets_409(stack: Stack) -> None:
    # The first turn's code runs until the test lets it go: the 409 cannot come after it.
    wait = "import os, time\nwhile not os.path.exists('go'):\n    time.sleep(0.02)"
    stack.llm.script(ToolCall("execute_code", {"code": wait}), Text("ok"))
    client = stack.new_async_client(max_retries=3)
    first = asyncio.create_task(stream_turn(stack, "busy-1", "wait"))
    await stack.llm.wait_for_requests(1)
    from openai import ConflictError

    with pytest.raises(ConflictError) as info:
        await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "again"}],
            extra_headers={"X-Session-Id": "busy-1"},
        )
    assert info.value.code == "session_busy"
    assert info.value.response.headers["x-should-retry"] == "false"
    workspace = stack.kernel_settings.workspace

    def folders() -> list[Path]:
        return [p for p in workspace.glob("*") if p.is_dir() and not p.name.startswith(".")]

    await wait_until(lambda: len(folders()) == 1, "the session's folder")
    (folders()[0] / "go").touch()
    content, _ = await first
    reply, written = content.split("\n\n**Files written in this turn:**")
    assert reply.endswith("ok")
    assert "[go](" in written, "the file the test made while the turn ran"
    assert len(stack.llm.requests) == 2, "the SDK did not retry the 409"


async def test_rate_limit_then_success(stack: Stack) -> None:
    stack.llm.script(Error(429, "slow down"), Text("Made it."))
    content, _ = await stream_turn(stack, "rl-1", "hi")
    assert content == "Made it."
    assert len(stack.llm.requests) == 2


async def test_rate_limit_exhausted_is_an_http_error(stack: Stack) -> None:
    stack.llm.script(Error(429, "slow down"), Error(429, "slow"), Error(429, "slow"))
    from openai import RateLimitError

    with pytest.raises(RateLimitError) as info:
        await stack.new_async_client(max_retries=0).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
        )
    assert info.value.code == "rate_limit_exceeded"


@pytest.mark.both_stores
async def test_provider_500_mid_stream_ends_cleanly_and_keeps_transcript(stack: Stack) -> None:
    stack.llm.script(
        ToolCall("execute_code", {"code": "kept = 5"}),
        MidStreamError("Partial answ"),
    )
    client = stack.new_async_client()
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "go"}],
        stream=True,
        extra_headers={"X-Session-Id": "mid-1"},
    )
    received = []
    from openai import APIError

    async def consume() -> None:
        async for chunk in stream:
            received.append(chunk)

    with pytest.raises(APIError, match="model provider failed"):
        await consume()
    assert any("kept = 5" in (c.choices[0].delta.content or "") for c in received if c.choices)
    async with httpx.AsyncClient(base_url=stack.url) as http:
        session = (await http.get("/v1/sessions/mid-1")).json()
    types = [e["type"] for e in session["events"]]
    assert types == ["user", "assistant", "tool_started", "tool_result", "assistant", "error"]
    assert session["events"][4]["partial"] is True
    # the conversation continues, with the kernel state intact
    stack.llm.script(ToolCall("execute_code", {"code": "kept"}), Text("still 5"))
    content, _ = await stream_turn(stack, "mid-1", "again")
    assert "```text\n5\n```" in content


@pytest.mark.both_stores
async def test_disconnect_mid_execution_still_saves_the_turn(stack: Stack) -> None:
    stack.llm.script(
        ToolCall("execute_code", {"code": "import time; time.sleep(1.5); done = 'yes'"}),
        Text("Finished."),
    )
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
        body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "go"}]}
        async with http.stream(
            "POST", "/v1/chat/completions", json=body, headers={"X-Session-Id": "drop-1"}
        ) as response:
            async for line in response.aiter_lines():
                if "time.sleep" in line:
                    break  # the client goes away while the code runs
    await stack.llm.wait_for_requests(2, within=20)
    async with httpx.AsyncClient(base_url=stack.url) as http:
        for _ in range(100):
            session = (await http.get("/v1/sessions/drop-1")).json()
            if not session["busy"]:
                break
            await asyncio.sleep(0.1)
    types = [e["type"] for e in session["events"]]
    assert types == ["user", "assistant", "tool_started", "tool_result", "assistant"]
    assert session["events"][-1]["content"] == "Finished."
    assert session["events"][3]["structured"]["status"] == "ok"


@pytest.mark.both_stores
async def test_restarted_service_lists_old_transcripts(stack: Stack) -> None:
    stack.llm.script(Text("First answer."))
    await stream_turn(stack, "persist-1", "remember me")
    stack.restart_agent()
    async with httpx.AsyncClient(base_url=stack.url) as http:
        listed = (await http.get("/v1/sessions")).json()["data"]
        detail = (await http.get("/v1/sessions/persist-1")).json()
    assert [s["id"] for s in listed] == ["persist-1"]
    assert listed[0]["title"] == "remember me"
    assert [e["type"] for e in detail["events"]] == ["user", "assistant"]


async def test_api_keys_are_required_when_set(start_stack) -> None:
    stack: Stack = start_stack(api_keys=["k-123"])
    from openai import AuthenticationError

    with pytest.raises(AuthenticationError):
        await stack.new_async_client(api_key="wrong").models.list()
    models = await stack.new_async_client(api_key="k-123").models.list()
    assert [m.id for m in models.data] == ["kernel-agent", "hosted_vllm/fake"]


async def test_malformed_requests_get_openai_error_shape(stack: Stack) -> None:
    cases = [
        (b"{not json", 400, "invalid_json"),
        (json.dumps({"model": MODEL}).encode(), 400, None),
        (json.dumps({"model": MODEL, "messages": []}).encode(), 400, None),
        (json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}).encode(),
         404, "model_not_found"),
        (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "  "}]}).encode(),
         400, None),
        (json.dumps({"model": MODEL, "messages": [{"role": "assistant", "content": "x"}]}).encode(),
         400, None),
        (b"{" + b" " * 3_000_000 + b"}", 413, "request_too_large"),
    ]  # fmt: skip
    async with httpx.AsyncClient(base_url=stack.url) as http:
        for body, status, code in cases:
            response = await http.post(
                "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
            )
            assert response.status_code == status, (body[:60], response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["message"]
            if code:
                assert error["code"] == code
        missing = await http.get("/v1/sessions/nope")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "session_not_found"
    assert stack.llm.requests == []


async def test_no_model_configured(start_stack) -> None:
    stack: Stack = start_stack(model=None)
    async with httpx.AsyncClient(base_url=stack.url) as http:
        health = (await http.get("/health")).json()
        response = await http.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        )
    assert health["model_configured"] is False
    assert response.status_code == 503
    assert "AGENT_MODEL" in response.json()["error"]["message"]
    assert response.headers["x-should-retry"] == "false"


@pytest.mark.both_stores
async def test_prompt_cache_hit_miss_clear_and_fallback(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url) as http:
        stack.llm.script(Text("one"), Text("two"))
        await stream_turn(stack, "c-1", "a")
        await stream_turn(stack, "c-2", "b")
        stats = (await http.get("/admin/cache-stats")).json()
        assert (stats["misses"], stats["hits"]) == (1, 1)
        assert len(stats["prompt_hash"]) == 8
        assert stats["source"] == "kernel_mcp"
        assert stats["age_seconds"] >= 0
        cleared = (await http.post("/admin/clear-cache")).json()
        assert cleared["cached"] is False
        stack.kernel_mcp.stop()
        stack.llm.script(Text("three"))
        await stream_turn(stack, "c-3", "c")  # kernel_mcp down: the model still answers
        stats = (await http.get("/admin/cache-stats")).json()
        assert stats["fallbacks"] == 1
        assert stats["source"] == "fallback"
        assert stats["cached"] is False, "the fallback is not cached"
        assert "full prompt" in stack.llm.requests[-1]["messages"][0]["content"]


async def test_stalled_provider_times_out_cleanly(start_stack) -> None:
    stack: Stack = start_stack(llm_timeout=1, llm_retries=0)
    stack.llm.script(Stall(5))
    from openai import APIStatusError

    with pytest.raises(APIStatusError) as info:
        await stack.new_async_client(max_retries=0).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )
    assert info.value.status_code == 504


async def test_guard_stops_real_provider_calls(start_stack) -> None:
    stack: Stack = start_stack(model="openai/gpt-4o", api_base=None, api_key="sk-test")
    from openai import APIStatusError

    with pytest.raises(APIStatusError) as info:
        await stack.new_async_client(max_retries=0).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )
    assert info.value.status_code == 502
    assert "real providers need the `llm` marker" in info.value.message


async def test_health_reports_kernel_mcp_and_model(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url) as http:
        health = (await http.get("/health")).json()
        assert health["status"] == "ok"
        assert health["kernel_mcp"]["reachable"] is True
        assert health["model_configured"] is True
        stack.kernel_mcp.stop()
        health = (await http.get("/health")).json()
    assert health["status"] == "degraded"
    assert health["kernel_mcp"]["reachable"] is False


@pytest.mark.both_stores
async def test_back_to_back_turns_are_never_busy(stack: Stack) -> None:
    for i in range(6):
        stack.llm.script(ToolCall("execute_code", {"code": f"n = {i}"}), Text(f"set {i}"))
    for i in range(6):  # the next message right after [DONE]
        content, _ = await stream_turn(stack, "b2b-1", f"set {i}")
        assert content.endswith(f"set {i}")


@pytest.mark.both_stores
async def test_direct_execution_is_recorded_and_seen_by_the_model(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
        response = await http.post(
            "/v1/sessions/direct-1/execute",
            json={
                "code": "import matplotlib.pyplot as plt\ntotal = 41 + 1\nplt.plot([1, 2])\ntotal"
            },
        )
        assert response.status_code == 200, response.text
        result = response.json()
        assert result["status"] == "ok"
        value = [o for o in result["outputs"] if o["output_type"] == "execute_result"]
        assert value[0]["data"]["text/plain"] == "42"
        assert len(result["images"]) == 1
        assert (await http.get(result["images"][0])).content.startswith(b"\x89PNG")
        bad = await http.post("/v1/sessions/direct-1/execute", json={"code": ""})
        assert bad.status_code == 400
    stack.llm.script(ToolCall("execute_code", {"code": "total * 2"}), Text("84."))
    content, _ = await stream_turn(stack, "direct-1", "double it")
    assert "```text\n84\n```" in content
    first_request = stack.llm.requests[0]["messages"]
    assert "total = 41 + 1" in first_request[1]["content"]
    assert first_request[1]["role"] == "user"


async def test_skills_are_listed(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url) as http:
        skills = (await http.get("/v1/skills")).json()["data"]
    names = [s["name"] for s in skills]
    assert names == sorted(names)
    assert {"sympy-math", "pandas-data-analysis", "matplotlib-plotting", "data-files"} <= set(names)
    assert all(s["description"] for s in skills)


@pytest.mark.both_stores
async def test_session_sources_in_order_and_history_import(stack: Stack) -> None:
    stack.llm.script(Text("a"), Text("b"), Text("c"), Text("d"))
    client = stack.new_async_client()
    messages = [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "earlier question"},
        {"role": "assistant", "content": "earlier answer"},
        {"role": "user", "content": "new question"},
    ]
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=messages,
        metadata={"session_id": "from-metadata"},
        extra_headers={"X-OpenWebUI-Chat-Id": "from-openwebui"},
    )
    assert raw.headers["x-session-id"] == "from-metadata"
    sent = stack.llm.requests[0]["messages"]
    assert sent[0]["role"] == "system"
    assert "sympy-math" in sent[0]["content"], "the skills prompt comes first"
    assert sent[1] == {"role": "system", "content": "Answer in French."}
    assert [m["content"] for m in sent[2:]] == [
        "earlier question",
        "earlier answer",
        "new question",
    ]
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, extra_headers={"X-OpenWebUI-Chat-Id": "owui-1"}
    )
    assert raw.headers["x-session-id"] == "owui-1"
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, extra_headers={"X-Conversation-Id": "conv-9"}
    )
    assert raw.headers["x-session-id"] == "conv-9"
    # an existing session takes only the last user message from the request
    await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "ignored"}, {"role": "user", "content": "only this"}],
        extra_headers={"X-Session-Id": "conv-9"},
    )
    users = [m["content"] for m in stack.llm.requests[-1]["messages"] if m["role"] == "user"]
    assert users == ["earlier question", "new question", "only this"]


async def test_openwebui_render_mode(stack: Stack) -> None:
    stack.llm.script(ToolCall("execute_code", {"code": "print('hi')"}), Text("Done."))
    client = stack.new_async_client()
    completion = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "go"}],
        extra_headers={"X-Render-Mode": "openwebui"},
    )
    content = completion.choices[0].message.content
    assert content.startswith('<details type="code_interpreter" done="true" output="hi">')
    assert "```python\nprint('hi')\n```" in content
    assert "</details>" in content
    assert content.endswith("Done.")


@pytest.mark.both_stores
async def test_delete_session_shuts_its_kernel(stack: Stack) -> None:
    stack.llm.script(ToolCall("execute_code", {"code": "import os; os.getpid()"}), Text("ok"))
    await stream_turn(stack, "del-1", "pid?")
    async with httpx.AsyncClient(base_url=stack.url) as http:
        info = (await http.get("/v1/sessions/del-1/kernel")).json()
        deleted = (await http.delete("/v1/sessions/del-1")).json()
        assert deleted == {
            "id": "del-1",
            "object": "session",
            "deleted": True,
            "kernel_shut_down": True,
        }
        assert (await http.get("/v1/sessions/del-1")).status_code == 404
        assert (await http.delete("/v1/sessions/del-1")).status_code == 404
    import psutil

    pid = info["pid"]
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"


async def test_provider_500_before_streaming_is_retried(stack: Stack) -> None:
    stack.llm.script(Error(500, "boom"), Text("Recovered."))
    content, _ = await stream_turn(stack, "r500-1", "hi")
    assert content == "Recovered."


async def test_tool_rounds_are_bounded(start_stack) -> None:
    stack: Stack = start_stack(max_tool_rounds=2)
    stack.llm.script(
        ToolCall("execute_code", {"code": "1"}), ToolCall("execute_code", {"code": "2"})
    )
    content, _ = await stream_turn(stack, "rounds-1", "loop")
    assert content.rstrip().endswith("Ask me to continue, or narrow the task.")
    assert len(stack.llm.requests) == 2


async def test_invalid_tool_arguments_are_fed_back(stack: Stack) -> None:
    from kernel_agent_pytest.scripted_llm import ToolCall as Call

    stack.llm.script(Call("execute_code", "{not json"), Text("Sorry."))
    content, _ = await stream_turn(stack, "badargs-1", "go")
    assert content.endswith("Sorry.")
    tool = next(m for m in stack.llm.requests[1]["messages"] if m["role"] == "tool")
    assert "not valid JSON" in tool["content"]


async def test_dns_rebinding_is_refused(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url) as http:
        rebound = await http.post(
            "/v1/sessions/evil/execute",
            json={"code": "import os; os.getpid()"},
            headers={"Host": "attacker.example"},
        )
        assert rebound.status_code == 421
        assert rebound.json()["error"]["code"] == "host_not_allowed"
        foreign = await http.get("/v1/sessions", headers={"Origin": "http://attacker.example"})
        assert foreign.status_code == 403
        local = await http.get("/v1/sessions", headers={"Origin": "http://localhost:3000"})
        assert local.status_code == 200
    async with httpx.AsyncClient(base_url=stack.kernel_mcp.base_url) as http:
        kernel_side = await http.post("/mcp", json={}, headers={"Host": "attacker.example"})
    assert kernel_side.status_code == 421, "kernel_mcp refuses it too"


async def test_model_cannot_call_hidden_tools(stack: Stack) -> None:
    stack.llm.script(
        ToolCall("execute_code", {"code": "kept = 1"}),
        ToolCall("shutdown_kernel", {}),
        ToolCall("execute_code", {"code": "kept"}),
        Text("ok"),
    )
    content, _ = await stream_turn(stack, "hidden-1", "go")
    assert "```text\n1\n```" in content
    tool = [m for m in stack.llm.requests[2]["messages"] if m["role"] == "tool"][-1]
    assert tool["content"] == "Unknown tool: 'shutdown_kernel'"


@pytest.mark.both_stores
async def test_signed_image_links_work_without_a_key(start_stack) -> None:
    stack: Stack = start_stack(api_keys=["k-1"])
    stack.llm.script(
        ToolCall("execute_code", {"code": "import matplotlib.pyplot as plt\nplt.plot([1, 2])"}),
        Text("plotted"),
    )
    client = stack.new_async_client(api_key="k-1")
    completion = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "plot"}]
    )
    link = completion.choices[0].message.content.split("](")[1].split(")")[0]
    assert "?sig=" in link
    # A different character in the middle of the signature: every one of its bits counts
    # (the last base64 character carries padding bits a decoder may ignore).
    url, signature = link.split("?sig=")
    k = len(signature) - 10
    tampered = f"{url}?sig={signature[:k]}{'A' if signature[k] != 'A' else 'B'}{signature[k + 1 :]}"
    async with httpx.AsyncClient() as http:
        assert (await http.get(link)).status_code == 200
        assert (await http.get(link.split("?")[0])).status_code == 401
        assert (await http.get(tampered)).status_code == 401


async def test_whitespace_code_runs(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
        response = await http.post("/v1/sessions/ws-1/execute", json={"code": "   "})
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


async def test_unexpected_errors_are_openai_shaped(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret detail of a bug")

    monkeypatch.setattr(stack.services.store, "list_sessions", broken)
    async with httpx.AsyncClient(base_url=stack.url) as http:
        response = await http.get("/v1/sessions")
    assert response.status_code == 500
    assert response.headers["x-should-retry"] == "false"
    assert response.json() == {
        "error": {
            "message": "internal error; the service logged the details",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
