"""What only a gateway has: replicas sharing kernels, a gateway that dies, REST and WebSocket.

Two kernel_mcp replicas here are two SessionManagers (or two HTTP servers) with the same
workspace and the same gateway, as replicas share a volume and a gateway in production.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastmcp import Client
from fastmcp.client.transports import StreamableHttpTransport

from kernel_mcp.errors import CapacityError, KernelError
from kernel_mcp.gateway_kernel import derived_kernel_id
from kernel_mcp.sessions import SessionManager

from .conftest import LiveText, kernel_cwd, plain_of, text_of, wait_until, wait_until_async
from .gateways import ENTERPRISE_GATEWAY, KERNEL_GATEWAY, KINDS, Gateway

pytestmark = pytest.mark.kernel

ON_EG = pytest.mark.parametrize("backend_kind", [ENTERPRISE_GATEWAY])
ON_BOTH = pytest.mark.parametrize("backend_kind", list(KINDS))
RUNNING = "import time\nprint('running', flush=True)\ntime.sleep(3600)"


def test_derived_kernel_ids_are_stable_version_4_uuids() -> None:
    namespace = uuid.uuid4()
    first = derived_kernel_id(namespace, "session-1")
    assert first == derived_kernel_id(namespace, "session-1")
    assert first != derived_kernel_id(namespace, "session-2")
    assert first != derived_kernel_id(uuid.uuid4(), "session-1")
    assert uuid.UUID(first).version == 4
    assert str(uuid.UUID(first, version=4)) == first, "Enterprise Gateway's KERNEL_ID check"


@ON_EG
async def test_a_session_continues_on_another_replica(start_manager: Any) -> None:
    one: SessionManager = await start_manager()
    two: SessionManager = await start_manager()
    first = await one.execute("s1", "x = 41")
    assert first.status == "ok"
    result = await two.execute("s1", "x + 1")
    assert plain_of(result.outputs) == "42"
    assert not result.state_lost
    assert result.execution_count == first.execution_count + 1
    assert (await one.kernel_info("s1")).kernel_id == (await two.kernel_info("s1")).kernel_id
    # A replica that stops lets the kernel run: a new replica takes the session over.
    await one.close()
    three: SessionManager = await start_manager()
    after = await three.execute("s1", "x")
    assert plain_of(after.outputs) == "41"
    assert not after.state_lost


@ON_EG
async def test_calls_of_one_session_on_two_replicas_run_one_at_a_time(start_manager: Any) -> None:
    one: SessionManager = await start_manager()
    two: SessionManager = await start_manager()
    await one.execute("s1", "log = []; running = 0")
    code = (
        "running += 1\nassert running == 1, 'two calls at once'\n"
        "import time; time.sleep(0.05); log.append({n}); running -= 1\nprint({n})"
    )
    calls = [(one if n % 2 else two).execute("s1", code.format(n=n)) for n in range(8)]
    results = await asyncio.gather(*calls)
    for n, result in enumerate(results):
        assert result.status == "ok", result.outputs
        assert text_of(result.outputs) == f"{n}\n", "each result holds its own output"
    final = await one.execute("s1", "sorted(log)")
    assert plain_of(final.outputs) == str(list(range(8)))


@ON_EG
async def test_a_restart_through_one_replica_is_told_by_the_other(start_manager: Any) -> None:
    one: SessionManager = await start_manager()
    two: SessionManager = await start_manager()
    await one.execute("s1", "x = 1")
    assert plain_of((await two.execute("s1", "x")).outputs) == "1"
    await one.restart("s1")
    result = await two.execute("s1", "'x' in globals()")
    assert plain_of(result.outputs) == "False"
    assert result.state_lost
    assert "restarted" in (result.message or "")
    assert not (await two.execute("s1", "1")).state_lost


@ON_EG
async def test_a_restart_through_a_replica_that_never_ran_the_session(start_manager: Any) -> None:
    one: SessionManager = await start_manager()
    two: SessionManager = await start_manager()
    await one.execute("s1", "x = 1")
    before = await one.kernel_info("s1")
    await two.restart("s1")  # a load balancer sent the restart to the other replica
    asked = await two.execute("s1", "'x' in globals()")
    assert plain_of(asked.outputs) == "False", "the restart really happened"
    assert not asked.state_lost, "asked for through this replica: not a surprise"
    assert (await two.kernel_info("s1")).generation == before.generation + 1
    told = await one.execute("s1", "'x' in globals()")
    assert plain_of(told.outputs) == "False"
    assert told.state_lost
    assert "restarted" in (told.message or "")


@ON_EG
async def test_a_hung_cell_is_stopped_through_another_replica(start_manager: Any) -> None:
    one: SessionManager = await start_manager()
    two: SessionManager = await start_manager()
    await one.execute("s1", "kept = 1")
    live = LiveText()
    task = asyncio.create_task(one.execute("s1", RUNNING, timeout=300, on_output=live))
    await live.wait_for("running")
    assert await two.interrupt("s1"), "the other replica reaches the kernel"
    interrupted = await task
    assert interrupted.status == "error"
    assert interrupted.outputs[-1]["ename"] == "KeyboardInterrupt"
    assert plain_of((await two.execute("s1", "kept")).outputs) == "1", "state survives"

    live = LiveText()
    task = asyncio.create_task(one.execute("s1", RUNNING, timeout=300, on_output=live))
    await live.wait_for("running")
    await two.restart("s1")  # does not wait for the hung cell's lock
    stopped = await task
    after = await two.execute("s1", "'kept' in globals()")
    assert plain_of(after.outputs) == "False"
    told = stopped
    if not stopped.state_lost:
        # The gateway's restart interrupted the cell before stopping the kernel: the cell
        # ended as interrupted, and the next call on that replica is told of the restart.
        assert stopped.outputs[-1]["ename"] == "KeyboardInterrupt"
        told = await one.execute("s1", "'kept' in globals()")
        assert plain_of(told.outputs) == "False"
    assert told.state_lost
    assert "restarted" in (told.message or "")


@ON_EG
async def test_interrupting_a_session_without_a_kernel_says_so(start_manager: Any) -> None:
    one: SessionManager = await start_manager()
    assert not await one.interrupt("never-started")


@ON_EG
async def test_a_warm_kernel_serves_a_session_on_every_replica(start_manager: Any) -> None:
    one: SessionManager = await start_manager(pool_size=1)
    two: SessionManager = await start_manager()
    await wait_until(lambda: one.stats()["pool_ready"] == 1, "the warm pool")
    first = await one.execute("s1", "import os; x = 41; os.getcwd()")
    assert plain_of(first.outputs) == repr(kernel_cwd(one, "s1")), "moved to the session"
    claimed = await one.kernel_info("s1")
    derived = derived_kernel_id(one.settings.gateway_namespace, "s1")
    assert claimed.kernel_id != derived, "a pooled kernel, not one started for the session"
    # Its record names it: the other replica finds it, and so does a restart through it.
    result = await two.execute("s1", "x + 1")
    assert plain_of(result.outputs) == "42"
    assert not result.state_lost
    assert (await two.kernel_info("s1")).kernel_id == claimed.kernel_id
    await wait_until(lambda: one.stats()["pool_ready"] == 1, "the pool to refill")
    await two.restart("s1")
    told = await one.execute("s1", "'x' in globals()")
    assert plain_of(told.outputs) == "False"
    assert told.state_lost
    # Shut down on purpose, the session starts again without a notice, in a new incarnation.
    await two.close()
    assert await one.close_session("s1")
    three: SessionManager = await start_manager()
    again = await three.execute("s1", "'x' in globals()")
    assert plain_of(again.outputs) == "False"
    assert not again.state_lost
    after = await three.kernel_info("s1")
    assert (after.kernel_id, after.generation) != (claimed.kernel_id, claimed.generation)


@ON_EG
async def test_a_session_deleted_through_another_replica_starts_empty(
    start_manager: Any, gateway: Gateway
) -> None:
    one: SessionManager = await start_manager(pool_size=1)
    two: SessionManager = await start_manager()
    await one.execute("s1", "secret = 'of the deleted session'")
    old = (await one.kernel_info("s1")).kernel_id
    await two.delete_session("s1")  # a replica that never ran it
    assert old not in await gateway.kernels(), "its kernel is gone from the gateway"
    three: SessionManager = await start_manager()
    result = await three.execute("s1", "'secret' in globals()")
    assert plain_of(result.outputs) == "False", "a new session of that id starts empty"
    assert not result.state_lost, "deleted on purpose: nobody is told"


@ON_EG
async def test_a_record_naming_another_process_costs_one_handshake(start_manager: Any) -> None:
    """What a replica does after another replica's restart, without the race of one."""
    one: SessionManager = await start_manager()
    await one.execute("s1", "x = 1")
    path = one.settings.workspace / ".kernels" / "s1.lock"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "process": "another-process"}))
    result = await one.execute("s1", "x + 1")
    assert plain_of(result.outputs) == "2", "handshake first, then the call with its output"
    assert not result.state_lost, "the kernel we hear is the one we had"
    assert json.loads(path.read_text())["process"] == record["process"], "the record is true"


async def _mcp_call(base: str, session: str, code: str) -> Any:
    transport = StreamableHttpTransport(f"{base}/mcp", headers={"X-Session-Id": session})
    async with Client(transport, mode="legacy") as client:
        return await client.call_tool("execute_code", {"code": code})


@ON_EG
async def test_two_kernel_mcp_servers_over_http_share_a_session(
    serve_http: Callable[..., Any],
) -> None:
    first = serve_http()
    second = serve_http()
    await _mcp_call(first, "shared-1", "import os; pid = os.getpid(); data = [1, 2, 3]")
    result = await _mcp_call(second, "shared-1", "sum(data), pid == os.getpid()")
    assert result.structured_content["status"] == "ok"
    assert result.content[0].text == "(6, True)"


@ON_BOTH
async def test_a_kernel_killed_on_the_gateway_is_reported_and_replaced(
    manager: SessionManager, gateway: Gateway
) -> None:
    await manager.execute("s1", "kept = 1")
    info = await manager.kernel_info("s1")
    pid = gateway.kernel_pid(info.kernel_id)
    assert pid is not None
    live = LiveText()
    task = asyncio.create_task(manager.execute("s1", RUNNING, timeout=300, on_output=live))
    await live.wait_for("running")
    os.kill(pid, signal.SIGKILL)
    result = await task
    # Seen as a death (the gateway restarts the kernel and says so), not at the deadline.
    assert result.status == "kernel_died"
    assert result.state_lost
    after = await manager.execute("s1", "import os; print(os.getcwd()); 'kept' in globals()")
    assert plain_of(after.outputs) == "False"
    assert text_of(after.outputs).strip() == str(manager.settings.workspace / "s1")
    assert gateway.kernel_pid(info.kernel_id) not in (None, pid)


@ON_BOTH
async def test_a_kernel_deleted_behind_our_back_is_found_gone(
    manager: SessionManager, gateway: Gateway
) -> None:
    await manager.execute("s1", "kept = 1")
    kernel = manager.existing("s1").kernel
    assert kernel is not None
    await gateway.delete(kernel.kernel_id)
    await wait_until(lambda: kernel.state == "dead", "the WebSocket close to be seen")
    result = await manager.execute("s1", "ran = 'yes'", timeout=60)
    assert result.status == "kernel_died"
    assert "not run" in (result.message or "")
    after = await manager.execute("s1", "'ran' in globals(), 'kept' in globals()")
    assert plain_of(after.outputs) == "(False, False)"


@ON_BOTH
async def test_restart_through_rest_keeps_the_kernel_id(manager: SessionManager) -> None:
    await manager.execute("s1", "kept = 1")
    before = await manager.kernel_info("s1")
    await manager.restart("s1")
    after = await manager.kernel_info("s1")
    assert after.kernel_id == before.kernel_id
    assert after.generation == before.generation + 1
    result = await manager.execute("s1", "import os; print(os.getcwd()); kept")
    assert text_of(result.outputs).strip() == str(manager.settings.workspace / "s1")
    assert result.outputs[-1]["ename"] == "NameError"


@ON_EG
async def test_an_idle_shared_kernel_is_culled_and_any_replica_says_so(
    start_manager: Any, gateway: Gateway
) -> None:
    one: SessionManager = await start_manager(idle_timeout=1.0, cull_interval=0.2)
    await one.execute("s1", "kept = 1")
    kernel_id = (await one.kernel_info("s1")).kernel_id
    await wait_until(lambda: one.existing("s1").kernel is None, "the cull")
    await wait_until_async(lambda: _gone(gateway, kernel_id), "the kernel to leave the gateway")
    two: SessionManager = await start_manager()
    result = await two.execute("s1", "'kept' in globals()")
    assert plain_of(result.outputs) == "False"
    assert result.state_lost
    assert "gone" in (result.message or "")


async def _gone(gateway: Gateway, kernel_id: str) -> bool:
    return kernel_id not in await gateway.kernels()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", [ENTERPRISE_GATEWAY, KERNEL_GATEWAY])
async def test_the_gateway_killed_and_restarted_mid_session(
    kind: str, start_gateway: Callable[..., Any], start_manager: Any
) -> None:
    gateway: Gateway = await start_gateway(kind)
    settings = {**gateway.settings(), "gateway_request_timeout": 5.0}
    one: SessionManager = await start_manager(**settings)
    await one.execute("s1", "kept = 1")
    kernel = one.existing("s1").kernel
    assert kernel is not None
    gateway.kill()
    await wait_until(lambda: kernel.state == "dead", "the lost gateway to be seen")
    # While the gateway is down, calls fail at once with a sentence, and nothing hangs.
    with pytest.raises(KernelError, match="gateway"):
        await one.execute("s1", "1", timeout=30)
    second: Gateway = await start_gateway(kind, port=gateway.port, token=gateway.token)
    result = await one.execute("s1", "'kept' in globals()", timeout=60)
    assert result.state_lost
    assert "gone" in (result.message or "")
    assert (await one.execute("s1", "'kept' in globals()")).status == "ok"
    if kind == ENTERPRISE_GATEWAY:
        # A replica that never saw the session still says its state is gone.
        await one.execute("s2", "kept = 2")
        second.stop()
        await start_gateway(kind, port=gateway.port, token=gateway.token)
        two: SessionManager = await start_manager(**settings)
        told = await two.execute("s2", "'kept' in globals()")
        assert plain_of(told.outputs) == "False"
        assert told.state_lost
        assert "gone" in (told.message or "")


@ON_EG
async def test_a_kernel_the_gateway_refuses_is_a_clear_error(start_manager: Any) -> None:
    # Enterprise Gateway refuses kernels for root (EG_UNAUTHORIZED_USERS).
    manager: SessionManager = await start_manager(gateway_username="root")
    with pytest.raises(CapacityError, match="gateway refused"):
        await manager.execute("s1", "1")


async def test_health_answers_while_the_gateway_is_down(
    serve_http: Callable[..., Any],
) -> None:
    base = serve_http(backend="gateway", gateway_url="http://127.0.0.1:9")
    async with httpx.AsyncClient() as client:
        health = await client.get(f"{base}/health")
    assert health.status_code == 200
    with pytest.raises(Exception, match="gateway"):
        await _mcp_call(base, "s1", "1")


@ON_EG
async def test_a_kernel_shut_down_on_purpose_comes_back_without_a_notice(
    start_manager: Any,
) -> None:
    one: SessionManager = await start_manager()
    await one.execute("s1", "kept = 1")
    before = await one.kernel_info("s1")
    assert await one.close_session("s1")
    two: SessionManager = await start_manager()
    result = await two.execute("s1", "'kept' in globals()")
    assert plain_of(result.outputs) == "False"
    assert not result.state_lost, "asked for: nobody is told"
    after = await two.kernel_info("s1")
    assert after.kernel_id == before.kernel_id, "derived from the session"
    assert after.generation > before.generation, "an incarnation never repeats"
