"""Sessions belong to the key that made them; image links are signed and expire."""

from __future__ import annotations

import time

import httpx
import pytest
from openai import NotFoundError

from agent_service.security import ImageLinks
from kernel_agent_pytest.scripted_llm import Text, ToolCall

from .conftest import Stack

pytestmark = pytest.mark.kernel

MODEL = "kernel-agent"
ALICE, BOB, ADMIN = "k-alice", "k-bob", "k-admin"
SECRET = "a-service-secret-not-a-client-key"
PLOT = "import matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.show()"


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.both_stores
async def test_sessions_belong_to_their_key(start_stack) -> None:
    stack: Stack = start_stack(api_keys=[ALICE, BOB], admin_keys=[ADMIN], secret_key=SECRET)
    stack.llm.script(ToolCall("execute_code", {"code": "mine = 'alice'"}), Text("Kept."))
    alice = stack.new_async_client(api_key=ALICE)
    await alice.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "keep mine"}],
        extra_headers={"X-Session-Id": "alice-1"},
    )
    bob = stack.new_async_client(api_key=BOB, max_retries=0)
    with pytest.raises(NotFoundError) as info:
        await bob.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "print(mine)"}],
            extra_headers={"X-Session-Id": "alice-1"},
        )
    assert info.value.code == "session_not_found"
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
        listed = (await http.get("/v1/sessions", headers=_auth(BOB))).json()["data"]
        assert listed == []
        for method, path in [
            ("GET", "/v1/sessions/alice-1"),
            ("GET", "/v1/sessions/alice-1/notebook"),
            ("GET", "/v1/sessions/alice-1/kernel"),
            ("GET", "/v1/sessions/alice-1/outputs/3-0.png"),
            ("DELETE", "/v1/sessions/alice-1"),
        ]:
            response = await http.request(method, path, headers=_auth(BOB))
            assert response.status_code == 404, (method, path, response.text)
            assert response.json()["error"]["code"] == "session_not_found"
        run = await http.post(
            "/v1/sessions/alice-1/execute", json={"code": "mine"}, headers=_auth(BOB)
        )
        assert run.status_code == 404
        mine = (await http.get("/v1/sessions", headers=_auth(ALICE))).json()["data"]
        assert [s["id"] for s in mine] == ["alice-1"]
        everything = (await http.get("/v1/sessions", headers=_auth(ADMIN))).json()["data"]
        assert [s["id"] for s in everything] == ["alice-1"]
        assert (await http.get("/v1/sessions/alice-1", headers=_auth(ADMIN))).status_code == 200
        # Bob's own session, by the same conversation sent whole, is his, not Alice's.
        stack.llm.script(Text("Bob's answer."))
        own = await http.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "keep mine"}]},
            headers=_auth(BOB),
        )
        assert own.status_code == 200
        assert own.headers["x-session-id"] != "alice-1"
        assert (await http.get("/admin/cache-stats", headers=_auth(BOB))).status_code == 403
        assert (await http.get("/admin/cache-stats", headers=_auth(ADMIN))).status_code == 200
        deleted = await http.delete("/v1/sessions/alice-1", headers=_auth(ADMIN))
        assert deleted.status_code == 200


@pytest.mark.both_stores
async def test_image_links_are_signed_expire_and_use_no_client_key(start_stack) -> None:
    stack: Stack = start_stack(api_keys=[ALICE], secret_key=SECRET, image_link_ttl=3600)
    stack.llm.script(ToolCall("execute_code", {"code": PLOT}), Text("plotted"))
    completion = await stack.new_async_client(api_key=ALICE).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "plot"}],
        extra_headers={"X-Session-Id": "img-1"},
    )
    link = completion.choices[0].message.content.split("](")[1].split(")")[0]
    url, signature = link.split("?sig=")
    name = url.rsplit("/", 1)[1]
    assert ImageLinks(SECRET, 3600).check(signature, "img-1", name), "signed with the secret"
    past = ImageLinks(SECRET, 3600, now=lambda: time.time() - 7200).sign("img-1", name)
    with_client_key = ImageLinks(ALICE, 3600).sign("img-1", name)
    async with httpx.AsyncClient() as http:
        assert (await http.get(link)).status_code == 200
        assert (await http.get(f"{url}?sig={past}")).status_code == 401, "expired"
        assert (await http.get(f"{url}?sig={with_client_key}")).status_code == 401
        assert (await http.get(url, headers=_auth(ALICE))).status_code == 200
        other = url.replace("/img-1/", "/img-2/")
        assert (await http.get(f"{other}?sig={signature}")).status_code == 401
