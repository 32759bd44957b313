"""kernel_mcp's HTTP file routes: the token, the size bound, paths kept in the folder."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastmcp import Client
from fastmcp.client.transports import StreamableHttpTransport

pytestmark = pytest.mark.kernel

AUTH = {"Authorization": "Bearer s3cret"}


async def test_file_routes_need_the_token(serve_http: Callable[..., str]) -> None:
    base = serve_http(token="s3cret")
    async with httpx.AsyncClient(base_url=base) as http:
        for method, path in [
            ("GET", "/sessions/f1/files"),
            ("PUT", "/sessions/f1/files/a.txt"),
            ("GET", "/sessions/f1/files/a.txt"),
            ("DELETE", "/sessions/f1/files/a.txt"),
        ]:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                denied = await http.request(method, path, content=b"x", headers=headers)
                assert denied.status_code == 401, (method, path)
                assert denied.json()["error"]["code"] == "invalid_token"
        put = await http.put("/sessions/f1/files/sub/a.txt", content=b"hello", headers=AUTH)
        assert put.status_code == 201
        assert put.json()["path"] == "sub/a.txt"
        assert put.json()["kernel_path"] == "/home/session/sub/a.txt"
        got = await http.get("/sessions/f1/files/sub/a.txt", headers=AUTH)
        assert got.content == b"hello"
        assert got.headers["content-length"] == "5"
        listed = (await http.get("/sessions/f1/files", headers=AUTH)).json()
        assert [(f["path"], f["size"]) for f in listed["files"]] == [("sub/a.txt", 5)]
        deleted = await http.delete("/sessions/f1/files/sub/a.txt", headers=AUTH)
        assert deleted.json()["deleted"] == "file"
        missing = await http.get("/sessions/f1/files/sub/a.txt", headers=AUTH)
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "file_not_found"
        # A session without a folder yet has no such file either (not a bad path).
        for method in ("GET", "DELETE"):
            nothing = await http.request(method, "/sessions/f-new/files/a.txt", headers=AUTH)
            assert nothing.status_code == 404, (method, nothing.text)
            assert nothing.json()["error"]["code"] == "file_not_found"


async def test_uploads_are_bounded_and_stay_in_the_folder(
    serve_http: Callable[..., str], short_tmp: Path
) -> None:
    base = serve_http(upload_max_bytes=1000)
    staging = short_tmp / "ws" / ".incoming"

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"y" * 500

    async with httpx.AsyncClient(base_url=base) as http:
        declared = await http.put("/sessions/f2/files/big.bin", content=b"x" * 2000)
        assert declared.status_code == 413
        streamed = await http.put("/sessions/f2/files/big.bin", content=chunks())
        assert streamed.status_code == 413
        assert list(staging.iterdir()) == [], "a refused upload leaves nothing staged"
        # httpx resolves a literal "../" itself: the request misses the route.
        normalised = await http.put("/sessions/f2/files/../up.txt", content=b"x")
        assert normalised.status_code == 404
        for path in ["%2e%2e/up.txt", "..%2Fup.txt", "%2Fabs.txt", "a%00b.txt"]:
            refused = await http.put(f"/sessions/f2/files/{path}", content=b"x")
            assert refused.status_code == 400, path
            assert refused.json()["error"]["code"] == "invalid_path"
        bad_session = await http.get("/sessions/.hidden/files")
        assert bad_session.status_code == 400
        assert (await http.get("/sessions/f2/files")).json()["files"] == []
    assert not (short_tmp / "ws" / "up.txt").exists()
    assert not (short_tmp / "up.txt").exists()


@pytest.mark.gateway
async def test_the_kernel_finds_an_upload_where_it_is_told(serve_http: Callable[..., str]) -> None:
    base = serve_http()
    async with httpx.AsyncClient(base_url=base) as http:
        put = await http.put("/sessions/f3/files/data/in.txt", content=b"forty-two")
        assert put.status_code == 201
    kernel_path = put.json()["kernel_path"]
    transport = StreamableHttpTransport(f"{base}/mcp", headers={"X-Session-Id": "f3"})
    async with Client(transport, mode="legacy") as client:
        result: Any = await client.call_tool(
            "execute_code", {"code": f"print(open({kernel_path!r}).read())"}
        )
        await client.call_tool("shutdown_kernel", {})
    assert result.content[0].text.strip() == "forty-two"


async def test_a_very_deep_tree_is_listed_up_to_a_depth_and_marked_truncated(
    serve_http: Callable[..., str], short_tmp: Path
) -> None:
    # Kernel code can nest folders far past any recursion limit (2,200 characters here).
    base = serve_http()
    folder = deepest = short_tmp / "ws" / "deep"
    folder.mkdir(parents=True)
    for _ in range(1100):
        deepest /= "d"
        deepest.mkdir()
    (deepest / "bottom.txt").write_text("b")
    (folder / "top.txt").write_text("t")
    (folder / "d" / "d" / "near.txt").write_text("n")
    async with httpx.AsyncClient(base_url=base) as http:
        listed = await http.get("/sessions/deep/files")
        assert listed.status_code == 200, listed.text
        body = listed.json()
        paths = [f["path"] for f in body["files"]]
        assert paths == ["d/d/near.txt", "top.txt"], "the bottom file is past the depth bound"
        assert body["truncated"] is True, "a listing that left folders unread says so"
        assert body["limit_reached"] is False, "what it lists is all there is above the depth"
        flat = await http.put("/sessions/deep2/files/a.txt", content=b"x")
        assert flat.status_code == 201
        assert (await http.get("/sessions/deep2/files")).json()["truncated"] is False
        removed = await http.delete("/sessions/deep/files/d")
        assert removed.status_code == 200, removed.text
        assert [f["path"] for f in (await http.get("/sessions/deep/files")).json()["files"]] == [
            "top.txt"
        ]


def test_a_deep_tree_is_listed_and_removed_with_few_descriptors(short_tmp: Path) -> None:
    # One descriptor per level would run out under a common limit of open files (64 here).
    folder = deepest = short_tmp / "deep"
    folder.mkdir()
    for _ in range(400):
        deepest /= "d"
        deepest.mkdir()
    (deepest / "bottom.txt").write_text("b")
    (folder / "d" / "top.txt").write_text("t")
    script = (
        "import resource, sys\n"
        "from pathlib import Path\n"
        "from kernel_mcp.files import SessionFiles, remove_folder\n"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))\n"
        "folder = Path(sys.argv[1])\n"
        "entries, stop = SessionFiles(folder, 1000, 1000).walk()\n"
        "print([e['path'] for e in entries], stop)\n"
        "remove_folder(folder)\n"
        "print(folder.exists())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(folder)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["['d/top.txt'] depth", "False"]
