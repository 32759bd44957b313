"""Results always reach a client: images have their own budget, nothing exceeds 1 MiB,
and a header-less client's kernel is freed when its MCP session ends."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from kernel_schema import ExecuteResult, typed_outputs

from .mcp_clients import gone, sdk_client

pytestmark = pytest.mark.kernel

SSE_LIMIT = 1024 * 1024

# 1200x900 pixels, ~450 KB of PNG (~590 KB of base64): more than half the output cap.
SCATTER = """
import matplotlib.pyplot as plt, numpy as np
rng = np.random.default_rng(0)
fig = plt.figure(figsize=(12, 9), dpi=100)
plt.scatter(rng.random(5000), rng.random(5000), c=rng.random(5000), s=4)
plt.show()
"""


def _size(result: Any) -> int:
    return len(result.model_dump_json(by_alias=True, exclude_none=True))


async def test_a_large_plot_reaches_the_model_and_the_notebook(
    serve_http: Callable[..., Any],
) -> None:
    base = serve_http()
    async with sdk_client(base, headers={"X-Session-Id": "big-plot"}) as client:
        result = await client.call_tool("execute_code", {"code": SCATTER, "timeout": 60})
    assert not result.is_error, result.content[0].text
    typed = ExecuteResult.model_validate(result.structured_content)
    assert typed.status == "ok"
    images = [c for c in result.content if c.type == "image"]
    assert len(images) == 1, "the model sees the plot"
    assert len(images[0].data) <= 256_000
    full = [o for o in typed.outputs if "image/png" in o.get("data", {})]
    assert len(full) == 1, "the notebook gets the plot"
    assert typed.images_downscaled == 0, "at full size"
    assert len(full[0]["data"]["image/png"]) > 400_000
    assert _size(result) < SSE_LIMIT


async def test_a_plot_too_big_for_one_result_is_downscaled_and_kept_in_a_file(
    serve_http: Callable[..., Any],
) -> None:
    base = serve_http()
    code = SCATTER.replace("5000", "20000")  # ~1.5 MB of base64: more than one result holds
    async with sdk_client(base, headers={"X-Session-Id": "huge-plot"}) as client:
        result = await client.call_tool("execute_code", {"code": code, "timeout": 60})
        assert not result.is_error, result.content[0].text
        typed = ExecuteResult.model_validate(result.structured_content)
        assert [c.type for c in result.content].count("image") == 1
        (shown,) = [o for o in typed_outputs(typed.outputs) if o.output_type == "display_data"]
        assert typed.images_downscaled == 1
        note = shown.metadata["kernel_agent"]
        assert note["downscaled"]
        assert note["original_bytes"] > 1_000_000
        (small,) = [v for k, v in shown.data.items() if k.startswith("image/")]
        assert len(small) < note["original_bytes"]
        original = note["original_file"]
        listing = await client.call_tool("list_files", {"path": original.rsplit("/", 1)[0]})
        sizes = {f["path"]: f["size"] for f in listing.structured_content["files"]}
        assert sizes[original] * 4 // 3 >= note["original_bytes"] - 4, "the full image is kept"
    assert _size(result) < SSE_LIMIT


async def test_twenty_thousand_displays_fit_one_event(serve_http: Callable[..., Any]) -> None:
    base = serve_http()
    code = "from IPython.display import display\nfor i in range(20_000):\n    display(i)"
    async with sdk_client(base, headers={"X-Session-Id": "displays"}) as client:
        result = await client.call_tool("execute_code", {"code": code, "timeout": 120})
        assert _size(result) < SSE_LIMIT
        typed = ExecuteResult.model_validate(result.structured_content)
        assert typed.status == "ok"
        assert typed.truncated
        texts = [
            o["data"]["text/plain"] for o in typed.outputs if o["output_type"] == "display_data"
        ]
        assert texts[0] == "0"
        assert texts[-1] == "19999", "head and tail kept"
        assert (await client.call_tool("execute_code", {"code": "6 * 7"})).content[0].text == "42"
    assert _size(result) < SSE_LIMIT


async def test_many_large_images_and_text_fit_one_event(serve_http: Callable[..., Any]) -> None:
    base = serve_http(output_cap_bytes=8 * 1024 * 1024)
    code = (
        "import numpy as np, io\nfrom PIL import Image\nfrom IPython.display import display\n"
        "rng = np.random.default_rng(1)\n"
        "for n in range(6):\n"
        "    print('x' * 200_000)\n"
        "    buf = io.BytesIO()\n"
        "    pixels = rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)\n"
        "    Image.fromarray(pixels).save(buf, 'PNG')\n"
        "    display(Image.open(io.BytesIO(buf.getvalue())))\n"
        "raise ValueError('end ' + '\"' * 50_000)"
    )
    async with sdk_client(base, headers={"X-Session-Id": "mixed"}) as client:
        result = await client.call_tool("execute_code", {"code": code, "timeout": 60})
    typed = ExecuteResult.model_validate(result.structured_content)
    assert typed.status == "error"
    assert typed.error is not None
    assert typed.error.ename == "ValueError"
    kinds = [o["output_type"] for o in typed.outputs]
    assert kinds.count("display_data") == 6, "every image arrives, downscaled if need be"
    assert _size(result) < SSE_LIMIT
    assert json.dumps(result.structured_content)


async def test_header_less_session_kernel_is_freed_when_the_mcp_session_ends(
    serve_http: Callable[..., Any],
) -> None:
    base = serve_http()
    async with sdk_client(base, mode="legacy") as client:
        await client.call_tool("execute_code", {"code": "kept = 1"})
        info = await client.call_tool("kernel_info", {})
        pid = info.structured_content["pid"]
    # Leaving the client sent DELETE: the kernel goes now, not after the idle timeout.
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient() as http:
        while True:
            health = (await http.get(f"{base}/health")).json()
            if gone(pid) and health["kernels_running"] == 0 and health["sessions"] == 0:
                break
            assert time.monotonic() < deadline, f"kernel {pid} still running: {health}"
            await asyncio.sleep(0.1)
