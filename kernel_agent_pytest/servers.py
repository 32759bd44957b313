"""kernel_mcp and agent_service on 127.0.0.1 for tests, each served by uvicorn in a thread.

Each server runs on an event loop of its own in a daemon thread of the test process (see
docs/decisions.md for why threads, not subprocesses): it starts in well under a second
once imported, works for sync and async tests of any loop scope, and its kernels are
children of the test process, which the plugin's leak check and last-resort sweep see.
Stopping a server runs its lifespan shutdown, which shuts its kernels down.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import logging
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn

from .scripted_llm import ScriptedLLM

if TYPE_CHECKING:
    import openai
    from fastmcp import Client

    from agent_service.config import Settings as AgentSettings
    from kernel_mcp.config import Settings as KernelSettings

    from .kernels import LoopThread

logger = logging.getLogger(__name__)

_START_TIMEOUT = 120.0  # a deadline on a loaded machine, not a speed claim
_STOP_MARGIN = 60.0

# The agent's defaults under test: one scripted step per model request (no silent retries
# consuming the script), a read deadline a stalled test notices, no web page to build.
AGENT_TEST_DEFAULTS: dict[str, Any] = {
    "model": "hosted_vllm/fake",
    "llm_retries": 0,
    "llm_timeout": 30.0,
    "ui": False,
}


def _listen(port: int) -> socket.socket:
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart reuses its port
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    return sock


class ServerThread:
    """An ASGI app served by uvicorn on 127.0.0.1, on its own event loop in a thread."""

    def __init__(
        self,
        app: Any,
        name: str,
        graceful: float = 3.0,
        stop_within: float = 60.0,
        report_after: float = 15.0,
    ):
        """`report_after` seconds past the graceful period, a slow stop logs its tasks."""
        self.app = app
        self.name = name
        self.port = 0
        self._graceful = graceful
        self._stop_within = stop_within
        self._report_after = report_after
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, port: int = 0) -> ServerThread:
        """Serve on `port` (0: a free one); returns once the app's startup is done."""
        sock = _listen(port)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            lifespan="on",
            log_config=None,  # no global logging changes in the test process
            access_log=False,
            timeout_graceful_shutdown=int(self._graceful),
        )
        server = uvicorn.Server(config)
        self._server = server
        self._error = None
        self._thread = threading.Thread(
            target=self._serve, args=(server, sock), name=f"{self.name}-{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT
        while not server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"{self.name} failed to start: {self._error!r} (see its log)")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not start in {_START_TIMEOUT:.0f} s")
            self._thread.join(0.01)
        return self

    def _serve(self, server: uvicorn.Server, sock: socket.socket) -> None:
        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            await server.serve(sockets=[sock])

        try:
            asyncio.run(serve())
        except BaseException as exc:
            self._error = exc
            logger.exception("%s stopped with an error", self.name)
        finally:
            sock.close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Shut down (the app's lifespan shutdown included); force it past the deadline."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        deadline = time.monotonic() + self._stop_within
        thread.join(min(self._stop_within, self._graceful + self._report_after))
        if thread.is_alive():
            self._report_pending(thread, deadline)
            thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            logger.warning("%s did not stop in %.0f s: forcing it", self.name, self._stop_within)
            server.force_exit = True
            thread.join(_STOP_MARGIN)
        self._server = self._thread = None
        if thread.is_alive():
            raise RuntimeError(f"{self.name} did not stop")

    def _report_pending(self, thread: threading.Thread, deadline: float) -> None:
        """Log what a slow shutdown waits for: every task of the server's loop, with stacks
        (or, if the loop is blocked and cannot answer, the thread's own stack)."""

        async def stacks() -> str:
            out = io.StringIO()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.print_stack(limit=12, file=out)
            return out.getvalue()

        waited = self._stop_within - (deadline - time.monotonic())
        loop = self._loop
        if loop is None:
            return
        asked = asyncio.run_coroutine_threadsafe(stacks(), loop)
        try:
            pending = asked.result(max(0.1, min(10.0, deadline - time.monotonic())))
        except Exception:  # a blocked loop cannot answer: where the thread is tells why
            asked.cancel()
            frame = sys._current_frames().get(thread.ident or 0)
            where = "".join(traceback.format_stack(frame)) if frame is not None else "(gone)"
            pending = f"(its loop did not answer; the thread is at)\n{where}"
        logger.warning("%s still stopping after %.1f s; its tasks:\n%s", self.name, waited, pending)


def _kernel_mcp_app(settings: KernelSettings) -> Any:
    from kernel_mcp.server import create_server

    return create_server(settings).http_app(
        path="/mcp",
        host_origin_protection=True,
        allowed_hosts=settings.allowed_hosts or None,
        allowed_origins=settings.allowed_origins or None,
    )


class KernelMcpServer:
    """kernel_mcp over streamable HTTP on a free loopback port.

    Attributes:
        url: the MCP endpoint, "http://127.0.0.1:PORT/mcp".
        base_url: "http://127.0.0.1:PORT" (`/health`, `/skills`).
        settings: the kernel_mcp settings it runs with.
    """

    def __init__(self, settings: KernelSettings, loop: LoopThread | None = None) -> None:
        self.settings = settings
        self._loop = loop
        self._thread: ServerThread | None = None
        self._port = 0
        self._handed_out: list[str] = []

    def start(self) -> KernelMcpServer:
        stop_within = self.settings.shutdown_timeout + self.settings.startup_timeout + _STOP_MARGIN
        thread = ServerThread(_kernel_mcp_app(self.settings), "kernel_mcp", 3, stop_within)
        self._thread = thread.start(self._port)
        self._port = thread.port
        return self

    def stop(self) -> None:
        """Stop the server and every kernel it runs."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.stop()

    def restart(self) -> None:
        """Stop the server (its kernels with it) and start a new one on the same port."""
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.running

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def url(self) -> str:
        return f"{self.base_url}/mcp"

    def client(self, session_id: str | None = None, **kwargs: Any) -> Client[Any]:
        """A fastmcp client for one session; use it as `async with server.client() as c:`.

        It sends `X-Session-Id: session_id` (default: a new id per client, so each client
        has a kernel of its own) and the server's token if it has one. Keyword arguments go
        to `fastmcp.Client`. Kernels of sessions made this way are shut down after the test.
        """
        from fastmcp import Client
        from fastmcp.client.transports import StreamableHttpTransport

        session_id = session_id or f"test-{uuid.uuid4().hex[:12]}"
        self._handed_out.append(session_id)
        headers = {"X-Session-Id": session_id}
        token = self.settings.token.get_secret_value() if self.settings.token else None
        transport = StreamableHttpTransport(self.url, headers=headers, auth=token)
        return Client(transport, **kwargs)

    def end_test(self) -> None:
        """Shut down the kernels of sessions handed out by `client()` since the last call."""
        sessions, self._handed_out = self._handed_out, []
        if not sessions or not self.running or self._loop is None:
            return
        try:
            self._loop.run(self._close_sessions(sessions), _STOP_MARGIN)
        except Exception:
            logger.warning("kernel_mcp sessions %s were not shut down", sessions, exc_info=True)

    async def _close_sessions(self, sessions: list[str]) -> None:
        from fastmcp import Client
        from fastmcp.client.transports import StreamableHttpTransport

        token = self.settings.token.get_secret_value() if self.settings.token else None
        for session_id in sessions:
            transport = StreamableHttpTransport(
                self.url, headers={"X-Session-Id": session_id}, auth=token
            )
            async with Client(transport) as client:
                await client.call_tool("shutdown_kernel", {"delete_files": True})


class AgentStack:
    """The whole stack for tests: kernel_mcp, agent_service and a scripted LLM.

    Attributes:
        llm: the scripted model (`llm.script(...)`, `llm.requests`).
        kernel_mcp: the stack's own kernel_mcp server.
        agent_settings: the agent_service settings it runs with.
        root: the folder of its data, notebooks, kernel workspace and runtime files.
    """

    def __init__(
        self,
        root: Path,
        kernel_settings: KernelSettings,
        agent_values: Mapping[str, Any],
        llm: ScriptedLLM | None = None,
    ) -> None:
        self.root = root
        self.llm = llm or ScriptedLLM()
        self.kernel_mcp = KernelMcpServer(kernel_settings)
        self._agent_values = dict(agent_values)
        self.agent_settings: AgentSettings | None = None  # set by start()
        self._agent: ServerThread | None = None
        self._replicas: list[ServerThread] = []
        self._clients: list[Any] = []

    def start(self) -> AgentStack:
        # Imported whole here, before agent_service's warm-up imports litellm in a thread of
        # its own: openai reads sys.modules["httpx"] directly, and a test building a client
        # meanwhile would find it half-imported.
        import httpx  # noqa: F401
        import openai  # noqa: F401

        try:
            self.llm.start()
            self.kernel_mcp.start()
            self.agent_settings = self._settings(self._agent_values)
            self._start_agent()
        except BaseException:
            self.stop()
            raise
        return self

    def _settings(self, values: Mapping[str, Any]) -> AgentSettings:
        from agent_service.config import Settings

        defaults = {
            "mcp_url": self.kernel_mcp.url,
            "api_base": self.llm.base_url,
            "data_dir": self.root / "data",
            "notebooks_dir": self.root / "notebooks",
            **AGENT_TEST_DEFAULTS,
        }
        return Settings(**{**defaults, **values})

    def _start_agent(self, port: int = 0) -> None:
        assert self.agent_settings is not None
        self._agent = self._serve_agent(self.agent_settings, port)

    @staticmethod
    def _serve_agent(settings: AgentSettings, port: int = 0) -> ServerThread:
        from agent_service.app import create_app

        grace = settings.shutdown_grace + 5
        return ServerThread(create_app(settings), "agent_service", grace, grace + 60).start(port)

    @property
    def kernel_settings(self) -> KernelSettings:
        return self.kernel_mcp.settings

    @property
    def url(self) -> str:
        """agent_service's root, "http://127.0.0.1:PORT"."""
        if self._agent is None:
            raise RuntimeError("the agent stack is not running")
        return self._agent.url

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, "http://127.0.0.1:PORT/v1"."""
        return f"{self.url}/v1"

    @functools.cached_property
    def client(self) -> openai.OpenAI:
        """An `openai.OpenAI` client of the agent (no key needed unless `api_keys` is set)."""
        return self.new_client()

    def new_client(self, **kwargs: Any) -> openai.OpenAI:
        """Another `openai.OpenAI` client; keyword arguments go to its constructor."""
        import openai

        kwargs.setdefault("api_key", "unused")
        client = openai.OpenAI(base_url=self.base_url, **kwargs)
        self._clients.append(client)
        return client

    def new_async_client(self, **kwargs: Any) -> openai.AsyncOpenAI:
        """An `openai.AsyncOpenAI` client, for one test's event loop (make one per test)."""
        import openai

        kwargs.setdefault("api_key", "unused")
        return openai.AsyncOpenAI(base_url=self.base_url, **kwargs)

    @property
    def services(self) -> Any:
        """The running agent_service's shared parts (`app.state.services`), for fault tests."""
        if self._agent is None:
            raise RuntimeError("the agent stack is not running")
        return self._agent.app.state.services

    def restart_agent(self, **overrides: Any) -> None:
        """Stop agent_service and start a new one on the same data (settings `overrides`)."""
        assert self.agent_settings is not None
        port = 0
        if self._agent is not None:
            port = self._agent.port
            self._agent.stop()
        self.agent_settings = self.agent_settings.model_copy(update=overrides)
        self._start_agent(port)  # the same port: clients made before keep working

    def start_replica(self, **overrides: Any) -> ServerThread:
        """Another agent_service on this stack's kernel_mcp and model: a replica behind a
        load balancer, stopped with the stack.

        It runs with the stack's agent settings and `overrides`, and data and notebooks
        folders of its own: replicas share transcripts only through the database, so give
        the stack a PostgreSQL `database_url`. Returns its server (`.url`, `.app`).
        """
        assert self.agent_settings is not None
        folder = self.root / f"replica-{len(self._replicas) + 1}"
        values = {"data_dir": folder / "data", "notebooks_dir": folder / "notebooks", **overrides}
        self._replicas.append(self._serve_agent(self.agent_settings.model_copy(update=values)))
        return self._replicas[-1]

    def restart_kernel_mcp(self) -> None:
        """Stop kernel_mcp (its kernels with it) and start a new one on the same port."""
        self.kernel_mcp.restart()

    def stop(self) -> None:
        """Stop everything, the agents first; every part is stopped even if one fails."""
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()
        self._clients.clear()
        errors: list[BaseException] = []
        agents = [a for a in (self._agent, *self._replicas) if a is not None]
        self._agent, self._replicas = None, []
        for stop in (*(a.stop for a in agents), self.kernel_mcp.stop, self.llm.stop):
            try:
                stop()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
