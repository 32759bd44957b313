"""The pytest plugin `kernel_agent` (entry point `pytest11`), loaded by `pip install kernel-agent`.

Fixtures: `kernel`, `kernel_factory`, `kernel_mcp_settings`, `kernel_mcp_server`,
`kernel_mcp_server_factory`, `agent`, `agent_factory`, `scripted_llm`. Options:
`--kernel-agent-skills DIR` (or the ini `kernel_agent_skills`) turns skill folders into
tests. Markers `kernel` and `llm`. After every test, kernels it left running are reported
as an error and killed. Nothing heavy is imported until a fixture or skill needs it, so the
plugin costs nothing in test runs that do not use it.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from . import hookspecs
from .processes import KernelProcess, LeakTracker, Snapshot, describe, kernel_processes, kill
from .skills import KERNEL_FOR_SKILL, SkillFile

if TYPE_CHECKING:
    from kernel_mcp.config import Settings
    from kernel_mcp.sessions import SessionManager

    from .kernels import Kernel, KernelFactory, KernelHost
    from .scripted_llm import ScriptedLLM
    from .servers import AgentStack, KernelMcpServer

logger = logging.getLogger(__name__)

PROVIDER_KEYS = ["OPENAI_API_KEY", "ANTHROPIC_API_KEY"]
KERNEL_FIXTURES = frozenset(
    {
        "kernel",
        "kernel_factory",
        "kernel_mcp_server",
        "kernel_mcp_server_factory",
        "agent",
        "agent_factory",
    }
)
# Warnings raised in the test process by the servers the fixtures run (litellm's and
# fastmcp's own deprecations, pydantic on litellm's types): nothing a test can act on.
_SERVER_WARNINGS = (
    "ignore::DeprecationWarning:litellm.*",
    "ignore:.*the `ReadOnly` qualifier:UserWarning",
    "ignore:Accessing the 'model_:DeprecationWarning",
    "ignore:The logging capability is deprecated",
)


class KernelAgentState:
    """Everything the plugin started in one test session, and how to stop it."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self._root: Path | None = None
        self._host: KernelHost | None = None
        self._shared: SessionManager | None = None
        self._skill_managers: dict[Path, SessionManager] = {}
        self.skill_dirs: list[Path] = []
        self.servers: list[KernelMcpServer] = []
        self.stacks: list[AgentStack] = []
        self.module_stacks: list[AgentStack] = []
        self.tracker = LeakTracker(self.owns)
        self.late_reports: list[str] = []
        self._closed = False

    # -- places and settings ----------------------------------------------------------

    @property
    def root(self) -> Path:
        """A short temporary folder for every kernel's workspace and runtime files.

        Short, because a kernel's IPC socket paths must stay under ~100 bytes.
        """
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="ka-"))
        return self._root

    def owns(self, process: KernelProcess) -> bool:
        """A kernel of the plugin's own (its files are under the plugin's folder)."""
        root = self._root
        return root is not None and any(f"{root}/" in arg for arg in process.cmdline)

    def base_settings(self) -> Settings:
        """The kernel layer's settings for the plugin's kernels: production defaults (the
        `KERNEL_MCP_*` environment applies, the sandbox included) with a warm pool of one."""
        from kernel_mcp.config import Settings

        settings = Settings(workspace=self.root / "ws", runtime_dir=self.root / "rt")
        if "pool_size" not in settings.model_fields_set:
            settings = settings.model_copy(update={"pool_size": 1})
        return settings

    def derive(self, base: Settings, name: str, **overrides: Any) -> Settings:
        """`base` with folders of its own under the plugin's folder (and `overrides`)."""
        folder = self.root / f"{name}-{uuid.uuid4().hex[:6]}"
        values = {
            **base.model_dump(),
            "workspace": folder / "ws",
            "runtime_dir": folder / "rt",
            **overrides,
        }
        return type(base)(**values)

    # -- kernels ------------------------------------------------------------------------

    def host(self) -> KernelHost:
        if self._host is None:
            from .kernels import KernelHost

            self._host = KernelHost()
        return self._host

    def shared_manager(self, settings: Settings) -> SessionManager:
        """The kernel layer of `kernel` and `kernel_factory()`, started on first use."""
        if self._shared is None:
            self._shared = self.host().start_manager(self.derive(settings, "kernels"))
        return self._shared

    def skill_kernel(self, skill_md: Path) -> Kernel:
        """A new kernel for the skill at `skill_md`, with its skills folder as `skills_dir`."""
        from .kernels import Kernel

        skill_md = skill_md.resolve()
        folder = max(
            (d for d in self.skill_dirs if d in skill_md.parents),
            key=lambda d: len(d.parts),
            default=skill_md.parent.parent,
        )
        manager = self._skill_managers.get(folder)
        if manager is None:
            settings = self.derive(self.base_settings(), "skills", skills_dir=folder, pool_size=0)
            manager = self.host().start_manager(settings)
            self._skill_managers[folder] = manager
        kernel = Kernel(self.host(), manager, f"skill-{uuid.uuid4().hex[:12]}")
        kernel.info()
        return kernel

    # -- servers ------------------------------------------------------------------------

    def start_server(self, settings: Settings) -> KernelMcpServer:
        from .servers import KernelMcpServer

        server = KernelMcpServer(settings, self.host().loop)
        self.servers.append(server)
        server.start()
        return server

    def stop_server(self, server: KernelMcpServer) -> None:
        with contextlib.suppress(ValueError):
            self.servers.remove(server)
        server.stop()

    def start_stack(
        self,
        base: Settings,
        kernel_mcp: Mapping[str, Any] | None,
        llm: ScriptedLLM | None,
        agent_settings: Mapping[str, Any],
    ) -> AgentStack:
        from .servers import AgentStack

        kernel_settings = self.derive(base, "agent", **dict(kernel_mcp or {}))
        stack = AgentStack(kernel_settings.workspace.parent, kernel_settings, agent_settings, llm)
        self.stacks.append(stack)
        stack.start()
        return stack

    def stop_stack(self, stack: AgentStack) -> None:
        for stacks in (self.stacks, self.module_stacks):
            with contextlib.suppress(ValueError):
                stacks.remove(stack)
        stack.stop()

    # -- the end ------------------------------------------------------------------------

    def close(self) -> None:
        """Stop whatever is still running, then kill any kernel of ours that survived."""
        if self._closed:
            return
        self._closed = True
        for stack in list(self.stacks):
            _logged(self.stop_stack, stack)
        for server in list(self.servers):
            _logged(self.stop_server, server)
        if self._host is not None:
            _logged(self._host.close)
        self.sweep()
        if self._root is not None:
            from kernel_mcp.files import remove_folder  # kernels may nest folders very deep

            with contextlib.suppress(OSError):
                remove_folder(self._root)

    def sweep(self) -> list[KernelProcess]:
        """Kill every kernel process of ours still running; returns them."""
        left = [p for p in kernel_processes().values() if self.owns(p)]
        if left:
            kill(left)
            self.late_reports.append(
                f"kernel-agent: {len(left)} kernel process(es) of the plugin survived their "
                f"fixtures and were killed:\n{describe(left)}"
            )
        return left


def _logged(action: Callable[..., Any], *args: Any) -> None:
    try:
        action(*args)
    except Exception:
        logger.exception("kernel-agent: stopping %s failed", args[0] if args else action)


STATE = pytest.StashKey[KernelAgentState]()


def _state(config: pytest.Config) -> KernelAgentState:
    return config.stash[STATE]


# -- hooks ------------------------------------------------------------------------------


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kernel-agent", "kernel-agent: live kernels, servers and skills")
    group.addoption(
        "--kernel-agent-skills",
        action="append",
        default=[],
        metavar="DIR",
        dest="kernel_agent_skills",
        help="test every skill folder under DIR: check its SKILL.md against the Agent Skills "
        "format and run each python example in a live kernel (repeatable)",
    )
    parser.addini(
        "kernel_agent_skills",
        type="paths",
        default=[],
        help="skills folders tested as by --kernel-agent-skills (relative to the ini file)",
    )
    parser.addini(
        "kernel_agent_provider_keys",
        type="linelist",
        default=PROVIDER_KEYS,
        help="environment variables of which one must be set for tests marked llm to run",
    )
    parser.addini(
        "kernel_agent_leak_check",
        type="bool",
        default=True,
        help="report (as an error) and kill kernels a test or fixture leaves running",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kernel: starts live Jupyter kernels (kernel-agent)")
    config.addinivalue_line(
        "markers", "llm: needs a real LLM provider key; skipped without one (kernel-agent)"
    )
    for line in _SERVER_WARNINGS:
        config.addinivalue_line("filterwarnings", line)
    state = KernelAgentState(config)
    config.stash[STATE] = state
    config.stash[KERNEL_FOR_SKILL] = state.skill_kernel
    atexit.register(state.close)  # a last resort when pytest itself is cut short
    state.skill_dirs = _skill_dirs(config)
    if state.skill_dirs and config.args_source != pytest.Config.ArgsSource.ARGS:
        # No paths on the command line: test the skills beside the default paths.
        args = [Path(config.invocation_params.dir, a).resolve() for a in config.args]
        for folder in state.skill_dirs:
            if not any(folder == a or a in folder.parents for a in args):
                config.args.append(str(folder))


def _skill_dirs(config: pytest.Config) -> list[Path]:
    folders: list[Path] = list(config.getini("kernel_agent_skills"))
    invocation = config.invocation_params.dir
    folders += [Path(invocation, d) for d in config.getoption("kernel_agent_skills")]
    resolved = []
    for folder in folders:
        folder = folder.resolve()
        if not folder.is_dir():
            raise pytest.UsageError(f"kernel-agent skills folder {folder} is not a folder")
        if folder not in resolved:
            resolved.append(folder)
    return resolved


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(STATE, None)
    if state is not None:
        state.close()
        atexit.unregister(state.close)


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if file_path.name != "SKILL.md":
        return None
    folders = _state(parent.config).skill_dirs
    if any(folder in file_path.resolve().parents for folder in folders):
        skill_file: SkillFile = SkillFile.from_parent(parent, path=file_path)
        return skill_file
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keys = config.getini("kernel_agent_provider_keys")
    has_key = any(os.environ.get(key) for key in keys)
    skip = pytest.mark.skip(reason=f"needs a real LLM provider key ({' or '.join(keys)})")
    for item in items:
        if KERNEL_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker("kernel")
        if not has_key and item.get_closest_marker("llm"):
            item.add_marker(skip)


def _leak_check(config: pytest.Config) -> bool:
    return bool(config.getini("kernel_agent_leak_check"))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    if _leak_check(item.config):
        _state(item.config).tracker.begin_test()
    return (yield)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any], request: Any) -> Iterator[Any]:
    if fixturedef.scope == "function" or not _leak_check(request.config):
        return (yield)
    before = Snapshot.now()
    try:
        return (yield)
    finally:
        _state(request.config).tracker.fixture_started(id(fixturedef), fixturedef.argname, before)


def pytest_fixture_post_finalizer(fixturedef: pytest.FixtureDef[Any], request: Any) -> None:
    if fixturedef.scope != "function" and _leak_check(request.config):
        _state(request.config).tracker.fixture_finished(id(fixturedef), fixturedef.argname)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    if not _leak_check(item.config):
        return (yield)
    tracker = _state(item.config).tracker
    try:
        result = yield
    except BaseException:
        tracker.end_test()  # kill what is left even when the teardown failed
        tracker.take_fixture_leaks()
        raise
    reports = []
    leaked = tracker.end_test()
    if leaked:
        reports.append(
            f"kernel-agent: this test left {len(leaked)} kernel process(es) running (now "
            f"killed); shut down every kernel a test starts, or use the kernel fixtures:\n"
            f"{describe(leaked)}"
        )
    for name, processes in tracker.take_fixture_leaks():
        reports.append(
            f"kernel-agent: fixture {name!r} left {len(processes)} kernel process(es) running "
            f"after its teardown (now killed):\n{describe(processes)}"
        )
    if reports:
        pytest.fail("\n".join(reports), pytrace=False)
    return result


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    state = _state(session.config)
    state.close()
    for name, processes in state.tracker.take_fixture_leaks():
        state.late_reports.append(
            f"kernel-agent: fixture {name!r} left kernel process(es) running (now killed):\n"
            f"{describe(processes)}"
        )


def pytest_terminal_summary(terminalreporter: Any) -> None:
    state = terminalreporter.config.stash.get(STATE, None)
    if state is None or not state.late_reports:
        return
    terminalreporter.section("kernel-agent")
    for report in state.late_reports:
        terminalreporter.line(report, red=True)


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kernel_mcp_settings(pytestconfig: pytest.Config) -> Settings:
    """Settings of the kernel layer for the plugin's kernels and servers.

    Production defaults (sandboxed; `KERNEL_MCP_*` variables apply) with a warm pool of one;
    folders are the plugin's own. Override this fixture in a conftest.py to change them:
    `return kernel_mcp_settings.model_copy(update={"execute_timeout": 10})`.
    """
    return _state(pytestconfig).base_settings()


@pytest.fixture
def kernel_factory(
    pytestconfig: pytest.Config, kernel_mcp_settings: Settings
) -> Iterator[KernelFactory]:
    """Start live kernels: `kernel_factory()` -> Kernel; all are shut down after the test."""
    from .kernels import KernelFactory

    state = _state(pytestconfig)
    factory = KernelFactory(
        state.host(),
        lambda: state.shared_manager(kernel_mcp_settings),
        state.derive(kernel_mcp_settings, "own"),
    )
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def kernel(kernel_factory: KernelFactory) -> Kernel:
    """A live kernel of its own for this test: `kernel.execute(code)` -> KernelResult."""
    return kernel_factory()


@pytest.fixture(scope="session")
def kernel_mcp_server(
    pytestconfig: pytest.Config, kernel_mcp_settings: Settings
) -> Iterator[KernelMcpServer]:
    """kernel_mcp over HTTP for the whole test session: `.url`, `.client()`."""
    state = _state(pytestconfig)
    server = state.start_server(state.derive(kernel_mcp_settings, "mcp"))
    try:
        yield server
    finally:
        state.stop_server(server)


@pytest.fixture
def kernel_mcp_server_factory(
    pytestconfig: pytest.Config, kernel_mcp_settings: Settings
) -> Iterator[Callable[..., KernelMcpServer]]:
    """Start kernel_mcp servers with settings overrides (`factory(token="s3cret")`) for
    this test; all are stopped after it."""
    state = _state(pytestconfig)
    started: list[KernelMcpServer] = []

    def start(**overrides: Any) -> KernelMcpServer:
        server = state.start_server(state.derive(kernel_mcp_settings, "mcp", **overrides))
        started.append(server)
        return server

    try:
        yield start
    finally:
        _stop_all(state.stop_server, started)


@pytest.fixture(autouse=True)
def _kernel_agent_per_test(pytestconfig: pytest.Config) -> Iterator[None]:
    """`agent.llm` starts each test empty; kernels of `kernel_mcp_server.client()` sessions
    are shut down after it."""
    state = _state(pytestconfig)
    for stack in state.module_stacks:
        stack.llm.reset()
    yield
    for server in list(state.servers):
        server.end_test()


@pytest.fixture
def agent_factory(
    pytestconfig: pytest.Config, kernel_mcp_settings: Settings
) -> Iterator[Callable[..., AgentStack]]:
    """Start whole stacks for this test: `agent_factory(**agent_settings)` -> AgentStack.

    Keyword arguments are agent_service settings (`api_keys=["k"]`, `model=None`, ...);
    `kernel_mcp={...}` overrides the stack's kernel_mcp settings and `llm=` passes a
    ScriptedLLM of yours. Every stack is stopped after the test.
    """
    state = _state(pytestconfig)
    started: list[AgentStack] = []

    def start(
        *,
        kernel_mcp: Mapping[str, Any] | None = None,
        llm: ScriptedLLM | None = None,
        **agent_settings: Any,
    ) -> AgentStack:
        stack = state.start_stack(kernel_mcp_settings, kernel_mcp, llm, agent_settings)
        started.append(stack)
        return stack

    try:
        yield start
    finally:
        _stop_all(state.stop_stack, started)


@pytest.fixture(scope="module")
def agent(pytestconfig: pytest.Config, kernel_mcp_settings: Settings) -> Iterator[AgentStack]:
    """kernel_mcp + agent_service + a scripted LLM for this module: `.base_url`, `.client`
    (an `openai.OpenAI`), `.llm` (script it; it starts each test empty)."""
    state = _state(pytestconfig)
    stack = state.start_stack(kernel_mcp_settings, None, None, {})
    state.module_stacks.append(stack)
    try:
        yield stack
    finally:
        state.stop_stack(stack)


@pytest.fixture
def scripted_llm() -> Iterator[ScriptedLLM]:
    """A scripted OpenAI-compatible model server alone, for your own agent code."""
    from .scripted_llm import ScriptedLLM

    with ScriptedLLM() as llm:
        yield llm


def _stop_all(stop: Callable[[Any], None], things: list[Any]) -> None:
    errors: list[BaseException] = []
    for thing in reversed(things):
        try:
            stop(thing)
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise errors[0]
