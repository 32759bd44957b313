"""Benchmark agent_service (the OpenAI-compatible chat API) against its two floors, in one run.

One session, turn after turn; each turn is a user message -> the model asks for
`execute_code("x + 1")` -> the tool result goes back -> the model answers text. The model is
the tests' `ScriptedLLM` (kernel_agent_pytest.scripted_llm), answering at once. Per turn:

1. turn time: the official `openai.AsyncOpenAI` client, streaming, from sending the request
   to the end of the stream (`data: [DONE]`);
2. LLM time: (a) what the fake spends answering the turn's two requests (from the request
   reaching its ASGI app to its last byte sent) and (b) the *LLM call floor*: the same two
   request bodies replayed right after the turn with `litellm.acompletion(stream=True)`,
   straight at the fake, consumed to the end;
3. MCP execute floor: `call_tool_mcp("execute_code", {"code": "x + 1"})` with the turn's
   `X-Session-Id` on an already open fastmcp `Client` against the same kernel_mcp;
4. service overhead = turn - (LLM call floor + MCP execute floor), and for reference
   turn - (fake answer time + MCP execute floor), which also counts litellm's client;
5. first token: from the fake sending the first content delta of its text answer to the
   client receiving that delta (both `time.perf_counter`, one process);
6. `PromptCache.get()` on the warm cache of the running service;
7. where the turn goes as the service sees it (`seen_by_service`): timers wrapped, in this
   process, around its model stream, MCP connect / list_tools / call / close and its
   notebook export.

Everything runs in this process: kernel_mcp and agent_service are uvicorn servers on one
asyncio event loop, together with the openai client and the floor clients; the fake LLM
serves from its own thread (uvicorn, its own loop). Kernels are separate processes.

Run: ``.venv/bin/python bench/agent_turn.py`` (``--profile`` adds a cProfile of the
measured turns on stderr). Prints one JSON line on stdout; progress goes to stderr. Takes
about 12 s, uses a temporary `/tmp/ka-*` folder, stops both servers and every kernel.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The test suite's fake LLM and server runner live in `tests/`, at the repository root.
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import pstats  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from collections.abc import AsyncIterator, Awaitable, Callable  # noqa: E402
from typing import Any  # noqa: E402

import fastmcp  # noqa: E402
import openai  # noqa: E402
import psutil  # noqa: E402
from fastmcp import Client  # noqa: E402
from fastmcp.client.transports import StreamableHttpTransport  # noqa: E402
from starlette.types import ASGIApp, Message, Receive, Scope, Send  # noqa: E402

from agent_service.agent import Agent  # noqa: E402
from agent_service.app import create_app  # noqa: E402
from agent_service.config import Settings as AgentSettings  # noqa: E402
from agent_service.kernel_client import KernelClient, KernelSession  # noqa: E402
from agent_service.llm import ModelAdapter, load_litellm  # noqa: E402
from kernel_agent_pytest.scripted_llm import ScriptedLLM, Text, ToolCall  # noqa: E402
from kernel_mcp.config import Settings as KernelSettings  # noqa: E402
from kernel_mcp.server import create_server  # noqa: E402
from tests.agent_service.conftest import RunningServer  # noqa: E402

logger = logging.getLogger("bench.agent_service")

SESSION = "bench-1"
MODEL = "kernel-agent"
CODE = "x + 1"
ANSWER = "Answer: x + 1 is 2."  # the fake streams it in 4-character deltas
ANSWER_HEAD = ANSWER[:4]  # how the client recognises the model's first text delta
N_TURNS = 50
N_WARMUP = 5
N_PROMPT_GETS = 5000
TARGET_OVERHEAD_MS = 15.0
TARGET_FIRST_TOKEN_MS = 5.0
TARGET_PROMPT_GET_MS = 1.0
RUN_DEADLINE = 100.0  # the whole run, so it ends (and cleans up) inside two minutes
STOP_TIMEOUT = 10.0
# A content-only delta as the fake serializes it (`json.dumps` defaults); its first delta
# `{"role": "assistant", "content": ""}` and tool-call deltas do not match.
_CONTENT_DELTA = b'"delta": {"content": "'


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _p(samples: list[float], q: int) -> float:
    """The q-th percentile (inclusive method) of samples."""
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1]


# -- instrumentation -----------------------------------------------------------


class TimedLLM(ScriptedLLM):
    """The tests' scripted LLM, timestamping every answer in its own thread.

    `answers` gets (request reached the app, last byte about to be sent) per request, and
    `first_content` the moment the first content delta of a text answer is about to be sent.
    Both are appended before the bytes leave, so they are there once the client has them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.answers: list[tuple[float, float]] = []
        self.first_content: list[float] = []

    def _app(self) -> Any:
        app: ASGIApp = super()._app()

        async def timed(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            started = time.perf_counter()
            content_seen = False

            async def timed_send(message: Message) -> None:
                nonlocal content_seen
                if message["type"] == "http.response.body":
                    if not content_seen and _CONTENT_DELTA in message.get("body", b""):
                        content_seen = True
                        self.first_content.append(time.perf_counter())
                    if not message.get("more_body", False):
                        self.answers.append((started, time.perf_counter()))
                await send(message)

            await app(scope, receive, timed_send)

        return timed


class Spans:
    """Seconds spent in agent_service's calls to its dependencies, as it sees them."""

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)

    def add(self, name: str, seconds: float) -> None:
        self.current[name] += seconds

    def take(self) -> dict[str, float]:
        spans, self.current = dict(self.current), defaultdict(float)
        return spans


def instrument(spans: Spans) -> None:
    """Wrap the service's model stream, MCP calls and notebook export with timers (~1 us each)."""
    stream = ModelAdapter.stream
    session = KernelClient.session
    openai_tools = KernelSession.openai_tools
    call = KernelSession.call

    async def timed_stream(self: ModelAdapter, *args: Any) -> AsyncIterator[Any]:
        started = time.perf_counter()
        async for item in stream(self, *args):
            yield item
        spans.add("llm_seen", time.perf_counter() - started)

    @contextlib.asynccontextmanager
    async def timed_session(self: KernelClient, session_id: str) -> AsyncIterator[Any]:
        started = time.perf_counter()
        async with session(self, session_id) as opened:
            spans.add("mcp_open", time.perf_counter() - started)
            yield opened
            closing = time.perf_counter()
        spans.add("mcp_close", time.perf_counter() - closing)

    async def timed_tools(self: KernelSession) -> list[dict[str, Any]]:
        started = time.perf_counter()
        try:
            return await openai_tools(self)
        finally:
            spans.add("mcp_list_tools", time.perf_counter() - started)

    async def timed_call(self: KernelSession, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await call(self, *args, **kwargs)
        finally:
            spans.add("mcp_call_seen", time.perf_counter() - started)

    export = getattr(Agent, "export_notebook", None)
    if export is not None:  # the transcript notebook, written at the end of every turn

        def timed_export(self: Agent, *args: Any) -> Any:
            started = time.perf_counter()
            try:
                return export(self, *args)
            finally:
                spans.add("notebook_export", time.perf_counter() - started)

        Agent.export_notebook = timed_export  # type: ignore[method-assign]
    ModelAdapter.stream = timed_stream  # type: ignore[method-assign]
    KernelClient.session = timed_session  # type: ignore[method-assign]
    KernelSession.openai_tools = timed_tools  # type: ignore[method-assign]
    KernelSession.call = timed_call  # type: ignore[method-assign]


# -- one turn and its floors ---------------------------------------------------


async def turn(
    client: openai.AsyncOpenAI, llm: TimedLLM, busy: Callable[[str], bool], text: str
) -> dict[str, float]:
    """One chat turn through the service; its times in seconds.

    The service ends a turn's task (closing its MCP connection) after the client has
    `[DONE]`, and refuses the session's next request (409) until then: wait for that here,
    outside the turn time, and report it as `tail`.
    """
    llm.script(ToolCall("execute_code", {"code": CODE}), Text(ANSWER))
    answers, firsts = len(llm.answers), len(llm.first_content)
    parts: list[str] = []
    first: float | None = None
    started = time.perf_counter()
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": text}],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"X-Session-Id": SESSION},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            content = chunk.choices[0].delta.content
            if first is None and content.startswith(ANSWER_HEAD):
                first = time.perf_counter()
            parts.append(content)
    ended = time.perf_counter()
    while busy(SESSION):
        await asyncio.sleep(0.0002)
    tail = time.perf_counter() - ended
    reply = "".join(parts)
    if llm.remaining or not reply.endswith(ANSWER) or first is None:
        raise RuntimeError(f"unexpected turn: {llm.remaining} steps left, content {reply!r}")
    new_answers = llm.answers[answers:]
    new_firsts = llm.first_content[firsts:]
    if len(new_answers) != 2 or len(new_firsts) != 1:
        raise RuntimeError(f"the fake saw {len(new_answers)} requests, {len(new_firsts)} texts")
    return {
        "turn": ended - started,
        "llm_fake": sum(end - start for start, end in new_answers),
        "first_token": first - new_firsts[0],
        "tail": tail,
    }


async def llm_call_floor(litellm: Any, llm: TimedLLM, settings: AgentSettings) -> float:
    """The turn's two request bodies again, straight through litellm; seconds for both."""
    bodies = llm.requests[-2:]
    tool_message = bodies[1]["messages"][-1]
    if tool_message["role"] != "tool" or tool_message["content"] != "2":
        raise RuntimeError(f"unexpected tool result sent to the model: {tool_message}")
    llm.script(ToolCall("execute_code", {"code": CODE}), Text(ANSWER))
    total = 0.0
    for body in bodies:
        kwargs: dict[str, Any] = {
            "model": settings.model,
            "messages": body["messages"],
            "tools": body["tools"],
            "stream": True,
            "stream_options": {"include_usage": True},
            "timeout": settings.llm_timeout,
            "num_retries": settings.llm_retries,
            "api_base": settings.api_base,
        }
        started = time.perf_counter()
        response = await litellm.acompletion(**kwargs)
        async for _chunk in response:
            pass
        total += time.perf_counter() - started
    return total


async def _no_progress(_progress: float, _total: float | None, _message: str | None) -> None:
    return None


async def mcp_execute_floor(client: Client) -> float:
    """`execute_code("x + 1")` on an open MCP connection, as the service calls it."""
    started = time.perf_counter()
    result = await client.call_tool_mcp(
        "execute_code", {"code": CODE}, progress_handler=_no_progress, timeout=30
    )
    elapsed = time.perf_counter() - started
    if result.is_error or result.content[0].text != "2":
        raise RuntimeError(f"floor execute failed: {result.content}")
    return elapsed


async def prompt_gets(get: Callable[[], Awaitable[str]]) -> list[float]:
    """Seconds per `await get()`, on a warm cache."""
    times = []
    for _ in range(N_PROMPT_GETS):
        started = time.perf_counter()
        await get()
        times.append(time.perf_counter() - started)
    return times


# -- the run -------------------------------------------------------------------


def _profile_report(profile: cProfile.Profile) -> None:
    for order in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats(order).print_stats(40)
        sys.stderr.write(f"\n-- cProfile of the measured turns, by {order} --\n{out.getvalue()}")


async def measure(
    stack: dict[str, Any], settings: AgentSettings, spans: Spans, profile: bool
) -> dict[str, Any]:
    llm: TimedLLM = stack["llm"]
    busy = stack["agent_app"].state.services.turns.busy
    litellm = await asyncio.to_thread(load_litellm)
    client = openai.AsyncOpenAI(base_url=f"{stack['agent'].url}/v1", api_key="unused")
    transport = StreamableHttpTransport(settings.mcp_url, headers={"X-Session-Id": SESSION})
    samples: dict[str, list[float]] = defaultdict(list)
    async with client, Client(transport, timeout=30) as mcp:
        llm.script(ToolCall("execute_code", {"code": "x = 1"}), Text(ANSWER))
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Set x to 1."}],
            stream=True,
            extra_headers={"X-Session-Id": SESSION},
        )
        async for _chunk in stream:
            pass
        while busy(SESSION):
            await asyncio.sleep(0.001)
        for i in range(N_WARMUP):
            await turn(client, llm, busy, f"What is x + 1? ({i})")
            await llm_call_floor(litellm, llm, settings)
            await mcp_execute_floor(mcp)
        spans.take()
        profiler = cProfile.Profile() if profile else None
        for i in range(N_TURNS):
            if profiler is not None:
                profiler.enable()
            times = await turn(client, llm, busy, f"And now, what is x + 1? ({i})")
            if profiler is not None:
                profiler.disable()
            seen = spans.take()
            times["llm_floor"] = await llm_call_floor(litellm, llm, settings)
            times["mcp_floor"] = await mcp_execute_floor(mcp)
            times["overhead"] = times["turn"] - times["llm_floor"] - times["mcp_floor"]
            times["overhead_incl_litellm"] = times["turn"] - times["llm_fake"] - times["mcp_floor"]
            for key, value in {**times, **seen}.items():
                samples[key].append(value)
        if profiler is not None:
            _profile_report(profiler)
    prompts = stack["agent_app"].state.services.prompts
    await prompts.get()
    gets = await prompt_gets(prompts.get)
    if prompts.stats()["misses"] != 1 or prompts.stats()["source"] != "kernel_mcp":
        raise RuntimeError(f"the prompt cache was not warm: {prompts.stats()}")

    def p50(key: str) -> float:
        return _ms(statistics.median(samples[key]))

    def p90(key: str) -> float:
        return _ms(_p(samples[key], 90))

    logger.info(
        "turn p50 %.1f ms = LLM floor %.1f + MCP floor %.1f + overhead %.1f",
        p50("turn"),
        p50("llm_floor"),
        p50("mcp_floor"),
        p50("overhead"),
    )
    overhead, first_token = p50("overhead"), p50("first_token")
    prompt_get_us = round(statistics.median(gets) * 1e6, 2)
    return {
        "turns": N_TURNS,
        "turn_p50_ms": p50("turn"),
        "turn_p90_ms": p90("turn"),
        "llm_fake_p50_ms": p50("llm_fake"),
        "llm_call_floor_p50_ms": p50("llm_floor"),
        "mcp_execute_floor_p50_ms": p50("mcp_floor"),
        "overhead_p50_ms": overhead,
        "overhead_p90_ms": p90("overhead"),
        "overhead_incl_litellm_p50_ms": p50("overhead_incl_litellm"),
        "overhead_incl_litellm_p90_ms": p90("overhead_incl_litellm"),
        "first_token_p50_ms": first_token,
        "first_token_p90_ms": p90("first_token"),
        "tail_after_done_p50_ms": p50("tail"),
        "prompt_get_p50_us": prompt_get_us,
        "prompt_get_p99_us": round(_p(gets, 99) * 1e6, 2),
        "seen_by_service_p50_ms": {
            key: p50(key)
            for key in (
                "llm_seen",
                "mcp_open",
                "mcp_list_tools",
                "mcp_call_seen",
                "mcp_close",
                "notebook_export",
            )
            if key in samples
        },
        "targets_met": {
            f"overhead_p50<={TARGET_OVERHEAD_MS:g}ms": overhead <= TARGET_OVERHEAD_MS,
            f"first_token_p50<={TARGET_FIRST_TOKEN_MS:g}ms": first_token <= TARGET_FIRST_TOKEN_MS,
            f"prompt_get_p50<={TARGET_PROMPT_GET_MS:g}ms": prompt_get_us / 1000
            <= TARGET_PROMPT_GET_MS,
        },
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "openai": openai.__version__,
        "litellm": _version("litellm"),
        "fastmcp": fastmcp.__version__,
    }


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


async def run(root: Path, profile: bool) -> dict[str, Any]:
    """Start the stack as the tests' `start_stack` does, measure, stop everything."""
    spans = Spans()
    instrument(spans)
    stack: dict[str, Any] = {}
    try:
        llm = TimedLLM()
        await llm.__aenter__()
        stack["llm"] = llm
        kernel_settings = KernelSettings(
            workspace=root / "ws", runtime_dir=root / "rt", pool_size=1, interrupt_grace=1.0
        )
        kernel_app = create_server(kernel_settings).http_app(
            path="/mcp", host_origin_protection=True
        )
        stack["kernel_mcp"] = await RunningServer(kernel_app).start()
        settings = AgentSettings(
            mcp_url=f"{stack['kernel_mcp'].url}/mcp",
            model="hosted_vllm/fake",
            api_base=llm.base_url,
            data_dir=root / "data",
            notebooks_dir=root / "notebooks",
            llm_retries=2,
            llm_timeout=10,
        )
        stack["agent_app"] = create_app(settings)
        stack["agent"] = await RunningServer(stack["agent_app"]).start()
        async with asyncio.timeout(RUN_DEADLINE):
            return await measure(stack, settings, spans, profile)
    finally:
        for name in ("agent", "kernel_mcp"):
            if name in stack:
                try:
                    async with asyncio.timeout(STOP_TIMEOUT):
                        await stack[name].stop()
                except Exception:
                    logger.exception("%s did not stop cleanly", name)
        if "llm" in stack:
            await stack["llm"].__aexit__(None, None, None)


def _reap_children() -> int:
    """Kill any process this one started that is still running (kernels); how many."""
    children = [
        p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE
    ]
    for child in children:
        logger.error("left running: pid %d %s; killing it", child.pid, child.name())
        with contextlib.suppress(psutil.Error):
            child.kill()
    return len(children)


async def main(profile: bool) -> None:
    root = Path(tempfile.mkdtemp(prefix="ka-"))
    try:
        figures = await run(root, profile)
    finally:
        left = _reap_children()
        shutil.rmtree(root, ignore_errors=True)
    figures["left_running"] = left
    sys.stdout.write(json.dumps(figures) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", action="store_true", help="cProfile the measured turns")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    logger.setLevel(logging.INFO)
    asyncio.run(main(args.profile))
