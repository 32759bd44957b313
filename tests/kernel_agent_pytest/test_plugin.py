"""The pytest plugin as users meet it: pytest runs in a subprocess (pytester) on their files.

Each run gets a short TMPDIR of its own, under which the plugin keeps every kernel's files,
so "nothing left running" is checked by looking for any process naming that folder.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

pytest_plugins = ["pytester"]
pytestmark = [pytest.mark.kernel, pytest.mark.timeout(600)]

DOCS = Path(__file__).resolve().parents[2] / "docs" / "testing.md"
RUN_TIMEOUT = 480  # seconds a whole inner run may take on a loaded machine
INI = """\
[pytest]
asyncio_default_fixture_loop_scope = function
"""


@pytest.fixture
def run_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A short TMPDIR for the inner run (IPC socket paths must stay under ~100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="kap-"))
    monkeypatch.setenv("TMPDIR", str(path))
    for key in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def processes_naming(folder: Path) -> list[psutil.Process]:
    """Running processes whose command line names `folder` (the inner run's kernels)."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            if any(str(folder) in arg for arg in process.cmdline()):
                found.append(process)
        except psutil.Error:
            continue
    return found


def assert_nothing_left(folder: Path, within: float = 30) -> None:
    """No process names `folder` (a dying sandbox gets `within` seconds to finish)."""
    deadline = time.monotonic() + within
    while (left := processes_naming(folder)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, [" ".join(p.cmdline()) for p in left]


def documented_test_files() -> dict[str, str]:
    """The complete example files of docs/testing.md: python blocks starting `# test_*.py`."""
    blocks = re.findall(r"^```python\n(.*?)^```$", DOCS.read_text(), re.DOTALL | re.MULTILINE)
    files = {}
    for block in blocks:
        first, _, rest = block.partition("\n")
        name = re.fullmatch(r"# (test_\w+\.py)", first)
        if name:
            files[name.group(1)] = rest
    return files


def test_the_documented_example_files_pass(pytester: pytest.Pytester, run_tmp: Path) -> None:
    files = documented_test_files()
    assert set(files) >= {
        "test_kernel.py",
        "test_isolation.py",
        "test_kernel_mcp.py",
        "test_agent.py",
        "test_real_model.py",
    }
    pytester.makeini(INI)
    for name, text in files.items():
        pytester.makepyfile(**{name.removesuffix(".py"): text})

    result = pytester.runpytest_subprocess("-ra", timeout=RUN_TIMEOUT)

    result.assert_outcomes(passed=15, skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED * needs a real LLM provider key*"])
    assert_nothing_left(run_tmp)


SKILL = """\
---
name: {name}
description: {description}
---

# {name}

{body}
"""


def test_a_broken_skill_example_fails_with_the_kernels_traceback(
    pytester: pytest.Pytester, run_tmp: Path
) -> None:
    skills = pytester.path / "skills"
    (skills / "arith").mkdir(parents=True)
    (skills / "arith_tools.py").write_text("def double(n):\n    return 2 * n\n")
    arith = """\
The skills folder is on the kernel's path; examples run in order and share the kernel:

```python
from arith_tools import double
x = double(21)
```

````markdown
A python block quoted in another block is not an example:
```python
raise SystemExit("never run")
```
````

```python
print(x)
```
"""
    (skills / "arith" / "SKILL.md").write_text(
        SKILL.format(name="arith", description="Doubling numbers.", body=arith)
    )
    (skills / "broken").mkdir()
    broken = """\
```python
print("forbidden word")
```

```python
def ratio(a, b):
    return a / b

ratio(1, 0)
```

```python
print("not reached")
```
"""
    (skills / "broken" / "SKILL.md").write_text(
        SKILL.format(name="broken", description="Examples that fail.", body=broken)
    )
    (skills / "Bad_Name").mkdir()
    (skills / "Bad_Name" / "SKILL.md").write_text(
        "---\nname: Bad_Name\nversion: 2\n---\n\nNo description, an unknown field.\n"
    )
    pytester.makeini(INI)
    pytester.makeconftest(
        """
        def pytest_kernel_agent_skill_example(item, result):
            assert "forbidden" not in result.text, f"{item.skill.name} printed a forbidden word"
            if item.skill.name == "arith" and item.number == 2:
                assert result.text == "42\\n"
        """
    )

    result = pytester.runpytest_subprocess("-v", "--kernel-agent-skills", "skills")

    result.assert_outcomes(passed=4, failed=3, skipped=1)
    result.stdout.fnmatch_lines_random(
        [
            "skills/arith/SKILL.md::format PASSED*",
            "skills/arith/SKILL.md::example-1 PASSED*",
            "skills/arith/SKILL.md::example-2 PASSED*",
            "skills/broken/SKILL.md::example-1 FAILED*",
            "skills/broken/SKILL.md::example-2 FAILED*",
            "skills/broken/SKILL.md::example-3 SKIPPED*",
            "skills/Bad_Name/SKILL.md::format FAILED*",
        ]
    )
    # The failing example: where it is, its code and the kernel's traceback.
    result.stdout.fnmatch_lines(
        [
            "*_ broken example 2 _*",
            "broken example 2 (SKILL.md, line 13) failed in the kernel: error",
            "--- code ---",
            "def ratio(a, b):",
            "--- kernel output ---",
            "*ZeroDivisionError*Traceback (most recent call last)*",
            "*----> 4 ratio(1, 0)*",
            "*in ratio(a, b)*",
            "*----> 2     return a / b*",
            "ZeroDivisionError: division by zero",
        ]
    )
    result.stdout.fnmatch_lines(["*AssertionError: broken printed a forbidden word*"])
    result.stdout.fnmatch_lines(
        [
            "Bad_Name/SKILL.md breaks the Agent Skills format:",
            "  - unknown fields ?'version'?; the format allows*",
            "  - 'name' 'Bad_Name' must be lowercase letters, digits and hyphens",
            "  - 'description' is required*",
        ]
    )
    assert_nothing_left(run_tmp)


def test_failing_timed_out_and_leaking_tests_leave_nothing_running(
    pytester: pytest.Pytester, run_tmp: Path
) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(
        test_failures="""
        import pathlib
        import time

        import psutil
        import pytest
        from jupyter_client.manager import start_new_kernel

        PIDS = {}


        def test_fails(kernel, agent):
            PIDS["failed"] = kernel.info().pid
            assert kernel.execute("1 + 1").text == "3\\n"


        @pytest.mark.timeout(15)
        def test_times_out(kernel):
            PIDS["timed out"] = kernel.info().pid
            kernel.execute("import time\\nwhile True: time.sleep(0.1)", timeout=600)


        def test_leaks_a_kernel():
            manager, client = start_new_kernel()
            pathlib.Path("leaked.pid").write_text(str(manager.provisioner.pid))


        def running(pid):
            try:
                return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return False


        def test_the_kernels_of_the_tests_before_are_gone():
            deadline = time.monotonic() + 30
            while any(running(pid) for pid in PIDS.values()) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert PIDS and not [name for name, pid in PIDS.items() if running(pid)]
        """
    )

    result = pytester.runpytest_subprocess("-ra", timeout=RUN_TIMEOUT)

    result.assert_outcomes(passed=2, failed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaks_a_kernel*",
            "kernel-agent: this test left 1 kernel process(es) running (now killed)*",
            "  pid *ipykernel_launcher*",
        ]
    )
    result.stdout.fnmatch_lines(["*Timeout (>15.0s) from pytest-timeout*"])
    leaked = int((pytester.path / "leaked.pid").read_text())
    assert not psutil.pid_exists(leaked) or psutil.Process(leaked).status() == "zombie"
    assert_nothing_left(run_tmp)


def test_nothing_is_left_running_after_ctrl_c(pytester: pytest.Pytester, run_tmp: Path) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(
        test_interrupted="""
        import pathlib

        import pytest

        from kernel_agent_pytest import Text, ToolCall


        @pytest.mark.asyncio
        async def test_runs_until_interrupted(kernel, kernel_mcp_server, agent):
            async with kernel_mcp_server.client() as client:
                await client.call_tool("execute_code", {"code": "x = 1"})
                agent.llm.script(ToolCall("execute_code", {"code": "y = 2"}), Text("ok"))
                agent.client.chat.completions.create(
                    model="kernel-agent", messages=[{"role": "user", "content": "y = 2"}]
                )
                pathlib.Path("ready").write_text("every part is up")
                await kernel.aexecute("import time\\nwhile True: time.sleep(0.1)", timeout=600)
        """
    )
    log = pytester.path / "run.log"
    with log.open("wb") as out:
        run = subprocess.Popen(
            # faulthandler: on SIGABRT the run prints every thread's stack (see below)
            [sys.executable, "-X", "faulthandler", "-m", "pytest", "-p", "no:cacheprovider"],
            cwd=pytester.path,
            stdout=out,
            stderr=subprocess.STDOUT,
            # As from a terminal: a shell running us in the background ignores SIGINT, and
            # Python keeps an inherited SIG_IGN (the run would never see the Ctrl-C).
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not (pytester.path / "ready").exists():
            assert run.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"the inner run never got ready:\n{log.read_text()}"
            time.sleep(0.1)
        running = processes_naming(run_tmp)
        # Kernels of `kernel` and of sessions on kernel_mcp_server and on the agent's kernel_mcp.
        assert len([p for p in running if p.name() != "bwrap"]) >= 3

        run.send_signal(signal.SIGINT)
        try:
            code = run.wait(RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            run.send_signal(signal.SIGABRT)  # where it is stuck goes to the log
            run.wait(60)
            pytest.fail(f"the run did not end after Ctrl-C:\n{log.read_text()}")
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    output = log.read_text()
    assert code == pytest.ExitCode.INTERRUPTED, output
    assert "KeyboardInterrupt" in output
    assert_nothing_left(run_tmp)


def test_the_plugin_is_registered_and_light(pytester: pytest.Pytester) -> None:
    """Loaded by its entry point in any run, importing neither kernel layer nor agent."""
    pytester.makepyfile(
        test_light=textwrap.dedent(
            """
            import sys

            def test_nothing_heavy_imported(pytestconfig):
                assert pytestconfig.pluginmanager.has_plugin("kernel_agent")
                heavy = {"kernel_mcp.sessions", "agent_service.app", "litellm", "uvicorn"}
                assert not heavy & set(sys.modules)
            """
        )
    )
    result = pytester.runpytest_subprocess("--markers")
    result.stdout.fnmatch_lines(
        ["@pytest.mark.kernel: starts live Jupyter kernels*", "@pytest.mark.llm: needs a real*"]
    )
    pytester.runpytest_subprocess().assert_outcomes(passed=1)
