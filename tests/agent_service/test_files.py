"""Session files over the API: upload, list, download, delete, attachments in chat, and the
files a turn wrote, through the openai SDK and raw HTTP, against real kernels."""

from __future__ import annotations

import asyncio
import base64
import csv
import hashlib
import io
import os
import uuid
from typing import Any
from urllib.parse import quote

import httpx
import openai
import pytest

from kernel_agent_pytest.scripted_llm import Gate, Hold, Text, ToolCall

from .conftest import Stack

pytestmark = pytest.mark.kernel

MODEL = "kernel-agent"
ALICE, BOB = "k-alice", "k-bob"
SECRET = "a-service-secret-not-a-client-key"
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _multipart(parts: list[tuple[str, bytes, bytes | None]]) -> tuple[bytes, str]:
    """A multipart body with raw (unescaped) names: (field, value, filename or None)."""
    boundary = uuid.uuid4().hex
    body = b""
    for field, value, filename in parts:
        disposition = b'form-data; name="' + field.encode() + b'"'
        if filename is not None:
            disposition += b'; filename="' + filename + b'"'
        body += b"--" + boundary.encode() + b"\r\nContent-Disposition: " + disposition + b"\r\n"
        kind = b"Content-Type: application/octet-stream\r\n" if filename is not None else b""
        body += kind + b"\r\n"
        body += value + b"\r\n"
    body += b"--" + boundary.encode() + b"--\r\n"
    return body, f"multipart/form-data; boundary={boundary}"


async def _upload(http: httpx.AsyncClient, sid: str, parts: list[Any], **kw: Any) -> httpx.Response:
    body, content_type = _multipart(parts)
    headers = {"Content-Type": content_type, **kw.pop("headers", {})}
    return await http.post(f"/v1/sessions/{sid}/files", content=body, headers=headers, **kw)


def _listed(client: openai.OpenAI, sid: str) -> dict[str, dict[str, Any]]:
    body = client.get(f"/sessions/{sid}/files", cast_to=object)
    assert isinstance(body, dict)
    return {f["path"]: f for f in body["data"]}


async def test_upload_several_files_then_list_download_and_delete(stack: Stack) -> None:
    table = b"city,sales\nOslo,3\nLima,5\n"
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
        uploaded = await http.post(
            "/v1/sessions/files-1/files",
            files=[
                ("files", ("sales.csv", table, "text/csv")),
                ("files", ("notes.txt", b"hello", "text/plain")),
            ],
            data={"folder": "data/in"},
        )
        assert uploaded.status_code == 201, uploaded.text
        saved = {f["path"]: f for f in uploaded.json()["data"]}
        assert set(saved) == {"data/in/sales.csv", "data/in/notes.txt"}
        assert saved["data/in/sales.csv"]["size"] == len(table)
        assert saved["data/in/sales.csv"]["kernel_path"] == "/home/session/data/in/sales.csv"

        listed = _listed(stack.client, "files-1")
        assert listed["data/in/sales.csv"]["size"] == len(table)
        assert listed["data/in/notes.txt"]["modified"].endswith("+00:00")

        download = await http.get("/v1/sessions/files-1/files/data/in/sales.csv")
        assert download.status_code == 200
        assert download.content == table
        assert download.headers["content-type"].startswith("text/csv")
        assert 'filename="sales.csv"' in download.headers["content-disposition"]

    # The kernel reads what was uploaded, at the path it was told.
    run = stack.client.post(
        "/sessions/files-1/execute",
        body={"code": "print(open('/home/session/data/in/notes.txt').read())"},
        cast_to=object,
    )
    assert isinstance(run, dict)
    assert run["text"].strip() == "hello"

    deleted = stack.client.delete("/sessions/files-1/files/data/in/notes.txt", cast_to=object)
    assert deleted == {"path": "data/in/notes.txt", "object": "session.file", "deleted": True,
                       "type": "file"}  # fmt: skip
    assert set(_listed(stack.client, "files-1")) == {"data/in/sales.csv"}
    with pytest.raises(openai.NotFoundError) as missing:
        stack.client.get("/sessions/files-1/files/data/in/notes.txt", cast_to=object)
    assert missing.value.code == "file_not_found"


async def test_a_large_file_goes_in_and_out_whole(stack: Stack) -> None:
    data = os.urandom(12 * 1024 * 1024 + 7)  # over the 2 MB chat body limit, many chunks
    async with httpx.AsyncClient(base_url=stack.url, timeout=120) as http:
        uploaded = await http.post(
            "/v1/sessions/large-1/files", files=[("files", ("blob.bin", data))]
        )
        assert uploaded.status_code == 201, uploaded.text
        assert uploaded.json()["data"][0]["size"] == len(data)
        digest = hashlib.sha256()
        async with http.stream("GET", "/v1/sessions/large-1/files/blob.bin") as download:
            assert download.headers["content-length"] == str(len(data))
            async for chunk in download.aiter_bytes():
                digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()


async def test_the_model_is_told_of_uploads_on_its_next_turn(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
        uploaded = await http.post(
            "/v1/sessions/told-1/files",
            files=[("files", ("prices.csv", b"item,price\ntea,4\n", "text/csv"))],
        )
        assert uploaded.status_code == 201, uploaded.text
    stack.llm.script(
        ToolCall("execute_code", {"code": "import pandas as pd\nprint(pd.read_csv('prices.csv'))"}),
        Text("Tea costs 4."),
    )
    reply = stack.client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What does tea cost?"}],
        extra_headers={"X-Session-Id": "told-1"},
    )
    assert "0  tea      4" in reply.choices[0].message.content
    told = [m["content"] for m in stack.llm.requests[0]["messages"] if m["role"] == "user"]
    notes = [text for text in told if "prices.csv" in text]
    assert len(notes) == 1, told
    assert "/home/session/prices.csv" in notes[0]
    assert "uploaded" in notes[0]
    # Told once: the turn after that does not hear of it as new again.
    stack.llm.script(Text("Still 4."))
    stack.client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "And now?"}],
        extra_headers={"X-Session-Id": "told-1"},
    )
    later = [m["content"] for m in stack.llm.requests[-1]["messages"] if m["role"] == "user"]
    assert sum("prices.csv" in text for text in later) == 1
    assert later[-1] == "And now?"


async def test_an_upload_during_a_turn_is_told_on_the_next(stack: Stack) -> None:
    gate = Gate()
    stack.llm.script(Hold(gate, Text("First answer.")), Text("Second answer."))
    client = stack.new_async_client()
    first = asyncio.create_task(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Wait for it"}],
            extra_headers={"X-Session-Id": "during-1"},
        )
    )
    await stack.llm.wait_for_requests(1, within=30)
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
        uploaded = await http.post(
            "/v1/sessions/during-1/files", files=[("files", ("late.csv", b"a\n1\n"))]
        )
        assert uploaded.status_code == 201, uploaded.text
    gate.open()
    assert (await first).choices[0].message.content == "First answer."
    assert all("late.csv" not in str(m) for m in stack.llm.requests[0]["messages"])
    await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Anything new?"}],
        extra_headers={"X-Session-Id": "during-1"},
    )
    told = [m["content"] for m in stack.llm.requests[1]["messages"] if m["role"] == "user"]
    assert any("/home/session/late.csv" in text for text in told), told


async def test_uploads_over_the_limit_get_413_and_leave_nothing(start_stack) -> None:
    stack: Stack = start_stack(max_upload_bytes=4096)
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
        too_big = await http.post(
            "/v1/sessions/big-1/files", files=[("files", ("big.bin", b"x" * 8192))]
        )
        assert too_big.status_code == 413
        assert too_big.json()["error"]["code"] == "request_too_large"
        assert "AGENT_MAX_UPLOAD_BYTES" in too_big.json()["error"]["message"]
        # Without a Content-Length (chunked), it is counted as it streams.
        body, content_type = _multipart([("files", b"y" * 8192, b"chunked.bin")])

        async def chunks() -> Any:
            for start in range(0, len(body), 1000):
                yield body[start : start + 1000]

        streamed = await http.post(
            "/v1/sessions/big-1/files", content=chunks(), headers={"Content-Type": content_type}
        )
        assert streamed.status_code == 413
        assert streamed.json()["error"]["type"] == "invalid_request_error"
        small = await http.post(
            "/v1/sessions/big-1/files", files=[("files", ("small.bin", b"z" * 1000))]
        )
        assert small.status_code == 201
    assert set(_listed(stack.client, "big-1")) == {"small.bin"}
    with pytest.raises(openai.APIStatusError) as refused:
        stack.client.post(
            "/sessions/big-1/files",
            cast_to=object,
            files=[("files", ("sdk.bin", b"w" * 8192))],
            options={"headers": {"Content-Type": "multipart/form-data"}},
        )
    assert refused.value.status_code == 413


async def test_upload_names_are_sanitised_and_stay_inside(stack: Stack) -> None:
    workspace = stack.kernel_settings.workspace
    long_name = ("n" * 300 + ".csv").encode()
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
        uploaded = await _upload(
            http,
            "names-1",
            [
                ("files", b"1", b"../escape.txt"),
                ("files", b"2", b"/etc/absolute.txt"),
                ("files", b"3", b"..\\..\\windows.txt"),
                ("files", b"4", b"nul\x00byte.txt"),
                ("files", b"5", b".."),
                ("files", b"6", long_name),
            ],
        )
        assert uploaded.status_code == 201, uploaded.text
    paths = [f["path"] for f in uploaded.json()["data"]]
    assert paths[:5] == ["escape.txt", "absolute.txt", "windows.txt", "nulbyte.txt", "upload"]
    assert paths[5].endswith(".csv")
    assert len(paths[5].encode()) <= 255
    assert set(_listed(stack.client, "names-1")) == set(paths)
    folder = workspace / "names-1"
    for name in ("escape.txt", "absolute.txt", "windows.txt"):
        assert [p.parent for p in stack.root.rglob(name)] == [folder], name


async def test_target_folders_that_leave_the_session_are_refused(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
        for folder in ["../up", "/tmp", "a/../../b", "a\\..\\b", "x\x00y", "f" * 300]:
            refused = await _upload(
                http, "folders-1", [("folder", folder.encode(), None), ("files", b"z", b"z.txt")]
            )
            assert refused.status_code == 400, (folder, refused.text)
            assert refused.json()["error"]["code"] == "invalid_path"
    with pytest.raises(openai.NotFoundError):  # nothing was saved: the session was not made
        _listed(stack.client, "folders-1")
    assert not (stack.kernel_settings.workspace.parent / "b" / "z.txt").exists()


async def test_paths_outside_the_folder_and_kernel_symlinks_are_refused(stack: Stack) -> None:
    secret = stack.root / "secret.txt"  # outside the workspace: the host's, not the kernel's
    secret.write_text("host secret")
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
        made = await http.post(
            "/v1/sessions/links-1/execute",
            json={
                "code": "import os\n"
                f"os.symlink({str(secret)!r}, 'leak.txt')\n"
                f"os.symlink({str(stack.root)!r}, 'outside')\n"
                "open('inside.txt', 'w').write('ok')"
            },
        )
        assert made.status_code == 200
        assert made.json()["status"] == "ok", made.text
        for path in ["leak.txt", "outside/secret.txt"]:
            got = await http.get(f"/v1/sessions/links-1/files/{path}")
            assert got.status_code == 400, (path, got.text)
            assert "host secret" not in got.text
            assert "symlink" in got.json()["error"]["message"]
        for raw in [
            "%2e%2e/%2e%2e/secret.txt",
            "..%2F..%2Fsecret.txt",
            "%2Fetc%2Fpasswd",
            "inside.txt%00.png",
            "..%5C..%5Csecret.txt",
        ]:
            for method in ("GET", "DELETE"):
                got = await http.request(method, f"/v1/sessions/links-1/files/{raw}")
                assert got.status_code == 400, (method, raw, got.text)
                assert got.json()["error"]["code"] == "invalid_path"
        long = await http.get(f"/v1/sessions/links-1/files/{'a' * 5000}")
        assert long.status_code in (400, 404), long.text
        assert "error" in long.json()
        into_link = await _upload(
            http, "links-1", [("folder", b"outside", None), ("files", b"x", b"planted.txt")]
        )
        assert into_link.status_code == 400, into_link.text
        assert not (stack.root / "planted.txt").exists()
        listed = (await http.get("/v1/sessions/links-1/files")).json()["data"]
        kinds = {f["path"]: f["type"] for f in listed}
        assert kinds == {"inside.txt": "file", "leak.txt": "symlink", "outside": "symlink"}
        gone = await http.delete("/v1/sessions/links-1/files/leak.txt")
        assert gone.status_code == 200
        assert gone.json()["type"] == "symlink"
    assert secret.read_text() == "host secret", "the link went, not what it pointed to"
    assert "leak.txt" not in _listed(stack.client, "links-1")


async def test_files_belong_to_the_sessions_key(start_stack) -> None:
    stack: Stack = start_stack(api_keys=[ALICE, BOB], secret_key=SECRET)
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
        mine = await http.post(
            "/v1/sessions/alice-f/files",
            files=[("files", ("mine.txt", b"alice's"))],
            headers=_auth(ALICE),
        )
        assert mine.status_code == 201
        for method, path in [
            ("GET", "/v1/sessions/alice-f/files"),
            ("GET", "/v1/sessions/alice-f/files/mine.txt"),
            ("DELETE", "/v1/sessions/alice-f/files/mine.txt"),
        ]:
            other = await http.request(method, path, headers=_auth(BOB))
            assert other.status_code == 404, (method, path)
            assert other.json()["error"]["code"] == "session_not_found"
            assert (await http.request(method, path)).status_code == 401
        planted = await http.post(
            "/v1/sessions/alice-f/files",
            files=[("files", ("bob.txt", b"bob's"))],
            headers=_auth(BOB),
        )
        assert planted.status_code == 404
        assert (await http.get("/v1/sessions/alice-f/files/mine.txt?sig=forged")).status_code == 401
    alice = stack.new_client(api_key=ALICE)
    assert set(_listed(alice, "alice-f")) == {"mine.txt"}
    bob = stack.new_client(api_key=BOB, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        _listed(bob, "alice-f")


async def test_file_and_image_parts_of_a_message_are_saved(stack: Stack) -> None:
    table = b"a,b\n1,2\n"
    stack.llm.script(Text("Got them."))
    reply = await stack.new_async_client().chat.completions.create(
        model=MODEL,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Here are my files"},
                    {
                        "type": "file",
                        "file": {
                            "filename": "../table.csv",
                            "file_data": "data:text/csv;base64," + base64.b64encode(table).decode(),
                        },
                    },
                    {
                        "type": "image_url",
                        "image_url": {
                            "url": "data:image/png;base64," + base64.b64encode(PNG).decode()
                        },
                    },
                ],
            }
        ],
        extra_headers={"X-Session-Id": "parts-1"},
    )
    content = reply.choices[0].message.content
    assert "table.csv" in content
    assert content.endswith("Got them.")
    listed = _listed(stack.client, "parts-1")
    images = [p for p in listed if p.startswith("image-") and p.endswith(".png")]
    assert "table.csv" in listed
    assert len(images) == 1
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
        assert (await http.get("/v1/sessions/parts-1/files/table.csv")).content == table
        assert (await http.get(f"/v1/sessions/parts-1/files/{images[0]}")).content == PNG
    sent = stack.llm.requests[0]["messages"]
    assert sent[-2] == {"role": "user", "content": "Here are my files"}
    assert sent[-1]["role"] == "user"
    assert "/home/session/table.csv" in sent[-1]["content"]
    assert f"/home/session/{images[0]}" in sent[-1]["content"]
    # A part that cannot be read is refused before anything runs.
    with pytest.raises(openai.BadRequestError) as bad:
        await stack.new_async_client(max_retries=0).chat.completions.create(
            model=MODEL,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "file", "file": {"filename": "x.csv", "file_data": "data:,%"}},
                        {"type": "file", "file": {"file_id": "file-abc"}},
                    ],
                }
            ],
            extra_headers={"X-Session-Id": "parts-1"},
        )
    assert bad.value.code == "unsupported_file_part"


PLOT_AND_TABLE = """\
import csv
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
with open("out/summary.csv", "w", newline="") as handle:
    csv.writer(handle).writerows([["x", "y"], [1, 2], [3, 4]])
plt.plot([1, 3], [2, 4])
plt.savefig("out/chart.png")
print("written")
"""


async def test_files_a_turn_writes_are_linked_in_its_reply(start_stack) -> None:
    stack: Stack = start_stack(api_keys=[ALICE], secret_key=SECRET)
    stack.llm.script(
        ToolCall("execute_code", {"code": "import os; os.makedirs('out', exist_ok=True)"}),
        ToolCall("execute_code", {"code": PLOT_AND_TABLE}),
        Text("Saved a table and a chart."),
    )
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
        before = await http.post(
            "/v1/sessions/made-1/files",
            files=[("files", ("input.txt", b"unchanged"))],
            headers=_auth(ALICE),
        )
        assert before.status_code == 201
    stream = await stack.new_async_client(api_key=ALICE).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Make a table and a chart"}],
        stream=True,
        extra_headers={"X-Session-Id": "made-1"},
    )
    content = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert "**Files written in this turn:**" in content
    links = {
        line.split("[")[1].split("]")[0]: line.split("](")[1].split(")")[0]
        for line in content.splitlines()
        if line.startswith("- [")
    }
    assert set(links) == {"out/summary.csv", "out/chart.png"}, content
    async with httpx.AsyncClient(timeout=60) as browser:  # no key: the signature is enough
        table = await browser.get(links["out/summary.csv"])
        chart = await browser.get(links["out/chart.png"])
        unsigned = await browser.get(links["out/chart.png"].split("?")[0])
    assert table.status_code == 200, table.text
    assert list(csv.reader(io.StringIO(table.text))) == [["x", "y"], ["1", "2"], ["3", "4"]]
    assert chart.status_code == 200
    assert chart.content.startswith(b"\x89PNG")
    assert chart.headers["content-type"] == "image/png"
    assert unsigned.status_code == 401
    async with httpx.AsyncClient(base_url=stack.url, timeout=60, headers=_auth(ALICE)) as http:
        events = (await http.get("/v1/sessions/made-1")).json()["events"]
        notebook = (await http.get("/v1/sessions/made-1/notebook")).text
    written = [e for e in events if e["type"] == "files"]
    assert len(written) == 1
    assert [f["path"] for f in written[0]["files"]] == ["out/chart.png", "out/summary.csv"]
    assert "Files written in this turn" in notebook
    assert "out/summary.csv" in notebook
    # A turn that writes nothing lists nothing.
    stack.llm.script(ToolCall("execute_code", {"code": "1 + 1"}), Text("Two."))
    quiet = await stack.new_async_client(api_key=ALICE).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Add"}],
        extra_headers={"X-Session-Id": "made-1"},
    )
    assert "Files written" not in quiet.choices[0].message.content


async def test_files_of_a_session_go_with_it(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
        await http.post("/v1/sessions/gone-1/files", files=[("files", ("a.txt", b"a"))])
        assert (await http.delete("/v1/sessions/gone-1")).status_code == 200
    assert not (stack.kernel_settings.workspace / "gone-1").exists()
    with pytest.raises(openai.NotFoundError):
        _listed(stack.client, "gone-1")


async def test_a_session_whose_kernel_nested_and_locked_folders_lists_and_deletes(
    start_stack,
) -> None:
    stack: Stack = start_stack(secret_key=SECRET)
    # Model code can nest folders past any recursion limit, and lock folders with chmod.
    code = (
        "import os\nstart = os.getcwd()\nfor _ in range(1100):\n"
        "    os.mkdir('d'); os.chdir('d')\n"
        "open('bottom.txt', 'w').write('b')\nos.chdir(start)\n"
        "os.makedirs('locked/inner'); open('locked/inner/f.txt', 'w').write('f')\n"
        "os.chmod('locked/inner', 0); os.chmod('locked', 0o500)\nprint('built')"
    )
    stack.llm.script(ToolCall("execute_code", {"code": code}), Text("Built."))
    reply = await stack.new_async_client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "nest"}],
        extra_headers={"X-Session-Id": "deep-1"},
    )
    assert "built" in reply.choices[0].message.content
    # Folders left unread below the depth bound hide no file a later turn writes.
    stack.llm.script(
        ToolCall("execute_code", {"code": "open('report.csv', 'w').write('r')"}), Text("Done.")
    )
    later = await stack.new_async_client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "report"}],
        extra_headers={"X-Session-Id": "deep-1"},
    )
    assert "**Files written in this turn:**\n- [report.csv]" in later.choices[0].message.content
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
        listed = await http.get("/v1/sessions/deep-1/files")
        assert listed.status_code == 200, listed.text
        assert listed.json()["truncated"] is True, "the folders past the depth bound are unread"
        paths = [f["path"] for f in listed.json()["data"]]
        assert "locked/inner/f.txt" in paths
        assert not any(p.endswith("bottom.txt") for p in paths)
        folder = await http.delete("/v1/sessions/deep-1/files/locked")
        assert folder.status_code == 200, folder.text
        deleted = await http.delete("/v1/sessions/deep-1")
        assert deleted.status_code == 200, deleted.text
        assert deleted.json()["deleted"] is True
    assert not (stack.kernel_settings.workspace / "deep-1").exists()


async def test_files_past_a_cut_short_listing_are_not_claimed_as_written(start_stack) -> None:
    # The folder holds more files than one listing shows (5 here): deleting the first ones
    # brings older files into view, which this turn did not write.
    stack: Stack = start_stack(secret_key=SECRET, kernel_mcp={"list_max_entries": 5})
    made = "for i in range(8):\n    open(f'f{i}.txt', 'w').write(str(i))"
    stack.llm.script(ToolCall("execute_code", {"code": made}), Text("Made."))
    await stack.new_async_client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "make"}],
        extra_headers={"X-Session-Id": "cut-1"},
    )
    swap = "import os\nos.remove('f0.txt'); os.remove('f1.txt')\nopen('a.txt', 'w').write('a')"
    stack.llm.script(ToolCall("execute_code", {"code": swap}), Text("Swapped."))
    reply = await stack.new_async_client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "swap"}],
        extra_headers={"X-Session-Id": "cut-1"},
    )
    content = reply.choices[0].message.content
    assert "**Files written in this turn:**\n- [a.txt]" in content
    assert "f5.txt" not in content, "an older file, merely brought into view"
    assert "f6.txt" not in content


def test_paths_in_links_are_quoted(stack: Stack) -> None:
    from agent_service.files import file_link

    link = file_link(stack.services, "http://h/", "s1", "a b/#c?.csv")
    assert link == f"http://h/v1/sessions/s1/files/{quote('a b/#c?.csv', safe='/')}"


async def test_the_file_routes_are_described_in_openapi(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
        spec = (await http.get("/openapi.json")).json()
    listing = spec["paths"]["/v1/sessions/{session_id}/files"]
    one = spec["paths"]["/v1/sessions/{session_id}/files/{path}"]
    assert set(listing) == {"get", "post"}
    assert set(one) == {"get", "delete"}
    upload = listing["post"]
    form = upload["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert set(form) == {"files", "folder"}
    assert "AGENT_MAX_UPLOAD_BYTES" in upload["responses"]["413"]["description"]
    assert "symlink" in one["get"]["responses"]["400"]["description"]


async def test_a_turn_whose_folder_could_not_be_listed_claims_no_files(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent_service.errors import KernelServiceError

    files = stack.services.agent.files
    real = files.listing
    calls = 0

    async def first_fails(session_id: str) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise KernelServiceError("listing refused, once")
        return await real(session_id)

    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
        await http.post("/v1/sessions/unlisted-1/files", files=[("files", ("old.txt", b"o"))])
    monkeypatch.setattr(files, "listing", first_fails)
    stack.llm.script(
        ToolCall("execute_code", {"code": "open('new.txt', 'w').write('n')"}), Text("Wrote it.")
    )
    reply = stack.client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a file"}],
        extra_headers={"X-Session-Id": "unlisted-1"},
    )
    assert calls == 1, "not listed again at the end: nothing to compare with"
    assert "Files written" not in reply.choices[0].message.content
    assert reply.choices[0].message.content.endswith("Wrote it.")


async def test_a_file_uploaded_during_a_turn_is_not_listed_as_written_by_it(
    stack: Stack,
) -> None:
    gate = Gate()
    stack.llm.script(
        ToolCall("execute_code", {"code": "open('out.txt', 'w').write('x')"}),
        Hold(gate, Text("Wrote it.")),
    )
    client = stack.new_async_client()
    turn = asyncio.create_task(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "write a file"}],
            extra_headers={"X-Session-Id": "during-2"},
        )
    )
    await stack.llm.wait_for_requests(2)  # the code ran; the model holds its answer
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
        uploaded = await http.post(
            "/v1/sessions/during-2/files", files=[("files", ("late.csv", b"a\n1\n"))]
        )
        assert uploaded.status_code == 201, uploaded.text
    gate.open()
    content = (await turn).choices[0].message.content
    written = content.split("**Files written in this turn:**")[1]
    assert "[out.txt](" in written
    assert "late.csv" not in written, "the user's upload, not the turn's code"


async def test_files_saved_before_a_refused_one_are_told_to_the_model(
    agent_factory: Any,
) -> None:
    stack: Stack = agent_factory(kernel_mcp={"upload_max_bytes": 4096})
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
        refused = await http.post(
            "/v1/sessions/part-1/files",
            files=[("files", ("small.csv", b"a\n1\n")), ("files", ("big.bin", b"x" * 8192))],
        )
        assert refused.status_code == 413, refused.text
        listed = (await http.get("/v1/sessions/part-1/files")).json()
        assert [f["path"] for f in listed["data"]] == ["small.csv"], "the first one stays"
    stack.llm.script(Text("Noted."))
    await stack.new_async_client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "what arrived?"}],
        extra_headers={"X-Session-Id": "part-1"},
    )
    told = [m["content"] for m in stack.llm.requests[0]["messages"] if m["role"] == "user"]
    assert any("small.csv" in text for text in told), "so the model hears of it"
