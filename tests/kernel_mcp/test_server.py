"""The MCP surface through fastmcp's in-memory client, fastmcp over HTTP, and the mcp SDK."""

from __future__ import annotations

import asyncio
import base64
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastmcp import Client
from fastmcp.client.transports import StreamableHttpTransport
from fastmcp.exceptions import ToolError

from kernel_agent_pytest import KernelMcpServer
from kernel_mcp.config import Settings
from kernel_mcp.server import create_server

pytestmark = pytest.mark.kernel

REPO_SKILLS = Path(__file__).resolve().parents[2] / "skills"
TOOLS = {
    "execute_code",
    "list_variables",
    "interrupt_kernel",
    "restart_kernel",
    "list_files",
    "read_file",
    "write_file",
    "read_skill",
    "kernel_info",
    "shutdown_kernel",
    "new_session",
}


def http_client(base: str, session: str | None = None, token: str | None = None) -> Client:
    headers = {"X-Session-Id": session} if session else {}
    transport = StreamableHttpTransport(f"{base}/mcp", headers=headers, auth=token)
    return Client(transport, mode="legacy")


async def run(client: Client, code: str, **args: Any) -> Any:
    return await client.call_tool("execute_code", {"code": code, **args})


@pytest.mark.gateway
async def test_in_memory_tools_state_and_prompt(make_settings: Callable[..., Settings]) -> None:
    server = create_server(make_settings())
    async with Client(server, mode="legacy") as client:
        assert {t.name for t in await client.list_tools()} == TOOLS
        await run(client, "x = 20")
        result = await run(client, "x * 2 + 2")
        assert result.content[0].text == "42"
        assert result.structured_content["status"] == "ok"
        assert result.structured_content["outputs"][0]["data"]["text/plain"] == "42"
        prompt = await client.get_prompt("agent_system_prompt")
        text = prompt.messages[0].content.text
    served = sorted(p.name for p in REPO_SKILLS.iterdir() if (p / "SKILL.md").is_file())
    assert len(served) >= 4
    listed = [line[2:].split(":")[0] for line in text.split("## Skills\n")[1].splitlines()]
    assert listed == served, "every skill and nothing else"
    assert "persist" in text


async def test_skills_are_resources_and_readable(make_settings: Callable[..., Settings]) -> None:
    async with Client(create_server(make_settings()), mode="legacy") as client:
        uris = {str(r.uri) for r in await client.list_resources()}
        assert "skill://sympy-math/SKILL.md" in uris
        body = (await client.call_tool("read_skill", {"name": "sympy-math"})).content[0].text
        assert body.startswith("---\nname: sympy-math")
        helper = await client.call_tool(
            "read_skill", {"name": "pandas-data-analysis", "path": "df_summary.py"}
        )
        assert "def summarize" in helper.content[0].text
        with pytest.raises(ToolError, match="available skills: data-files"):
            await client.call_tool("read_skill", {"name": "nope"})


async def test_skill_helpers_import_in_the_kernel(make_settings: Callable[..., Settings]) -> None:
    async with Client(create_server(make_settings()), mode="legacy") as client:
        code = (
            "import kernel_skills, pandas as pd\nfrom df_summary import summarize\n"
            "summarize(pd.DataFrame({'a': [1, 2]})).shape[0]"
        )
        result = await run(client, code)
        assert result.structured_content["status"] == "ok", result.content[0].text
        assert result.content[0].text == "1"


async def test_invalid_skill_is_skipped_and_new_ones_appear(
    make_settings: Callable[..., Settings], short_tmp: Path, serve_http: Callable[..., Any]
) -> None:
    skills = short_tmp / "skills"
    shutil.copytree(REPO_SKILLS, skills)
    broken = skills / "Broken_Skill"
    broken.mkdir()
    (broken / "SKILL.md").write_text("no front matter here\n")
    base = serve_http(skills_dir=skills)
    async with httpx.AsyncClient() as http:
        names = {s["name"] for s in (await http.get(f"{base}/skills")).json()}
        assert "sympy-math" in names
        assert "Broken_Skill" not in names
        added = skills / "unit-conversion"
        added.mkdir()
        (added / "SKILL.md").write_text(
            "---\nname: unit-conversion\ndescription: Convert units. Use for unit questions.\n"
            "---\n# Units\n"
        )
        names_after = {s["name"] for s in (await http.get(f"{base}/skills")).json()}
    assert names_after == names | {"unit-conversion"}
    async with http_client(base, "s1") as client:
        prompt = (await client.get_prompt("agent_system_prompt")).messages[0].content.text
        assert "- unit-conversion: Convert units." in prompt
        uris = {str(r.uri) for r in await client.list_resources()}
        assert "skill://unit-conversion/SKILL.md" in uris


async def test_http_plot_arrives_as_image_content(serve_http: Callable[..., Any]) -> None:
    base = serve_http()
    async with http_client(base, "plots") as client:
        code = "import matplotlib.pyplot as plt\nplt.plot([3, 1, 2]); plt.title('t'); plt.show()"
        result = await run(client, code, timeout=60)
    images = [c for c in result.content if c.type == "image"]
    assert len(images) == 1
    assert images[0].mime_type == "image/png"
    assert base64.b64decode(images[0].data).startswith(b"\x89PNG")
    assert "[image/png image shown below]" in result.content[0].text


async def test_http_dataframe_html_in_structured_outputs(serve_http: Callable[..., Any]) -> None:
    base = serve_http()
    async with http_client(base, "frames") as client:
        code = "import pandas as pd\npd.DataFrame({'city': ['Oslo', 'Lima'], 'n': [1, 2]})"
        result = await run(client, code, timeout=60)
    html = result.structured_content["outputs"][-1]["data"]["text/html"]
    assert "<table" in html
    assert "Oslo" in html
    assert "Oslo" in result.content[0].text


async def test_two_clients_get_two_kernels(serve_http: Callable[..., Any]) -> None:
    base = serve_http()
    async with http_client(base) as first, http_client(base) as second:
        await run(first, "who = 'first'")
        await run(second, "who = 'second'")
        assert (await run(first, "who")).content[0].text == "'first'"
        assert (await run(second, "who")).content[0].text == "'second'"
        one = (await first.call_tool("kernel_info", {})).structured_content
        two = (await second.call_tool("kernel_info", {})).structured_content
    assert one["kernel_id"] != two["kernel_id"]
    assert one["folder"] != two["folder"]


async def test_same_session_header_reaches_the_same_kernel(serve_http: Callable[..., Any]) -> None:
    base = serve_http()
    async with http_client(base, "shared-1") as client:
        await run(client, "kept = [1, 2, 3]")
        first_id = (await client.call_tool("kernel_info", {})).structured_content["kernel_id"]
    async with http_client(base, "shared-1") as client:
        assert (await run(client, "sum(kept)")).content[0].text == "6"
        assert (await client.call_tool("kernel_info", {})).structured_content[
            "kernel_id"
        ] == first_id


async def test_modern_protocol_uses_the_header(serve_http: Callable[..., Any]) -> None:
    base = serve_http()
    transport = StreamableHttpTransport(f"{base}/mcp", headers={"X-Session-Id": "modern"})
    async with Client(transport) as client:
        await run(client, "y = 5")
        assert (await run(client, "y")).content[0].text == "5"


async def test_timeout_returns_quickly_and_state_survives(serve_http: Callable[..., Any]) -> None:
    base = serve_http()
    async with http_client(base, "t1") as client:
        await run(client, "kept = 'yes'")
        started = time.monotonic()
        result = await run(client, "while True: pass", timeout=2)
        assert time.monotonic() - started < 3
        assert result.structured_content["status"] == "timeout_interrupted"
        assert "interrupted" in result.content[0].text
        assert (await run(client, "kept")).content[0].text == "'yes'"


async def test_kernel_death_is_reported_and_next_call_works(
    serve_http: Callable[..., Any],
) -> None:
    base = serve_http()
    async with http_client(base, "d1") as client:
        result = await run(client, "import os; os._exit(1)")
        assert result.structured_content["status"] == "kernel_died"
        assert result.structured_content["kernel_restarted"] is True
        assert "variables defined earlier are gone" in result.content[0].text
        assert (await run(client, "6 * 7")).content[0].text == "42"


async def test_a_name_that_is_not_utf8_is_left_out_of_listings(
    serve_http: Callable[..., Any],
) -> None:
    # Archives made elsewhere carry such names (latin-1 here); the kernel can make them.
    base = serve_http()
    async with http_client(base, "latin") as client:
        made = "open(b'caf\\xe9.txt', 'w').write('x'); open('plain.txt', 'w').write('p')"
        await run(client, made)
        listing = await client.call_tool("list_files", {})
        assert [f["path"] for f in listing.structured_content["files"]] == ["plain.txt"]
    async with httpx.AsyncClient(base_url=base) as http:
        everything = await http.get("/sessions/latin/files")
        assert everything.status_code == 200, everything.text
        assert [f["path"] for f in everything.json()["files"]] == ["plain.txt"]


async def test_files_are_confined_to_the_session_folder(serve_http: Callable[..., Any]) -> None:
    base = serve_http()
    async with http_client(base, "f1") as client:
        await client.call_tool("write_file", {"path": "data/notes.txt", "content": "héllo"})
        assert (await run(client, "open('data/notes.txt').read()")).content[0].text == "'héllo'"
        listing = await client.call_tool("list_files", {"path": "data"})
        assert listing.structured_content["files"][0]["path"] == "data/notes.txt"
        text = await client.call_tool("read_file", {"path": "data/notes.txt"})
        assert text.content[0].text == "héllo"
        await run(client, "import os; os.symlink('/etc', 'escape')")
        for bad in ("../f1/data/notes.txt", "/etc/passwd", "escape/passwd", "data/../../x"):
            with pytest.raises(ToolError, match="session folder"):
                await client.call_tool("read_file", {"path": bad})
        with pytest.raises(ToolError, match="session folder"):
            await client.call_tool("write_file", {"path": "../outside.txt", "content": "x"})
        with pytest.raises(ToolError, match="session folder"):
            await client.call_tool("list_files", {"path": "escape"})


async def test_token_is_required_when_set(serve_http: Callable[..., Any]) -> None:
    base = serve_http(token="s3cret")
    async with httpx.AsyncClient() as http:
        denied = await http.post(f"{base}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
        assert denied.status_code == 401
        assert (await http.get(f"{base}/health")).status_code == 200
    async with http_client(base, "a1", token="s3cret") as client:
        assert (await run(client, "1 + 1")).content[0].text == "2"


async def test_foreign_origin_is_refused(serve_http: Callable[..., Any]) -> None:
    base = serve_http()
    async with httpx.AsyncClient() as http:
        evil = await http.get(f"{base}/health", headers={"Origin": "http://evil.example"})
        local = await http.get(f"{base}/health", headers={"Origin": "http://localhost:3000"})
    assert evil.status_code == 403
    assert local.status_code == 200


async def test_health_reports_kernels(serve_http: Callable[..., Any]) -> None:
    base = serve_http()
    async with http_client(base, "h1") as client:
        await run(client, "1")
    async with httpx.AsyncClient() as http:
        health = (await http.get(f"{base}/health")).json()
    assert health["status"] == "ok"
    assert health["kernels_running"] == 1
    assert "version" in health


@pytest.mark.gateway
async def test_live_output_arrives_during_a_slow_cell(
    make_settings: Callable[..., Settings],
    kernel_mcp_server_factory: Callable[..., KernelMcpServer],
) -> None:
    server = kernel_mcp_server_factory(**make_settings().model_dump())
    go = server.settings.workspace / "live" / "go"
    seen: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(message or "")
        if "tick 0" in "".join(seen):
            go.touch()  # the cell goes on only once its first line reached us

    code = (
        "import os, time\nprint('tick 0', flush=True)\ndeadline = time.monotonic() + 120\n"
        "while not os.path.exists('go'):\n    assert time.monotonic() < deadline, 'no go'\n"
        "    time.sleep(0.02)\nprint('tick 1'); print('tick 2')"
    )
    async with http_client(server.base_url, "live") as client:
        result = await client.call_tool(
            "execute_code", {"code": code}, progress_handler=on_progress
        )
    assert result.structured_content["status"] == "ok", result.content
    assert "tick 0" in seen[0]
    assert "".join(seen).count("tick") == 3


@pytest.mark.gateway
async def test_cancelled_call_interrupts_the_kernel(serve_http: Callable[..., Any]) -> None:
    base = serve_http()
    started = asyncio.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        if "sleeping" in (message or ""):
            started.set()

    code = (
        "import time\ntry:\n    print('sleeping', flush=True)\n    time.sleep(600)\n"
        "except KeyboardInterrupt:\n    interrupted = True"
    )
    async with http_client(base, "c1") as client:
        await run(client, "kept = 1")
        task = asyncio.create_task(
            client.call_tool("execute_code", {"code": code}, progress_handler=on_progress)
        )
        await asyncio.wait_for(started.wait(), 60)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Not interrupted, the next call would wait behind the 600 s sleep (and time out).
        result = await run(client, "kept, interrupted")
        assert result.content[0].text == "(1, True)"


async def test_official_mcp_sdk_client(serve_http: Callable[..., Any]) -> None:
    import httpx2
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    base = serve_http(token="tok")
    headers = {"X-Session-Id": "sdk-1", "Authorization": "Bearer tok"}
    logs: list[str] = []

    async def on_log(params: Any) -> None:
        logs.append(str(params.data))

    async with (
        httpx2.AsyncClient(headers=headers, timeout=60) as http,
        streamable_http_client(f"{base}/mcp", http_client=http) as (read, write),
        ClientSession(read, write, logging_callback=on_log) as session,
    ):
        await session.initialize()
        tools = await session.list_tools()
        assert {t.name for t in tools.tools} == TOOLS
        await session.call_tool("execute_code", {"code": "z = 7\nprint('hi')"})
        result = await session.call_tool("execute_code", {"code": "z * 6"})
        assert not result.is_error
        assert result.content[0].text == "42"
        assert result.structured_content["execution_count"] == 2
        bad = await session.call_tool("read_file", {"path": "../../etc/passwd"})
        assert bad.is_error
        assert "session folder" in bad.content[0].text
        prompt = await session.get_prompt("agent_system_prompt")
        assert "sympy-math" in prompt.messages[0].content.text
    assert any("hi" in entry for entry in logs)


async def test_shutdown_kernel_frees_it_and_next_call_starts_fresh(
    serve_http: Callable[..., Any],
) -> None:
    base = serve_http()
    async with http_client(base, "bye") as client:
        await run(client, "kept = 1")
        pid = (await client.call_tool("kernel_info", {})).structured_content["pid"]
        text = (await client.call_tool("shutdown_kernel", {})).content[0].text
        assert text == "The kernel was shut down."
        import psutil

        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
        result = await run(client, "'kept' in globals()")
        assert result.content[0].text == "False"


async def test_large_images_are_downscaled_and_results_stay_under_a_mebibyte(
    serve_http: Callable[..., Any],
) -> None:
    base = serve_http(image_max_bytes=100_000, output_cap_bytes=4 * 1024 * 1024)
    code = (
        "import numpy as np, io\nfrom PIL import Image\nfrom IPython.display import display\n"
        "rng = np.random.default_rng(0)\n"
        "for _ in range(4):\n"
        "    buf = io.BytesIO()\n"
        "    pixels = rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)\n"
        "    Image.fromarray(pixels).save(buf, 'PNG')\n"
        "    display(Image.open(io.BytesIO(buf.getvalue())))"
    )
    async with http_client(base, "big-images") as client:
        result = await run(client, code, timeout=60)
    assert result.structured_content["status"] == "ok"
    images = [c for c in result.content if c.type == "image"]
    for image in images:
        assert image.mime_type == "image/jpeg"
        assert len(image.data) <= 100_000
    import json

    size = len(json.dumps(result.structured_content)) + sum(len(i.data) for i in images)
    assert size < 1024 * 1024
    kept = [o for o in result.structured_content["outputs"] if "image/png" in o.get("data", {})]
    assert kept, [
        (o["output_type"], list(o.get("data", {}))) for o in result.structured_content["outputs"]
    ]


async def test_modern_clients_list_skills_through_the_extension(
    serve_http: Callable[..., Any],
) -> None:
    from fastmcp.skills import SkillsClientExtension

    base = serve_http()
    transport = StreamableHttpTransport(f"{base}/mcp")
    async with Client(transport, extensions=[SkillsClientExtension()]) as client:
        assert client.protocol_version == "2026-07-28"
        uris = {skill.uri for skill in await client.list_skills()}
    served = {f"skill://{p.name}/SKILL.md" for p in REPO_SKILLS.iterdir() if p.is_dir()}
    assert uris == {u for u in served if (REPO_SKILLS / u[8:-9] / "SKILL.md").is_file()}


async def test_readme_example_with_the_official_sdk(serve_http: Callable[..., Any]) -> None:
    from mcp import Client as SdkClient

    base = serve_http()
    async with SdkClient(f"{base}/mcp") as client:
        handle = (await client.call_tool("new_session", {})).structured_content["session"]
        await client.call_tool("execute_code", {"code": "kept = 41", "session": handle})
        result = await client.call_tool("execute_code", {"code": "kept + 1", "session": handle})
        assert result.content[0].text == "42"
