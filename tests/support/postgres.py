"""A throwaway PostgreSQL cluster for tests: Debian's binaries, a temp folder, a free port.

`initdb` makes the cluster in a temp folder that the server's user cannot write (only its
data and socket folders are its own), as `nobody` when the tests run as root (PostgreSQL
refuses to run as root), as the current user otherwise. The server listens on 127.0.0.1
on a free port and on a Unix socket in the temp folder; durability is off (`-F`,
`synchronous_commit=off`): the cluster is deleted after the test session. Each test gets
a database of its own (`create_database`), dropped after it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import psycopg

_START_TIMEOUT = 60


def binaries() -> Path | None:
    """The folder of initdb and pg_ctl: on PATH, else Debian's newest /usr/lib/postgresql/N."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return versions[-1].parent if versions else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PostgresCluster:
    """One PostgreSQL server for a test session."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="ka-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.port = _free_port()
        self._as_user: list[str] = []

    @property
    def url(self) -> str:
        """The maintenance database `postgres`, as its superuser."""
        return self.database_url("postgres")

    def database_url(self, name: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def start(self) -> PostgresCluster:
        os.chmod(self.root, 0o755)  # the server's user may enter, not write
        for folder in (self.data, self.sockets):
            folder.mkdir(mode=0o700)
        if os.geteuid() == 0:
            for folder in (self.data, self.sockets):
                shutil.chown(folder, "nobody", "nogroup")
            self._as_user = ["runuser", "-u", "nobody", "--"]
        self._run(
            "initdb", "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync",
            "-D", str(self.data),
        )  # fmt: skip
        options = (
            f"-p {self.port} -k {self.sockets} -h 127.0.0.1 -F "
            "-c synchronous_commit=off -c max_connections=300 -c shared_buffers=32MB"
        )
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.data / "server.log"), "-w",
            "-t", str(_START_TIMEOUT), "-o", options, "start",
        )  # fmt: skip
        return self

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        path = self.data / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def create_database(self) -> str:
        """A new empty database; its URL."""
        name = f"ka_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
        return self.database_url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.url, autocommit=True) as db:
            db.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]

    def _run(self, program: str, *args: str) -> None:
        command = [*self._as_user, str(self.bindir / program), *args]
        result = subprocess.run(
            command, cwd=self.root, capture_output=True, text=True, timeout=_START_TIMEOUT + 30
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{program} failed ({result.returncode}):\n{result.stdout}{result.stderr}\n"
                f"{self.log()}"
            )
