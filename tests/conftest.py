"""Suite-wide setup: offline litellm, no real LLM provider unless a test is marked `llm`, and
the agent's transcript store.

Kernels, servers, the scripted LLM, the markers and the skipping of `llm` tests without a
provider key come from our pytest plugin (kernel_agent_pytest), as for any user. The store
is SQLite, or PostgreSQL for tests marked `both_stores` (parametrized `store_kind`: each
runs once per store, on a database of its own in a throwaway cluster started once per test
session).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.postgres import PostgresCluster, binaries

# Set before anything imports litellm: no cost-map download, no tokenizer fetches.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")

STORES = ("sqlite", "postgres")


class RealProviderCall(RuntimeError):
    """A test tried to reach a host other than this machine."""


def _loopback(host: Any) -> bool:
    if host in ("localhost", "", None):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def no_real_provider(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """Fail any connection beyond 127.0.0.1 (a real LLM provider) unless marked `llm`."""
    if request.node.get_closest_marker("llm"):
        yield
        return
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def check(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0]):
            raise RealProviderCall(
                f"test tried to connect to {address[0]}: real providers need the `llm` marker"
            )

    def connect(sock: socket.socket, address: Any) -> None:
        check(sock, address)
        real_connect(sock, address)

    def connect_ex(sock: socket.socket, address: Any) -> int:
        check(sock, address)
        return real_connect_ex(sock, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not _loopback(host) and not str(host).replace(".", "").isdigit():
            raise RealProviderCall(
                f"test tried to resolve {host}: real providers need the `llm` marker"
            )
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked `both_stores` run against SQLite and PostgreSQL."""
    if "store_kind" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
        "both_stores"
    ):
        metafunc.parametrize("store_kind", STORES, indirect=True)


@pytest.fixture
def store_kind(request: pytest.FixtureRequest) -> str:
    """Which transcript store the test's agent services use."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A PostgreSQL server for the whole test session (Debian's `postgresql` package)."""
    bindir = binaries()
    if bindir is None:
        message = "PostgreSQL is not installed (make test installs it: scripts/ensure_postgres.sh)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    cluster = PostgresCluster(bindir).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def database_url(
    store_kind: str, request: pytest.FixtureRequest
) -> Iterator[Callable[[], str | None]]:
    """Factory: a new database's URL for PostgreSQL tests (None: SQLite under data_dir)."""
    made: list[str] = []

    def make() -> str | None:
        if store_kind != "postgres":
            return None
        cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
        made.append(cluster.create_database())
        return made[-1]

    yield make
    if made:
        cluster = request.getfixturevalue("postgres_cluster")
        for url in made:
            cluster.drop_database(url)
