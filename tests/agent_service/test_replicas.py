"""Replicas of agent_service on one PostgreSQL database and one kernel_mcp (issue 18).

Replica A is the stack's agent service; replica B is a second one (the stack's
`start_replica`) on the same settings but its own data and notebooks folders, so nothing is
shared but the database and kernel_mcp. The kill test runs A as a process of its own.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import httpx
import nbformat
import psycopg
import pytest
from openai import AsyncOpenAI

from kernel_agent_pytest import Gate, Hold, ServerThread, Text, ToolCall
from tests.kernel_mcp.conftest import wait_until_async
from tests.support.streams import LONG_CELL, read_all, read_until

from .conftest import Stack

pytestmark = pytest.mark.kernel

MODEL = "kernel-agent"
DEADLINE = 30.0


@pytest.fixture
def store_kind() -> str:
    return "postgres"


@pytest.fixture
def replica_b(stack: Stack) -> ServerThread:
    """A second agent service on the stack's database and kernel_mcp, nothing else shared."""
    return stack.start_replica()


async def turn(url: str, session: str, text: str) -> str:
    """One streamed turn through the openai SDK; the content it showed."""
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": text}],
        stream=True,
        extra_headers={"X-Session-Id": session},
    )
    parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    return "".join(parts)


async def post_turn(http: httpx.AsyncClient, session: str, text: str) -> httpx.Response:
    return await http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": text}]},
        headers={"X-Session-Id": session},
        timeout=60,
    )


async def test_turn_two_on_b_sees_turn_one_of_a(stack: Stack, replica_b: ServerThread) -> None:
    stack.llm.script(ToolCall("execute_code", {"code": "x = 41"}), Text("Set."))
    await turn(stack.url, "rep-1", "set x to 41")
    stack.llm.script(ToolCall("execute_code", {"code": "print(x + 1)"}), Text("It is 42."))
    content = await turn(replica_b.url, "rep-1", "print x + 1")
    assert "```text\n42\n```" in content, "B's turn ran in the kernel A's turn left"
    sent = stack.llm.requests[2]["messages"]
    assert [m["content"] for m in sent if m["role"] == "user"] == ["set x to 41", "print x + 1"]
    async with (
        httpx.AsyncClient(base_url=stack.url) as on_a,
        httpx.AsyncClient(base_url=replica_b.url) as on_b,
    ):
        for http in (on_a, on_b):
            session = (await http.get("/v1/sessions/rep-1")).json()
            assert session["turns"] == 2
            response = await http.get("/v1/sessions/rep-1/notebook")
            assert response.status_code == 200
            notebook = nbformat.reads(response.text, as_version=4)
            code = [c for c in notebook.cells if c.cell_type == "code"]
            assert [c.source for c in code] == ["x = 41", "print(x + 1)"]
            assert code[1].outputs[0]["text"] == "42\n"
        listed = (await on_a.get("/v1/sessions")).json()["data"]
        assert [s["id"] for s in listed] == ["rep-1"]
    a, b = stack.services, replica_b.app.state.services
    assert b.links.check(a.links.sign("rep-1", "1-0.png"), "rep-1", "1-0.png"), (
        "an image link A signed opens on B: the secret is shared through the database"
    )


async def test_simultaneous_turns_through_a_and_b_give_exactly_one_409(
    stack: Stack, replica_b: ServerThread
) -> None:
    gate = Gate()
    stack.llm.script(Hold(gate, Text("I went first.")))
    async with (
        httpx.AsyncClient(base_url=stack.url) as on_a,
        httpx.AsyncClient(base_url=replica_b.url) as on_b,
    ):
        both = [
            asyncio.create_task(post_turn(on_a, "rep-2", "from A")),
            asyncio.create_task(post_turn(on_b, "rep-2", "from B")),
        ]
        done, _ = await asyncio.wait(both, timeout=DEADLINE, return_when=asyncio.FIRST_COMPLETED)
        assert done, "one of the two was refused at once"
        first = done.pop()
        refused = first.result()
        assert refused.status_code == 409
        assert refused.json()["error"]["code"] == "session_busy"
        assert refused.headers["x-should-retry"] == "false"
        assert refused.headers["x-session-id"] == "rep-2"
        await stack.llm.wait_for_requests(1, within=DEADLINE)
        for http in (on_a, on_b):
            assert (await http.get("/v1/sessions/rep-2")).json()["busy"] is True
        gate.open()
        winner = await next(t for t in both if t is not first)
        assert winner.status_code == 200
        assert winner.json()["choices"][0]["message"]["content"] == "I went first."
        assert len(stack.llm.requests) == 1, "only the winner reached the model"
        for http in (on_a, on_b):
            assert (await http.get("/v1/sessions/rep-2")).json()["busy"] is False
        stack.llm.script(Text("Now me."))
        again = await post_turn(on_b, "rep-2", "and now?")
        assert again.status_code == 200, "the lock was released at the end of the turn"


async def test_clear_cache_on_a_is_seen_by_b(stack: Stack, replica_b: ServerThread) -> None:
    stack.llm.script(Text("one"), Text("two"), Text("three"))
    await turn(stack.url, "rep-3", "a")
    await turn(replica_b.url, "rep-4", "b")
    async with (
        httpx.AsyncClient(base_url=stack.url) as on_a,
        httpx.AsyncClient(base_url=replica_b.url) as on_b,
    ):
        names = {
            "a": (await on_a.get("/admin/cache-stats")).json()["replica"],
            "b": (await on_b.get("/admin/cache-stats")).json()["replica"],
        }
        assert names["a"] != names["b"]

        async def both_cached() -> dict[str, Any] | None:
            stats = (await on_a.get("/admin/cache-stats")).json()
            members = {m["replica"]: m for m in stats["replicas"]}
            cached = all(members.get(n, {}).get("cached") for n in names.values())
            return members if cached else None

        members = await wait_until_async(
            both_cached, "A lists both replicas with a cached prompt", DEADLINE
        )
        assert stats_of(members, names["a"]) == stats_of(members, names["b"]), (
            "both serve the same prompt"
        )
        cleared = (await on_a.post("/admin/clear-cache")).json()
        assert cleared["cleared"] is True
        assert cleared["cached"] is False

        async def b_dropped() -> bool:
            return (await on_b.get("/admin/cache-stats")).json()["cached"] is False

        await wait_until_async(b_dropped, "B dropped its prompt", DEADLINE)
        misses = (await on_b.get("/admin/cache-stats")).json()["misses"]
        await turn(replica_b.url, "rep-4", "c")
        after = (await on_b.get("/admin/cache-stats")).json()
        assert after["misses"] == misses + 1, "B fetched the prompt again"

        async def a_sees_b_again() -> bool:
            stats = (await on_a.get("/admin/cache-stats")).json()
            members = {m["replica"]: m for m in stats["replicas"]}
            return bool(members.get(names["b"], {}).get("cached"))

        await wait_until_async(a_sees_b_again, "A lists B's prompt as cached again", DEADLINE)


def stats_of(members: dict[str, Any], name: str) -> tuple[str, str]:
    return members[name]["prompt_hash"], members[name]["source"]


async def test_kill_9_of_a_mid_turn_frees_the_session_for_b(stack: Stack, agent_process) -> None:
    assert stack.agent_settings.postgres_url is not None
    replica_a = await agent_process(AGENT_DATABASE_URL=stack.agent_settings.postgres_url)
    gate = Gate()
    stack.llm.script(Hold(gate, Text("A never says this.")), Text("B answers."))
    async with (
        httpx.AsyncClient(base_url=replica_a.url) as on_a,
        httpx.AsyncClient(base_url=stack.url) as on_b,
    ):
        held = asyncio.create_task(post_turn(on_a, "rep-5", "first question"))
        await stack.llm.wait_for_requests(1, within=DEADLINE)  # A holds the lock in its turn
        refused = await post_turn(on_b, "rep-5", "second question")
        assert refused.status_code == 409, "B sees A's lock"
        replica_a.process.kill()
        assert await replica_a.wait_exit() == -signal.SIGKILL
        with pytest.raises(httpx.TransportError):
            await held
        gate.open()

        async def b_gets_the_session() -> httpx.Response | None:
            response = await post_turn(on_b, "rep-5", "second question")
            return None if response.status_code == 409 else response

        answer = await wait_until_async(
            b_gets_the_session, "the dead replica's lock went with it", DEADLINE
        )
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["message"]["content"] == "B answers."
    sent = stack.llm.requests[-1]["messages"]
    assert [m["content"] for m in sent if m["role"] == "user"] == [
        "first question",
        "second question",
    ], "B's turn carries what A stored before it died"


async def test_history_kept_in_memory_is_never_stale(stack: Stack, replica_b: ServerThread) -> None:
    """A keeps turn 1's history; B deletes the session and makes a new turn 1 under its id."""
    stack.llm.script(Text("first answer"))
    await turn(stack.url, "rep-6", "first question")
    async with httpx.AsyncClient(base_url=replica_b.url) as on_b:
        assert (await on_b.delete("/v1/sessions/rep-6")).status_code == 200
    stack.llm.script(Text("other answer"), Text("ok"))
    await turn(replica_b.url, "rep-6", "other question")
    await turn(stack.url, "rep-6", "next question")
    sent = [m["content"] for m in stack.llm.requests[-1]["messages"] if m["role"] != "system"]
    assert sent == ["other question", "other answer", "next question"], (
        "A read the session again: the version it kept was no longer the session's"
    )


async def test_a_replica_at_its_turn_limit_says_so_at_once(start_stack) -> None:
    stack: Stack = start_stack(database_max_turns=1)
    gate = Gate()
    stack.llm.script(Hold(gate, Text("done")), Text("after"))
    async with httpx.AsyncClient(base_url=stack.url) as http:
        running = asyncio.create_task(post_turn(http, "rep-7", "long"))
        await stack.llm.wait_for_requests(1, within=DEADLINE)
        refused = await post_turn(http, "rep-8", "another session")
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "too_many_turns"
        assert refused.headers["x-should-retry"] == "false"
        gate.open()
        assert (await running).status_code == 200
        assert (await post_turn(http, "rep-8", "another session")).status_code == 200


async def test_connections_the_server_cuts_are_replaced(
    stack: Stack, replica_b: ServerThread
) -> None:
    """Every backend of the database is terminated: the replicas reconnect by themselves."""
    url = stack.agent_settings.postgres_url
    assert url is not None

    def listeners() -> int:
        with psycopg.connect(url, autocommit=True) as db:
            row = db.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND query LIKE 'LISTEN %'",  # its last statement, a LISTEN
            ).fetchone()
        return int(row[0]) if row else 0

    stack.llm.script(Text("zero"))
    await turn(stack.url, "rep-9", "before")  # pooled connections of every kind exist
    assert listeners() == 2
    with psycopg.connect(url, autocommit=True) as db:
        db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )

    async def both_listen() -> bool:
        return await asyncio.to_thread(listeners) == 2

    await wait_until_async(both_listen, "both replicas listen again", DEADLINE)
    stack.llm.script(Text("one"), Text("two"))
    await turn(stack.url, "rep-9", "on A")
    await turn(replica_b.url, "rep-9", "on B")
    async with (
        httpx.AsyncClient(base_url=stack.url) as on_a,
        httpx.AsyncClient(base_url=replica_b.url) as on_b,
    ):
        assert (await on_b.get("/admin/cache-stats")).json()["cached"] is True
        await on_a.post("/admin/clear-cache")

        async def b_dropped() -> bool:
            return (await on_b.get("/admin/cache-stats")).json()["cached"] is False

        await wait_until_async(b_dropped, "B, listening again, dropped its prompt", DEADLINE)


async def test_stop_through_b_stops_the_turn_running_on_a(
    stack: Stack, replica_b: ServerThread
) -> None:
    # A load balancer sends the page's Stop to whichever replica it likes.
    stack.llm.script(ToolCall("execute_code", {"code": LONG_CELL}))  # and no answer after it
    client = stack.new_async_client(max_retries=0)
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "sleep a long time"}],
        stream=True,
        extra_headers={"X-Session-Id": "stop-ab"},
    )
    content = await read_until(stream, "sleeping now")
    async with httpx.AsyncClient(base_url=replica_b.url, timeout=60) as http:
        stopped = await http.post("/v1/sessions/stop-ab/interrupt")
    assert stopped.json()["interrupted"] is True, "B reaches the turn A runs"
    content = await read_all(stream, content)
    assert "KeyboardInterrupt" in content
    assert "Stopped: you stopped this turn." in content
    assert len(stack.llm.requests) == 1, "the model was not asked to go on"
    stack.llm.script(ToolCall("execute_code", {"code": "print(x + 1)"}), Text("Still here."))
    assert "42" in await turn(replica_b.url, "stop-ab", "is x still there?")


async def test_an_upload_through_b_during_a_turn_on_a_reaches_the_next_turn(
    stack: Stack, replica_b: ServerThread
) -> None:
    gate = Gate()
    stack.llm.script(Hold(gate, Text("First.")), Text("Second."))
    first = asyncio.create_task(turn(stack.url, "rep-up", "wait"))
    await stack.llm.wait_for_requests(1)
    async with httpx.AsyncClient(base_url=replica_b.url, timeout=60) as http:
        uploaded = await http.post(
            "/v1/sessions/rep-up/files", files=[("files", ("late.csv", b"a\n1\n"))]
        )
        assert uploaded.status_code == 201, uploaded.text
    gate.open()
    assert "First." in await first
    await turn(stack.url, "rep-up", "anything new?")  # A again, with its kept history
    told = [m["content"] for m in stack.llm.requests[1]["messages"] if m["role"] == "user"]
    assert any("late.csv" in text for text in told), told


async def test_a_turn_stuck_on_a_locked_session_row_answers_503_not_never(start_stack) -> None:
    # Another replica's transaction hangs while it holds the session's row. The store's
    # calls run on the event loop: they give up after AGENT_DATABASE_STATEMENT_TIMEOUT.
    stack: Stack = start_stack(database_statement_timeout=1.0)
    stack.llm.script(Text("First."), Text("Second."))
    assert await turn(stack.url, "locked-1", "hello") == "First."
    url = stack.agent_settings.postgres_url
    assert url is not None
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
        with psycopg.connect(url) as holder:
            holder.execute("SELECT id FROM sessions WHERE id = 'locked-1' FOR UPDATE")
            stuck = await post_turn(http, "locked-1", "again")
            assert stuck.status_code == 503, stuck.text
            error = stuck.json()["error"]
            assert error["code"] == "database_unavailable"
            assert "did not answer within 1 s" in error["message"]
            assert (await http.get("/health")).status_code == 200, "the replica still answers"
        answered = await post_turn(http, "locked-1", "once more")
        assert answered.status_code == 200, answered.text
        assert answered.json()["choices"][0]["message"]["content"] == "Second."
