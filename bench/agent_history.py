"""Benchmark what a turn costs as the history grows, and what huge requests cost the others.

1. Per-turn context work against the history length. A session of N stored turns, each a
   user message, a tool call, a plot (a 100 kB PNG) and an answer, in the real SQLite store.
   Timed: what a turn does before calling the model. The first turn after a start reads the
   older turns newest first, small rows only, until the budget (litellm's default 128,000
   tokens) is spent (`read_history`), then fits them (`fit`); every later turn fits the
   history kept from the turn before (`fit` alone). Against: reading the whole transcript
   with its outputs (`events()`), what every turn did before issue 12.
2. Event-loop stalls from big requests. `python -m agent_service` and the tests' fake LLM,
   each in its own process (in one process their CPU work would contend for one GIL), no
   kernel_mcp; a ticker requests `GET /v1/models` every 10 ms and records the slowest
   answer while one client sends a request of 10,000 messages (a new header-less
   conversation: parsed, imported, answered) and one of 45,000 (refused, 413).

Run: ``.venv/bin/python bench/agent_history.py``. Prints one JSON line on stdout.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import asyncio  # noqa: E402
import base64  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import httpx  # noqa: E402

from agent_service.config import Settings  # noqa: E402
from agent_service.context import fit, read_history  # noqa: E402
from agent_service.llm import ModelAdapter  # noqa: E402
from agent_service.sqlite_store import SqliteStore  # noqa: E402
from tests.kernel_mcp.conftest import free_port  # noqa: E402

MODEL = "hosted_vllm/fake"
PNG = base64.b64encode(b"\x89PNG" + bytes(100_000)).decode()


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _fill(store: SqliteStore, sid: str, turns: int) -> None:
    store.create_session(sid, "kernel-agent")
    for turn in range(1, turns + 1):
        call = {"id": f"c{turn}", "name": "execute_code", "arguments": '{"code": "plot()"}'}
        store.append(sid, turn, "user", {"content": f"Plot series {turn}, please."})
        store.append(sid, turn, "assistant", {"content": "", "tool_calls": [call]})
        outputs = [{"output_type": "display_data", "data": {"image/png": PNG}, "metadata": {}}]
        store.append(
            sid,
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
        store.append(sid, turn, "assistant", {"content": f"Here is series {turn}."})


def per_turn_work(root: Path) -> dict[str, Any]:
    adapter = ModelAdapter(Settings(model=MODEL, data_dir=root, notebooks_dir=root))

    def count(messages: list[dict[str, Any]]) -> int:
        return adapter.count_tokens(MODEL, messages)

    budget = adapter.max_input_tokens(MODEL)
    figures: dict[str, Any] = {}
    for turns in (10, 100, 1000):
        store = SqliteStore(root / f"h{turns}.sqlite3")
        _fill(store, "s", turns)
        # The first read counts each event's tokens once and stores them; then every turn
        # reads the stored counts.
        store.set_tokens(read_history(store.newest_events("s", turns + 1), count, budget).counted)
        cold, warm, before = [], [], []
        for _ in range(15):
            started = time.perf_counter()
            history = read_history(store.newest_events("s", turns + 1), count, budget)
            window = fit(history, [], 1000, budget)
            cold.append(time.perf_counter() - started)
            started = time.perf_counter()
            window = fit(history, [], 1000, budget)
            warm.append(time.perf_counter() - started)
            started = time.perf_counter()
            store.events("s")
            before.append(time.perf_counter() - started)
        figures[str(turns)] = {
            "turn_context_ms_p50": _ms(statistics.median(warm)),
            "first_turn_after_start_ms_p50": _ms(statistics.median(cold)),
            "messages_sent": len(window.messages),
            "whole_transcript_read_ms_p50": _ms(statistics.median(before)),
        }
        store.close()
    return figures


_FAKE_LLM = """
import sys, threading
sys.path.insert(0, {repo!r})
from kernel_agent_pytest.scripted_llm import ScriptedLLM, Text
llm = ScriptedLLM(*[Text("answered")] * 20).start()
print(llm.base_url, flush=True)
threading.Event().wait()
"""


def _start_processes(root: Path) -> tuple[subprocess.Popen[str], subprocess.Popen[bytes], int]:
    """The fake LLM and agent_service, each a process of its own; returns the agent's port."""
    fake = subprocess.Popen(
        [sys.executable, "-c", _FAKE_LLM.format(repo=str(REPO))],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert fake.stdout is not None
    base_url = fake.stdout.readline().strip()
    port = free_port()
    env = {
        **os.environ,
        "AGENT_PORT": str(port),
        "AGENT_MCP_URL": f"http://127.0.0.1:{free_port()}/mcp",  # nothing listens: no tools
        "AGENT_MODEL": MODEL,
        "AGENT_API_BASE": base_url,
        "AGENT_DATA_DIR": str(root / "data"),
        "AGENT_NOTEBOOKS_DIR": str(root / "notebooks"),
        "AGENT_UI": "false",
    }
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent_service", "--log-level", "warning"],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    return fake, agent, port


async def stalls(root: Path) -> dict[str, Any]:
    """agent_service and the fake LLM each in a process of their own, as in production."""
    fake, agent, port = await asyncio.to_thread(_start_processes, root)
    url = f"http://127.0.0.1:{port}"
    figures: dict[str, Any] = {}
    try:
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if (await http.get("/health")).json().get("warm", True):  # older: no field
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "agent_service did not start"
                await asyncio.sleep(0.05)
            await http.post(  # one turn through the whole path first
                "/v1/chat/completions",
                json={"model": "kernel-agent", "messages": [{"role": "user", "content": "hi"}]},
            )
            for count in (10_000, 45_000):
                messages = [
                    {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}"}
                    for i in range(count - 1)
                ] + [{"role": "user", "content": "and now?"}]
                figures[str(count)] = await _while_others_wait(url, http, messages)
    finally:
        await asyncio.to_thread(_stop_processes, agent, fake)
    return figures


def _stop_processes(*processes: subprocess.Popen[Any]) -> None:
    for process in processes:
        process.terminate()
        process.wait(30)


async def _while_others_wait(
    url: str, http: httpx.AsyncClient, messages: list[dict[str, str]]
) -> dict[str, Any]:
    """Send one big request while a ticker measures how long small ones wait."""
    slowest = 0.0
    samples = 0
    done = asyncio.Event()

    async def tick() -> None:
        nonlocal slowest, samples
        async with httpx.AsyncClient(base_url=url) as ticker:
            while not done.is_set():
                started = time.perf_counter()
                await ticker.get("/v1/models")
                slowest = max(slowest, time.perf_counter() - started)
                samples += 1
                await asyncio.sleep(0.01)

    task = asyncio.create_task(tick())
    await asyncio.sleep(0.2)
    started = time.perf_counter()
    response = await http.post(
        "/v1/chat/completions", json={"model": "kernel-agent", "messages": messages}
    )
    elapsed = time.perf_counter() - started
    await asyncio.sleep(0.2)
    done.set()
    await task
    return {
        "status": response.status_code,
        "request_ms": _ms(elapsed),
        "slowest_other_request_ms": _ms(slowest),
        "other_requests": samples,
    }


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="ka-bench-") as tmp:
        root = Path(tmp)
        print("per-turn context work ...", file=sys.stderr)
        history = await asyncio.to_thread(per_turn_work, root)
        print("event-loop stalls ...", file=sys.stderr)
        stall = await stalls(root)
    print(
        json.dumps(
            {
                "machine": f"{platform.machine()} {platform.python_version()}",
                "per_turn_by_history_turns": history,
                "big_requests": stall,
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
