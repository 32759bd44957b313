"""Real gateways for the tests: Jupyter Kernel Gateway and Enterprise Gateway on loopback.

Each runs from its own virtualenv (`make gateways` builds `.gateway-venvs/`), with our
kernelspec (`kernel_mcp.gateway_kernelspec`, kernels on this repo's Python) and private
Jupyter folders, so its kernels are local processes this test run can see and kill.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from kernel_mcp.gateway_kernelspec import write_kernelspec

REPO = Path(__file__).resolve().parents[2]
VENVS = Path(os.environ.get("KERNEL_AGENT_GATEWAY_VENVS", REPO / ".gateway-venvs"))
KERNEL_GATEWAY = "kernel-gateway"
ENTERPRISE_GATEWAY = "enterprise-gateway"
KINDS = (KERNEL_GATEWAY, ENTERPRISE_GATEWAY)
_VENV = {KERNEL_GATEWAY: "kg", ENTERPRISE_GATEWAY: "eg"}


def available(kind: str) -> bool:
    return (VENVS / _VENV[kind] / ".stamp").is_file()


def _command(kind: str, port: int, token: str) -> list[str]:
    jupyter = str(VENVS / _VENV[kind] / "bin" / "jupyter")
    if kind == ENTERPRISE_GATEWAY:
        return [
            jupyter,
            "enterprisegateway",
            "--ip=127.0.0.1",
            f"--port={port}",
            "--port_retries=0",
            "--EnterpriseGatewayApp.list_kernels=True",
            f"--EnterpriseGatewayApp.auth_token={token}",
        ]
    return [
        jupyter,
        "kernelgateway",
        "--KernelGatewayApp.ip=127.0.0.1",
        f"--KernelGatewayApp.port={port}",
        "--KernelGatewayApp.port_retries=0",
        "--JupyterWebsocketPersonality.list_kernels=True",
        f"--KernelGatewayApp.auth_token={token}",
    ]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Gateway:
    """One running gateway process and what a test needs to reach it."""

    kind: str
    folder: Path
    port: int = field(default_factory=free_port)
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def runtime_dir(self) -> Path:
        return self.folder / "runtime"

    @property
    def log(self) -> Path:
        return self.folder / f"{self.kind}.log"

    @property
    def shared(self) -> bool:
        """Enterprise Gateway honours client-chosen kernel ids: replicas share kernels."""
        return self.kind == ENTERPRISE_GATEWAY

    def settings(self) -> dict[str, Any]:
        return {
            "backend": "gateway",
            "gateway_url": self.url,
            "gateway_token": self.token,
            "gateway_shared": self.shared,
        }

    async def start(self) -> None:
        write_kernelspec(
            self.folder / "share" / "kernels",
            python=sys.executable,
            ipython_dir=self.folder / "ipython",
        )
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "JUPYTER_PATH": str(self.folder / "share"),
            "JUPYTER_RUNTIME_DIR": str(self.runtime_dir),
            "JUPYTER_CONFIG_DIR": str(self.folder / "config"),
            "JUPYTER_DATA_DIR": str(self.folder / "data"),
        }
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                _command(self.kind, self.port, self.token),
                cwd=self.folder,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        async with httpx.AsyncClient(headers=self.headers) as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.kind} exited: {self.log.read_text()[-3000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    response = await client.get(f"{self.url}/api/kernelspecs")
                    if response.status_code == 200:
                        return
                if time.monotonic() > deadline:
                    tail = self.log.read_text()[-3000:]
                    raise RuntimeError(f"{self.kind} did not answer: {tail}")
                await asyncio.sleep(0.1)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}

    async def kernels(self) -> list[str]:
        """Ids of the kernels the gateway runs."""
        async with httpx.AsyncClient(headers=self.headers) as client:
            response = await client.get(f"{self.url}/api/kernels")
            response.raise_for_status()
            return [k["id"] for k in response.json()]

    async def delete(self, kernel_id: str) -> None:
        async with httpx.AsyncClient(headers=self.headers, timeout=30) as client:
            await client.delete(f"{self.url}/api/kernels/{kernel_id}")

    def kernel_pid(self, kernel_id: str) -> int | None:
        """The pid of a kernel process this gateway started (found by its connection file)."""
        name = f"kernel-{kernel_id}.json"
        for process in psutil.process_iter(["cmdline", "status"]):
            cmdline = process.info["cmdline"] or []
            if process.info["status"] != psutil.STATUS_ZOMBIE and any(name in a for a in cmdline):
                return process.pid
        return None

    def kernel_processes(self) -> list[psutil.Process]:
        runtime = str(self.runtime_dir)
        found = []
        for process in psutil.process_iter(["cmdline", "status"]):
            cmdline = process.info["cmdline"] or []
            live = process.info["status"] != psutil.STATUS_ZOMBIE
            if live and any(runtime in a for a in cmdline):
                found.append(process)
        return found

    def kill(self) -> None:
        """SIGKILL the gateway (its kernels notice their parent is gone and exit)."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        """Stop the gateway and every kernel it left."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        for process in self.kernel_processes():
            with contextlib.suppress(psutil.Error):
                process.kill()
