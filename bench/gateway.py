"""Benchmark the gateway backend against the local backend, side by side in one run.

Starts Jupyter Enterprise Gateway and Kernel Gateway from `.gateway-venvs/` (`make
gateways`) on loopback ports, with our kernelspec (kernels on this repo's Python, the
same launcher the local backend uses), then measures through `SessionManager`:

1. execute latency of `x + 1` on one session: local, Enterprise Gateway (shared mode:
   derived ids, session lock file), Kernel Gateway, Enterprise Gateway with TCP_QUICKACK
   off (`KERNEL_MCP_GATEWAY_QUICKACK=false`), and the floor: a bare WebSocket client on
   an Enterprise Gateway kernel, in alternating chunks (the order rotates every chunk) so
   machine noise hits all alike;
2. first result of a new session, without and with a warm pool (one kernel, refilled
   before each sample), alternating local and Enterprise Gateway (shared mode: a claimed
   pooled kernel is named in the session's record).

Run: ``.venv/bin/python bench/gateway.py`` (``make bench``). Prints one JSON line on
stdout; progress goes to stderr. About 30 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import platform
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import connect

from kernel_mcp.config import Settings
from kernel_mcp.gateway_kernelspec import write_kernelspec
from kernel_mcp.gateway_protocol import V1_PROTOCOL, pack_v1, unpack_v1
from kernel_mcp.sessions import SessionManager

logger = logging.getLogger("bench.gateway")

REPO = Path(__file__).resolve().parent.parent
VENVS = Path(os.environ.get("KERNEL_AGENT_GATEWAY_VENVS", REPO / ".gateway-venvs"))
CODE = "x + 1"
N_SAMPLES = 300
N_WARMUP = 20
N_CHUNKS = 6
N_FIRST = 4


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _p(samples: list[float], q: int) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class GatewayProcess:
    """A gateway from its virtualenv, on a free loopback port, with our kernelspec."""

    def __init__(self, kind: str, folder: Path) -> None:
        self.kind = kind
        self.folder = folder
        self.port = _free_port()
        self.token = secrets.token_hex(16)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        write_kernelspec(self.folder / "share" / "kernels", ipython_dir=self.folder / "ipy")
        jupyter = str(VENVS / ("eg" if self.kind == "eg" else "kg") / "bin" / "jupyter")
        if self.kind == "eg":
            command = [
                jupyter,
                "enterprisegateway",
                "--ip=127.0.0.1",
                f"--port={self.port}",
                "--port_retries=0",
                f"--EnterpriseGatewayApp.auth_token={self.token}",
            ]
        else:
            command = [
                jupyter,
                "kernelgateway",
                "--KernelGatewayApp.ip=127.0.0.1",
                f"--KernelGatewayApp.port={self.port}",
                "--KernelGatewayApp.port_retries=0",
                f"--KernelGatewayApp.auth_token={self.token}",
            ]
        env = {
            **os.environ,
            "JUPYTER_PATH": str(self.folder / "share"),
            "JUPYTER_RUNTIME_DIR": str(self.folder / "runtime"),
            "JUPYTER_CONFIG_DIR": str(self.folder / "config"),
            "JUPYTER_DATA_DIR": str(self.folder / "data"),
        }
        with (self.folder / "gateway.log").open("ab") as log:
            self.process = subprocess.Popen(  # noqa: ASYNC220 - starts a server, returns at once
                command, cwd=self.folder, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 60
        headers = {"Authorization": f"token {self.token}"}
        async with httpx.AsyncClient(headers=headers) as client:
            while time.monotonic() < deadline:
                assert self.process.poll() is None, f"{self.kind} exited"
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{self.url}/api/kernelspecs")).status_code == 200:
                        return
                await asyncio.sleep(0.1)
        raise TimeoutError(f"{self.kind} did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()


class RawWebSocketKernel:
    """The floor: a kernel on the gateway driven by a bare WebSocket client (v1 framing,
    TCP_QUICKACK re-armed as ours does), no session layer, no supervisor."""

    def __init__(self, gateway: GatewayProcess) -> None:
        self.gateway = gateway
        self.headers = {"Authorization": f"token {gateway.token}"}
        self.kernel_id = ""
        self.ws: Any = None
        self.session = uuid.uuid4().hex

    async def start(self) -> None:
        async with httpx.AsyncClient(headers=self.headers, timeout=60) as client:
            response = await client.post(
                f"{self.gateway.url}/api/kernels",
                json={"name": "kernel-agent", "env": {"KERNEL_USERNAME": "bench"}},
            )
            response.raise_for_status()
            self.kernel_id = response.json()["id"]
        url = f"ws://127.0.0.1:{self.gateway.port}/api/kernels/{self.kernel_id}/channels"
        self.ws = await connect(
            url,
            subprotocols=[V1_PROTOCOL],  # type: ignore[list-item]
            additional_headers=self.headers,
            max_size=None,
            compression=None,
        )
        for _ in range(N_WARMUP):  # the first requests also wait for the kernel to be up
            await self.execute("x = 1")

    def _quickack(self) -> None:
        sock = self.ws.transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, "TCP_QUICKACK", 12), 1)

    async def execute(self, code: str) -> float:
        msg_id = uuid.uuid4().hex
        header = {
            "msg_id": msg_id,
            "msg_type": "execute_request",
            "username": "bench",
            "session": self.session,
            "date": "",
            "version": "5.3",
        }
        content = {"code": code, "silent": False, "store_history": True,
                   "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}  # fmt: skip
        msg = {"header": header, "parent_header": {}, "metadata": {}, "content": content,
               "channel": "shell"}  # fmt: skip
        started = time.perf_counter()
        await self.ws.send(pack_v1(msg))
        replied = idle = False
        while not (replied and idle):
            reply = unpack_v1(await self.ws.recv())
            self._quickack()
            if reply["parent_header"].get("msg_id") != msg_id:
                continue
            if reply["channel"] == "shell":
                replied = True
            elif reply["header"]["msg_type"] == "status":
                idle = reply["content"]["execution_state"] == "idle"
        return time.perf_counter() - started

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        async with httpx.AsyncClient(headers=self.headers, timeout=30) as client:
            await client.delete(f"{self.gateway.url}/api/kernels/{self.kernel_id}")


async def _execute(manager: SessionManager, session: str) -> float:
    started = time.perf_counter()
    result = await manager.execute(session, CODE)
    elapsed = time.perf_counter() - started
    assert result.status == "ok", result
    return elapsed


async def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if not (VENVS / "eg" / ".stamp").exists() or not (VENVS / "kg" / ".stamp").exists():
        sys.exit("gateway virtualenvs missing: run `make gateways`")
    folder = Path(tempfile.mkdtemp(prefix="ka-gwb-"))
    gateways = {kind: GatewayProcess(kind, folder / kind) for kind in ("eg", "kg")}
    managers: dict[str, SessionManager] = {}
    try:
        for gateway in gateways.values():
            gateway.folder.mkdir(parents=True)
            await gateway.start()

        def settings(name: str, **extra: Any) -> Settings:
            return Settings(
                workspace=folder / name / "ws",
                runtime_dir=folder / name / "rt",
                **{"pool_size": 0, **extra},
            )

        def on(kind: str, **extra: Any) -> dict[str, Any]:
            gateway = gateways[kind]
            return {
                "backend": "gateway",
                "gateway_url": gateway.url,
                "gateway_token": gateway.token,
                "gateway_shared": kind == "eg",
                **extra,
            }

        configs = {
            "local": settings("local"),
            "enterprise_gateway": settings("eg", **on("eg")),
            "kernel_gateway": settings("kg", **on("kg")),
            "enterprise_gateway_no_quickack": settings("eg-nq", **on("eg", gateway_quickack=False)),
        }
        for name, config in configs.items():
            managers[name] = SessionManager(config)
            await managers[name].start()
            await managers[name].execute("bench", "x = 1")
            for _ in range(N_WARMUP):
                await _execute(managers[name], "bench")
        raw = RawWebSocketKernel(gateways["eg"])
        await raw.start()
        print("warm; measuring execute latency", file=sys.stderr)
        samples: dict[str, list[float]] = {name: [] for name in [*managers, "raw_websocket_eg"]}
        names = list(samples)
        per_chunk = N_SAMPLES // N_CHUNKS
        for chunk in range(N_CHUNKS):
            order = names[chunk % len(names) :] + names[: chunk % len(names)]
            for name in order:
                for _ in range(per_chunk):
                    if name == "raw_websocket_eg":
                        samples[name].append(await raw.execute(CODE))
                    else:
                        samples[name].append(await _execute(managers[name], "bench"))
        await raw.close()
        print("measuring the first result of a new session", file=sys.stderr)
        for name, config in {
            "local_warm_pool": settings("local-pool", pool_size=1),
            "enterprise_gateway_warm_pool": settings("eg-pool", pool_size=1, **on("eg")),
        }.items():
            managers[name] = SessionManager(config)
            await managers[name].start()
        first: dict[str, list[float]] = {
            "local": [],
            "enterprise_gateway": [],
            "local_warm_pool": [],
            "enterprise_gateway_warm_pool": [],
        }
        for i in range(N_FIRST):
            for name in first if i % 2 == 0 else reversed(list(first)):
                while managers[name].stats()["pool_ready"] < managers[name].settings.pool_size:
                    await asyncio.sleep(0.05)  # the pool refilled, as between real sessions
                started = time.perf_counter()
                result = await managers[name].execute(f"new-{i}", "1")
                first[name].append(time.perf_counter() - started)
                assert result.status == "ok"
                await managers[name].close_session(f"new-{i}")
        local_p50 = statistics.median(samples["local"])
        report: dict[str, Any] = {
            "bench": "gateway",
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
            "code": CODE,
            "samples": per_chunk * N_CHUNKS,
            "execute_ms": {
                name: {
                    "p50": _ms(statistics.median(values)),
                    "p90": _ms(_p(values, 90)),
                    "p99": _ms(_p(values, 99)),
                    "ratio_p50_to_local": round(statistics.median(values) / local_p50, 3),
                }
                for name, values in samples.items()
            },
            "first_result_ms": {
                name: {"median": _ms(statistics.median(values)), "max": _ms(max(values))}
                for name, values in first.items()
            },
        }
        print(json.dumps(report))
    finally:
        for manager in managers.values():
            with contextlib.suppress(Exception):
                await manager.close()
        for gateway in gateways.values():
            gateway.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
