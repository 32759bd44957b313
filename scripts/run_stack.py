"""Run the service stack: kernel_mcp (:8989), then agent_service (:8000).

Ctrl-C (or SIGTERM) stops both cleanly; if either exits, the other is stopped too.
Settings come from the environment (KERNEL_MCP_*, AGENT_*), as for each server alone.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request

logger = logging.getLogger("run_stack")


def _wait_healthy(url: str, process: subprocess.Popen[bytes], within: float) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{url} did not come up: the process exited ({process.returncode})")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"{url} did not answer within {within:.0f} s")


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in reversed(processes):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in reversed(processes):
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    env = dict(os.environ)
    kernel_host = env.get("KERNEL_MCP_HOST", "127.0.0.1")
    kernel_port = env.get("KERNEL_MCP_PORT", "8989")
    env.setdefault("AGENT_MCP_URL", f"http://{kernel_host}:{kernel_port}/mcp")
    if env.get("KERNEL_MCP_TOKEN") and not env.get("AGENT_MCP_TOKEN"):
        env["AGENT_MCP_TOKEN"] = env["KERNEL_MCP_TOKEN"]
    agent_host = env.get("AGENT_HOST", "127.0.0.1")
    agent_port = env.get("AGENT_PORT", "8000")
    processes: list[subprocess.Popen[bytes]] = []
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    # kernel_mcp gets none of the agent's settings or provider keys: kernels run as the same
    # user and could read them from its /proc entry.
    kernel_env = {
        k: v
        for k, v in env.items()
        if not k.startswith("AGENT_")
        and not (k.endswith(("_API_KEY", "_TOKEN", "_SECRET", "_KEY")) and k != "KERNEL_MCP_TOKEN")
    }
    try:
        kernel = subprocess.Popen([sys.executable, "-m", "kernel_mcp"], env=kernel_env)
        processes.append(kernel)
        _wait_healthy(f"http://{kernel_host}:{kernel_port}/health", kernel, 60)
        agent = subprocess.Popen([sys.executable, "-m", "agent_service"], env=env)
        processes.append(agent)
        _wait_healthy(f"http://{agent_host}:{agent_port}/health", agent, 60)
        logger.info("MCP server:   http://%s:%s/mcp", kernel_host, kernel_port)
        logger.info("OpenAI API:   http://%s:%s/v1", agent_host, agent_port)
        logger.info("Web UI:       http://%s:%s/ui  (Ctrl-C stops both)", agent_host, agent_port)
        if not env.get("AGENT_MODEL"):
            logger.warning("AGENT_MODEL is not set: chat answers 503 until a model is configured")
        while not stopping and all(p.poll() is None for p in processes):
            time.sleep(0.2)
    finally:
        _stop(processes)
    failed = [p.args for p in processes if p.returncode not in (0, -signal.SIGTERM, None)]
    return 1 if failed and not stopping else 0


if __name__ == "__main__":
    sys.exit(main())
