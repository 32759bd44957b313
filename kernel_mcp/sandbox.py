"""The kernel sandbox: the one module that knows bubblewrap.

Every local kernel runs inside its own `bwrap` sandbox. What the kernel sees:

- `/usr` (and the `/bin`, `/lib*` links), a few harmless files of `/etc`, and the Python
  environment the server runs in, all read-only; `skills/` and the kernel launcher read-only;
- its session folder read-write at `/home/session`, its cwd and `$HOME`;
- its own connection file (read-only) and its own IPC socket folder, at their host paths,
  so JupyterLab and `jupyter console --existing` attach from outside unchanged;
- a private `/tmp` and `/dev/shm` (size-capped tmpfs), a minimal `/dev`, a read-only `/proc`
  of its own PID namespace, a user `kernel` (uid/gid 65534 by default) in a made-up
  `/etc/passwd`;
- no network unless `KERNEL_MCP_KERNEL_NETWORK=host`: its own network namespace has only
  a loopback of its own, so neither the internet nor the servers' ports are reachable.

Nothing else: not the data or runtime folders, the notebooks, the repository, other
sessions or `/root`. bwrap is started with the kernel's scrubbed environment itself
(bwrap's own process is PID 1 inside and its environment is readable there), with
`--die-with-parent`, and every process the kernel starts lives in the sandbox's PID
namespace, which the kernel kills as a whole when bwrap's PID 1 exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import psutil

from .config import Settings
from .errors import KernelStartError, SandboxUnavailable

logger = logging.getLogger(__name__)

SESSION_FOLDER = "/home/session"
"""Where a sandboxed kernel sees its session folder (its cwd and $HOME)."""

INSTALL_HINT = (
    "Kernels run inside bubblewrap (KERNEL_MCP_SANDBOX=bwrap, the default), and {problem}. "
    "Install it with `sudo apt-get install bubblewrap` (Debian, Ubuntu; `dnf install "
    "bubblewrap` on Fedora); `make run` and `make test` do this when they can. Or, only on "
    "a machine where the model may read everything this user can, run kernels unsandboxed "
    "with KERNEL_MCP_SANDBOX=none."
)
UNSANDBOXED_WARNING = (
    "KERNEL_MCP_SANDBOX=none: kernels run UNSANDBOXED as this server's user. Code the model "
    "writes can read the servers' secrets, every session's files and connection files, and "
    "reach the network."
)

# Files of /etc a kernel may read: libraries, time zone, name resolution, certificates.
_ETC = (
    "alternatives",
    "ca-certificates",
    "ca-certificates.conf",
    "crypto-policies",
    "fonts",
    "gai.conf",
    "host.conf",
    "hosts",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "mime.types",
    "nsswitch.conf",
    "os-release",
    "pki",
    "protocols",
    "resolv.conf",
    "services",
    "ssl",
    "timezone",
)
_TOP_LEVEL = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
_CHECK_TIMEOUT = 30.0  # seconds for the start-up self-test


def status(settings: Settings) -> dict[str, Any]:
    """What /health reports about kernel isolation."""
    if settings.sandbox == "none":
        return {"sandbox": "none", "sandbox_warning": UNSANDBOXED_WARNING}
    return {"sandbox": "bwrap", "kernel_network": settings.kernel_network}


def find_bwrap() -> str:
    """The path of the bwrap executable, or SandboxUnavailable saying how to install it."""
    path = shutil.which("bwrap")
    if path is None:
        raise SandboxUnavailable(INSTALL_HINT.format(problem="bwrap is not installed"))
    return path


def exit_code(code: int | None) -> int | None:
    """A sandboxed kernel's exit status as the kernel's own (negative: killed by a signal).

    bwrap exits with 128 + N when the kernel was killed by signal N.
    """
    if code is not None and 128 < code < 128 + signal.NSIG:
        return 128 - code
    return code


def kernel_pid(bwrap_pid: int) -> int | None:
    """The host pid of the kernel process inside the sandbox started as `bwrap_pid`.

    The kernel is the first process bwrap's PID 1 starts: PID 2 of the namespace.
    """
    try:
        for process in psutil.Process(bwrap_pid).children(recursive=True):
            with contextlib.suppress(OSError), open(f"/proc/{process.pid}/status") as status:
                for line in status:
                    if line.startswith("NSpid:"):
                        if line.split()[-1] == "2":
                            return int(process.pid)
                        break
    except psutil.Error:
        pass
    return None


class BwrapSandbox:
    """Builds the bwrap command line of each kernel."""

    def __init__(self, settings: Settings, bwrap: str) -> None:
        self._settings = settings
        self._bwrap = bwrap
        self._etc_dir = settings.runtime_dir / "sandbox"

    @classmethod
    def locate(cls, settings: Settings) -> BwrapSandbox:
        return cls(settings, find_bwrap())

    def prepare(self) -> None:
        """Write the sandbox's own /etc/passwd and /etc/group into the runtime folder."""
        uid, gid = self._settings.sandbox_uid, self._settings.sandbox_gid
        self._etc_dir.mkdir(mode=0o700, exist_ok=True)
        (self._etc_dir / "passwd").write_text(
            f"kernel:x:{uid}:{gid}:kernel:{SESSION_FOLDER}:/bin/sh\n"
        )
        (self._etc_dir / "group").write_text(f"kernel:x:{gid}:\n")

    async def check(self) -> None:
        """Start a trivial sandbox once, so a bwrap that cannot work fails at start-up."""
        probe = self._etc_dir / "probe"
        probe.mkdir(exist_ok=True)
        argv = self._options(cwd=str(probe), sockets=None, connection_file=None)
        argv += ["--", sys.executable, "-c", "import os; os.listdir('.')"]
        process = await asyncio.create_subprocess_exec(
            *argv,
            env={"PATH": "/usr/bin:/bin"},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(_CHECK_TIMEOUT):
                _, stderr = await process.communicate()
        except TimeoutError:
            process.kill()
            await process.wait()
            raise SandboxUnavailable(
                INSTALL_HINT.format(problem=f"a test sandbox did not finish in {_CHECK_TIMEOUT} s")
            ) from None
        if process.returncode != 0:
            detail = stderr.decode(errors="replace").strip() or f"exit code {process.returncode}"
            raise SandboxUnavailable(
                INSTALL_HINT.format(problem=f"bwrap failed to start a test sandbox: {detail}")
            )

    def command(self, kernel_argv: list[str], sockets: Path) -> list[str]:
        """The kernel command wrapped in bwrap.

        `{cwd}` and `{connection_file}` stay templates: jupyter_client fills them at every
        (re)start, so a restarted kernel gets its session's current folder.
        """
        options = self._options(cwd="{cwd}", sockets=sockets, connection_file="{connection_file}")
        # jupyter_client tells ipykernel the server's pid, which the PID namespace hides: the
        # kernel would take its real parent (bwrap, PID 1) for init and exit. Its parent is
        # PID 1, which ipykernel does not poll; bwrap's --die-with-parent watches instead.
        return [*options, "--setenv", "JPY_PARENT_PID", "1", "--", *kernel_argv]

    def _options(self, *, cwd: str, sockets: Path | None, connection_file: str | None) -> list[str]:
        settings = self._settings
        argv = [
            self._bwrap,
            "--unshare-all",
            "--unshare-user",  # as root, --unshare-all alone keeps every capability
            "--disable-userns",  # no nested user namespaces: a common kernel-exploit path
            "--uid",
            str(settings.sandbox_uid),
            "--gid",
            str(settings.sandbox_gid),
            "--hostname",
            "kernel",
            "--die-with-parent",
            "--new-session",
        ]
        if settings.kernel_network == "host":
            argv.append("--share-net")
        argv += ["--ro-bind", "/usr", "/usr"]
        for name in _TOP_LEVEL:
            path = Path("/", name)
            if path.is_symlink():
                argv += ["--symlink", os.readlink(path), str(path)]
            elif path.is_dir():
                argv += ["--ro-bind", str(path), str(path)]
        for name in _ETC:
            argv += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
        argv += [
            "--ro-bind",
            str(self._etc_dir / "passwd"),
            "/etc/passwd",
            "--ro-bind",
            str(self._etc_dir / "group"),
            "/etc/group",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            # Private, size-capped tmpfs: their pages are RAM that RLIMIT_AS does not count.
            "--size",
            str(settings.sandbox_tmp_bytes),
            "--tmpfs",
            "/tmp",
            "--size",
            str(settings.sandbox_tmp_bytes),
            "--tmpfs",
            "/dev/shm",
        ]
        # After the /tmp tmpfs, so that host paths under /tmp (a test's runtime) stay visible.
        for path in self._read_only_paths():
            argv += ["--ro-bind", str(path), str(path)]
        if connection_file is not None:
            argv += ["--ro-bind", connection_file, connection_file]
        if sockets is not None:
            argv += ["--bind", str(sockets), str(sockets)]
        argv += [
            "--bind",
            cwd,
            SESSION_FOLDER,
            "--chdir",
            SESSION_FOLDER,
            # Read-only from here: /proc (the kernel maps to this server's uid on the host,
            # and sysctls trust that uid), /dev and the skeleton root bwrap made.
            "--remount-ro",
            "/proc",
            "--remount-ro",
            "/dev",
            "--remount-ro",
            "/",
        ]
        return argv

    def _read_only_paths(self) -> list[Path]:
        """The Python environment, skills, the launcher and extra paths; no duplicates."""
        settings = self._settings
        candidates = [
            Path(sys.prefix),
            Path(sys.base_prefix),
            Path(sys.exec_prefix),
            Path(sys.base_exec_prefix),
            Path(os.path.realpath(sys.executable)).parent.parent,
            settings.skills_dir,
            Path(__file__).with_name("_kernel_launcher.py"),
            *settings.sandbox_read_only,
        ]
        paths: list[Path] = []
        for path in sorted({p.resolve() for p in candidates if p.exists()}):
            if path == Path("/usr") or Path("/usr") in path.parents:
                continue
            if any(parent in paths for parent in path.parents):
                continue
            paths.append(path)
        return paths


def kernel_env(env: dict[str, str]) -> dict[str, str]:
    """`env` as a sandboxed kernel needs it: its home, user and scratch folders."""
    env = dict(env)
    env.update(
        HOME=SESSION_FOLDER,
        USER="kernel",
        LOGNAME="kernel",
        SHELL="/bin/sh",
        TMPDIR="/tmp",
        IPYTHONDIR="/tmp/ipython",
        # matplotlib's config and font cache: not in the session folder the user sees.
        MPLCONFIGDIR="/tmp/matplotlib",
    )
    return env


def adopt_folder(slot: Path, folder: Path) -> None:
    """Make the folder `slot` (bound into a pooled kernel's sandbox) the session `folder`.

    An existing folder's entries move into the slot first; then the slot replaces the
    (now empty) folder by one atomic rename. Raises KernelStartError if files keep
    arriving in the old folder meanwhile.
    """
    for _ in range(5):
        try:
            os.rename(slot, folder)  # replaces `folder` if it is an empty directory
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                message = f"could not give a kernel the folder {folder}: {exc}"
                raise KernelStartError(message) from exc
        with os.scandir(folder) as entries:
            for entry in entries:
                os.rename(entry.path, slot / entry.name)
    raise KernelStartError(f"files kept arriving in {folder} while a kernel was given it")
