"""Notebook export, replay and JupyterLab inspection, on real transcripts."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import nbformat
import pytest

from agent_service.notebook import build_notebook, validate
from agent_service.sqlite_store import SqliteStore
from kernel_agent_pytest.scripted_llm import Text, ToolCall
from tests.kernel_mcp.conftest import free_port

from .conftest import Stack
from .test_chat import stream_turn

pytestmark = pytest.mark.kernel
KERNEL_AGENT = Path(sys.executable).with_name("kernel-agent")


async def on_disk(path: Path, code_cells: int, within: float = 10) -> nbformat.NotebookNode:
    """The notebook file once the background export has written `code_cells` code cells."""
    deadline = time.monotonic() + within
    while True:
        if path.exists():
            notebook = nbformat.read(path, as_version=4)
            if sum(c.cell_type == "code" for c in notebook.cells) >= code_cells:
                return notebook
        assert time.monotonic() < deadline, f"{path} was not written"
        await asyncio.sleep(0.02)


async def _notebook(stack: Stack, session: str) -> tuple[httpx.Response, nbformat.NotebookNode]:
    async with httpx.AsyncClient(base_url=stack.url) as http:
        response = await http.get(f"/v1/sessions/{session}/notebook")
    assert response.status_code == 200, response.text
    return response, nbformat.reads(response.text, as_version=4)


@pytest.mark.both_stores
async def test_export_matches_the_transcript_with_real_outputs(stack: Stack) -> None:
    stack.llm.script(
        ToolCall("execute_code", {"code": "xs = [1, 2, 3]\nprint(sum(xs))"}),
        Text("Six."),
        ToolCall(
            "execute_code",
            {"code": "import matplotlib.pyplot as plt\nplt.plot(xs)\nplt.show()\nlen(xs)"},
        ),
        Text("Plotted."),
    )
    await stream_turn(stack, "nb-1", "Sum xs")
    await stream_turn(stack, "nb-1", "Plot xs")
    response, notebook = await _notebook(stack, "nb-1")
    assert response.headers["content-type"].startswith("application/x-ipynb+json")
    assert response.headers["content-disposition"] == 'attachment; filename="nb-1.ipynb"'
    validate(notebook)
    kinds = [(c.cell_type, c.source.split("\n")[0]) for c in notebook.cells]
    assert kinds == [
        ("markdown", "**User:**"),
        ("code", "xs = [1, 2, 3]"),
        ("markdown", "**Assistant:**"),
        ("markdown", "**User:**"),
        ("code", "import matplotlib.pyplot as plt"),
        ("markdown", "**Assistant:**"),
    ]
    first, second = (c for c in notebook.cells if c.cell_type == "code")
    assert first.outputs[0] == {"output_type": "stream", "name": "stdout", "text": "6\n"}
    assert first.execution_count is not None
    assert second.execution_count == first.execution_count + 1
    types = [o.output_type for o in second.outputs]
    assert types == ["display_data", "execute_result"]
    assert "image/png" in second.outputs[0].data
    assert second.outputs[1].data["text/plain"] == "3"
    meta = notebook.metadata
    assert meta.kernelspec.name == "python3"
    assert meta.language_info.name == "python"
    assert meta.language_info.version.startswith("3.")
    assert meta.kernel_agent.session_id == "nb-1"
    assert meta.kernel_agent.model == "kernel-agent"
    written = await on_disk(stack.agent_settings.notebooks_dir / "nb-1.ipynb", 2)
    assert written.cells == notebook.cells
    assert written.metadata.kernel_agent.session_id == "nb-1"


@pytest.mark.both_stores
async def test_timeouts_restarts_and_odd_bytes_validate(stack: Stack) -> None:
    stack.llm.script(
        ToolCall("execute_code", {"code": "print(bytes(range(256)).decode('latin-1'))"}),
        ToolCall("execute_code", {"code": "import time; time.sleep(30)", "timeout": 1}),
        ToolCall("execute_code", {"code": "import os; os._exit(3)"}),
        ToolCall("execute_code", {"code": "print('x' * 5_000_000)"}),
        Text("Done."),
    )
    await stream_turn(stack, "nb-odd", "stress")
    _, notebook = await _notebook(stack, "nb-odd")
    validate(notebook)
    notes = [c.source for c in notebook.cells if c.cell_type == "markdown"]
    assert any(n.startswith("> **Timeout") for n in notes)
    assert any(n.startswith("> **Kernel died") for n in notes)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code[1].metadata.kernel_agent.status == "timeout_interrupted"
    assert code[2].metadata.kernel_agent.kernel_restarted is True
    assert "bytes truncated" in "".join(o.get("text", "") for o in code[3].outputs)


async def test_notebook_file_is_never_half_written(stack: Stack) -> None:
    stack.llm.script(*[s for i in range(4) for s in (
        ToolCall("execute_code", {"code": f"print('y' * 300_000)  # {i}"}), Text(f"turn {i}"),
    )])  # fmt: skip
    path = stack.agent_settings.notebooks_dir / "nb-atomic.ipynb"
    reads = 0
    done = asyncio.Event()

    async def reader() -> None:
        nonlocal reads
        while not done.is_set():
            if path.exists():
                nbformat.reads(path.read_text(), as_version=4)  # raises if half-written
                reads += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(reader())
    for i in range(4):
        await stream_turn(stack, "nb-atomic", f"turn {i}")
    await on_disk(path, 4)
    done.set()
    await task
    assert reads > 0
    leftovers = [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


async def test_unknown_session_notebook_is_404(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url) as http:
        response = await http.get("/v1/sessions/missing/notebook")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "session_not_found"


@pytest.mark.both_stores
async def test_thousand_cell_transcript_validates(stack: Stack, tmp_path: Path) -> None:
    stack.llm.script(
        ToolCall("execute_code", {"code": "import pandas as pd\npd.DataFrame({'a': [1]})"}),
        Text("A frame."),
    )
    await stream_turn(stack, "nb-big", "frame")
    source = stack.services.store
    record = source.get_session("nb-big")
    events = source.events("nb-big")
    big = SqliteStore(tmp_path / "big.sqlite3")
    big.create_session("big", "kernel-agent")
    for i in range(400):  # user + tool result + assistant: 1,200 cells
        for event in events:
            data = copy.deepcopy(event.data)
            big.append("big", i + 1, event.type, data)
    assert record is not None
    notebook = build_notebook(big.get_session("big"), big.events("big"))  # type: ignore[arg-type]
    assert len(notebook.cells) >= 1200
    validate(notebook)
    assert sum(c.cell_type == "code" for c in notebook.cells) == 400


async def test_deterministic_session_replays_clean_and_tampering_is_caught(
    stack: Stack, tmp_path: Path
) -> None:
    stack.llm.script(
        ToolCall("execute_code", {"code": "import math\nvals = [math.sqrt(i) for i in range(5)]"}),
        ToolCall("execute_code", {"code": "print(round(sum(vals), 6))\nobject()"}),
        ToolCall(
            "execute_code", {"code": "import kernel_skills\nfrom df_summary import summarize"}
        ),
        ToolCall("execute_code", {"code": "1 / 0"}),
        Text("Done."),
    )
    await stream_turn(stack, "nb-replay", "compute")
    path = stack.agent_settings.notebooks_dir / "nb-replay.ipynb"
    await on_disk(path, 4)
    # In a thread: the event loop serves both in-process servers meanwhile.
    clean = await asyncio.to_thread(
        subprocess.run,
        [str(KERNEL_AGENT), "replay", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "4 matched, 0 differ" in clean.stdout
    notebook = nbformat.read(path, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    code[1].outputs[0]["text"] = "7.5\n"  # tamper with the recorded output
    tampered = tmp_path / "tampered.ipynb"
    nbformat.write(notebook, tampered)
    result = await asyncio.to_thread(
        subprocess.run,
        [str(KERNEL_AGENT), "replay", str(tampered), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    reports = json.loads(result.stdout)
    assert [r["status"] for r in reports] == ["match", "differs", "match", "match"]
    assert "7.5" in reports[1]["detail"]
    # Both reports name cells by their index in the notebook, and agree.
    positions = [i for i, c in enumerate(notebook.cells) if c.cell_type == "code"]
    assert [r["index"] for r in reports] == positions
    assert "7.5" in "".join(notebook.cells[reports[1]["index"]].outputs[0]["text"])
    text = await asyncio.to_thread(
        subprocess.run,
        [str(KERNEL_AGENT), "replay", str(tampered)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert f"cell {positions[1]}: differs" in text.stdout
    assert f"cell {positions[0]}: match" in text.stdout
    for run in (clean, result, text):
        assert "without encryption" not in run.stderr, run.stderr


async def test_user_messages_render_as_written(stack: Stack) -> None:
    message = (
        "RUN:\nimport pandas as pd\ndf = pd.DataFrame({'a': [1, 2]})\n"
        "Then tell me **why** my_var_name costs $5\n- not a list item"
    )
    stack.llm.script(Text("Sure."))
    await stream_turn(stack, "nb-literal", message)
    async with httpx.AsyncClient(base_url=stack.url) as http:
        response = await http.get("/v1/sessions/nb-literal/notebook")
    notebook = nbformat.reads(response.text, as_version=4)
    source = notebook.cells[0].source
    assert source.startswith("**User:**")
    # The code lines are a code block, verbatim.
    assert "```python\nimport pandas as pd\ndf = pd.DataFrame({'a': [1, 2]})\n```" in source
    # Prose keeps its line break and its characters, with markup escaped, not interpreted.
    assert "Then tell me \\*\\*why\\*\\* my\\_var\\_name costs \\$5<br>" in source
    assert "\n\\- not a list item" in source
    assert "RUN:" in source


async def test_attach_to_the_session_kernel_from_its_connection_file(stack: Stack) -> None:
    stack.llm.script(ToolCall("execute_code", {"code": "secret = 'from the agent'"}), Text("Set."))
    await stream_turn(stack, "nb-attach", "set a variable")
    async with httpx.AsyncClient(base_url=stack.url) as http:
        info = (await http.get("/v1/sessions/nb-attach/kernel")).json()
    assert info["console_command"] == f"jupyter console --existing {info['connection_file']}"
    from jupyter_client.asynchronous import AsyncKernelClient

    client = AsyncKernelClient(connection_file=info["connection_file"])
    client.load_connection_file()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=30)
        seen: list[str] = []
        reply = await client.execute_interactive(
            "print(secret)",
            timeout=30,
            output_hook=lambda msg: seen.append(msg["content"].get("text", "")),
        )
    finally:
        client.stop_channels()
    assert reply["content"]["status"] == "ok"
    assert "".join(seen) == "from the agent\n"


async def test_jupyter_server_lists_session_kernels(stack: Stack, tmp_path: Path) -> None:
    stack.llm.script(ToolCall("execute_code", {"code": "a = 1"}), Text("ok"))
    await stream_turn(stack, "nb-lab", "go")
    connection_dir = stack.root / "rt" / "kernels"
    port = free_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("jupyter-server")),
            f"--port={port}",
            "--ip=127.0.0.1",
            "--no-browser",
            "--allow-root",
            "--IdentityProvider.token=tok",
            f"--ServerApp.root_dir={tmp_path}",
            "--ServerApp.allow_external_kernels=True",
            f"--ServerApp.external_connection_dir={connection_dir}",
        ],
        env={**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        kernels = None
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    response = await http.get("/api/kernels", params={"token": "tok"})
                except httpx.ConnectError:
                    await asyncio.sleep(0.2)
                    continue
                kernels = response.json()
                break
        assert kernels is not None, "jupyter server did not start"
        assert len(kernels) == 1, "the session kernel, and not the pool's"
        # Listed under the name the agent's kernel endpoint reports for the session.
        async with httpx.AsyncClient(base_url=stack.url) as http:
            reported = (await http.get("/v1/sessions/nb-lab/kernel")).json()
        assert reported["kernel_name"] == "kernel-agent-nb-lab"
        assert kernels[0]["name"] == reported["kernel_name"]
    finally:
        server.terminate()
        server.wait(timeout=30)


async def test_reading_the_kernel_of_a_chat_only_session_starts_nothing(stack: Stack) -> None:
    stack.llm.script(Text("Just words."))
    await stream_turn(stack, "nb-chat-only", "hello")
    async with httpx.AsyncClient() as http:
        health = f"{stack.kernel_mcp.base_url}/health"
        before = (await http.get(health)).json()["kernels_running"]
        response = await http.get(f"{stack.url}/v1/sessions/nb-chat-only/kernel")
        after = (await http.get(health)).json()["kernels_running"]
    assert response.status_code == 200
    assert response.json()["running"] is False
    assert after == before
