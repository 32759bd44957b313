"""File access confined to one session folder, safe against a kernel racing it.

Kernel code can change the session folder while a tool reads it: swap a file for a
symlink, a folder for a link to `/`. So nothing is resolved first and opened later:
every path is walked from a handle on the session folder, one component at a time,
each opened relative to the previous one with `O_NOFOLLOW` (a symlink anywhere in
the path is refused, at the moment it is opened). Absolute paths and `..` are refused
before any of that. Reads and writes are bounded in size.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import FileAccessError, FileMissing, FileTooLarge

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO the kernel put in place of a file must not hang the server.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class SessionFiles:
    """List, read and write files inside `root`."""

    root: Path
    max_read_bytes: int
    max_write_bytes: int
    max_entries: int = 1000

    def parts(self, path: str) -> tuple[str, ...]:
        """The components of `path` inside the root, or FileAccessError."""
        if "\x00" in path:
            raise FileAccessError("path contains a NUL byte")
        pure = PurePosixPath(path.replace("\\", "/"))
        if pure.is_absolute():
            raise FileAccessError(
                f"{path!r} is absolute; give a path relative to the session folder"
            )
        if ".." in pure.parts:
            raise FileAccessError(f"{path!r} leaves the session folder ('..' is not allowed)")
        return tuple(p for p in pure.parts if p != ".")

    def list(self, path: str = ".") -> list[dict[str, Any]]:
        """Entries of a folder: name, type, size and modification time (UTC)."""
        parts = self.parts(path)
        with self._folder(path, parts) as fd:
            entries = []
            with os.scandir(fd) as scan:
                found = sorted(scan, key=lambda e: e.name)[: self.max_entries]
            for entry in found:
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:  # removed meanwhile
                    continue
                kind = "file"
                if stat.S_ISDIR(info.st_mode):
                    kind = "dir"
                elif stat.S_ISLNK(info.st_mode):
                    kind = "symlink"
                rel = "/".join((*parts, entry.name))
                entries.append(
                    {
                        "name": entry.name,
                        "path": rel if kind != "symlink" else entry.name,
                        "type": kind,
                        "size": info.st_size,
                        "modified": datetime.fromtimestamp(info.st_mtime, UTC).isoformat(),
                    }
                )
        return entries

    def read_text(self, path: str) -> str:
        """A UTF-8 text file's content."""
        fd, info = self.open_file(path)
        try:
            if info.st_size > self.max_read_bytes:
                raise self._too_large(path, info.st_size)
            data = _read_up_to(fd, self.max_read_bytes + 1)
        finally:
            os.close(fd)
        if len(data) > self.max_read_bytes:  # grew after fstat
            raise self._too_large(path, len(data))
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise FileAccessError(
                f"{path!r} is binary ({len(data):,} bytes); open it with code in the kernel"
            ) from None

    def write_text(self, path: str, content: str) -> int:
        """Write `content` as UTF-8, creating folders; returns the bytes written."""
        data = content.encode("utf-8")
        if len(data) > self.max_write_bytes:
            raise FileTooLarge(
                f"content is {len(data):,} bytes, over the {self.max_write_bytes:,}-byte limit"
            )
        parts = self.parts(path)
        if not parts:
            raise FileAccessError(f"{path!r} is a folder")
        name = parts[-1]
        with self._folder(path, parts[:-1], create=True) as folder:
            tmp = f".{name}.tmp-{uuid.uuid4().hex[:12]}"
            fd = os.open(tmp, _CREATE_FLAGS, 0o644, dir_fd=folder)
            try:
                with open(fd, "wb", closefd=True) as out:
                    out.write(data)
                # rename() replaces a symlink itself, never what it points to.
                os.rename(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
            except BaseException as exc:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=folder)
                if isinstance(exc, IsADirectoryError | NotADirectoryError):
                    raise FileAccessError(f"{path!r} is a folder") from None
                raise
        return len(data)

    def walk(self, limit: int = 10_000) -> tuple[builtins.list[dict[str, Any]], bool]:
        """Every file below the root (and every symlink, not followed), depth first.

        Returns the entries (path, type, size, modified) sorted by path, and whether the
        listing stopped at `limit` entries.
        """
        entries: builtins.list[dict[str, Any]] = []
        with self._folder(".", ()) as root:
            truncated = self._walk(os.dup(root), (), entries, limit)
        entries.sort(key=lambda e: e["path"])
        return entries, truncated

    def _walk(
        self, fd: int, parts: tuple[str, ...], entries: builtins.list[dict[str, Any]], limit: int
    ) -> bool:
        """Add the entries of folder `fd` (closed here); True when `limit` was reached."""
        try:
            with os.scandir(fd) as scan:
                found = sorted(scan, key=lambda e: e.name)
            for entry in found:
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:  # removed meanwhile
                    continue
                if stat.S_ISDIR(info.st_mode):
                    try:
                        child = os.open(entry.name, _DIR_FLAGS, dir_fd=fd)
                    except OSError:  # replaced by a link meanwhile, or unreadable
                        continue
                    if self._walk(child, (*parts, entry.name), entries, limit):
                        return True
                    continue
                kind = "symlink" if stat.S_ISLNK(info.st_mode) else "file"
                if kind == "file" and not stat.S_ISREG(info.st_mode):
                    continue  # FIFOs, sockets, devices: nothing to download
                if len(entries) >= limit:
                    return True
                entries.append(
                    {
                        "path": "/".join((*parts, entry.name)),
                        "type": kind,
                        "size": info.st_size,
                        "modified": datetime.fromtimestamp(info.st_mtime, UTC).isoformat(),
                    }
                )
            return False
        finally:
            os.close(fd)

    def open_file(self, path: str) -> tuple[int, os.stat_result]:
        """A descriptor of the regular file `path` (the caller closes it), and its stat."""
        parts = self.parts(path)
        if not parts:
            raise FileAccessError(f"{path!r} is a folder; list_files shows what exists")
        with self._folder(path, parts[:-1]) as folder:
            try:
                fd = os.open(parts[-1], _READ_FLAGS, dir_fd=folder)
            except OSError as exc:
                raise self._refusal(path, exc) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file"
                raise FileAccessError(f"{path!r} is {kind}; list_files shows what exists")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd, info

    def remove(self, path: str) -> str:
        """Delete the file, symlink (not what it points to) or folder `path`; returns its kind."""
        parts = self.parts(path)
        if not parts:
            raise FileAccessError("the session folder itself cannot be deleted")
        with self._folder(path, parts[:-1]) as folder:
            name = parts[-1]
            try:
                info = os.stat(name, dir_fd=folder, follow_symlinks=False)
            except OSError as exc:
                raise self._refusal(path, exc) from None
            if stat.S_ISDIR(info.st_mode):
                # rmtree on a descriptor walks with O_NOFOLLOW: links inside are removed,
                # never followed.
                shutil.rmtree(name, dir_fd=folder)
                return "folder"
            try:
                os.unlink(name, dir_fd=folder)
            except OSError as exc:
                raise self._refusal(path, exc) from None
        return "symlink" if stat.S_ISLNK(info.st_mode) else "file"

    def place(self, staging: int, staged: str, path: str) -> None:
        """Move the file `staged` of folder `staging` to `path` (folders made as needed).

        An existing file of that name is replaced (a symlink there: the link itself); a
        folder there is refused. Both folders must be on one file system.
        """
        parts = self.parts(path)
        if not parts:
            raise FileAccessError(f"{path!r} is a folder")
        with self._folder(path, parts[:-1], create=True) as folder:
            try:
                os.rename(staged, parts[-1], src_dir_fd=staging, dst_dir_fd=folder)
            except IsADirectoryError:
                raise FileAccessError(f"{path!r} is a folder") from None
            except OSError as exc:
                raise self._refusal(path, exc) from None

    @contextlib.contextmanager
    def _folder(self, path: str, parts: tuple[str, ...], *, create: bool = False) -> Iterator[int]:
        """A descriptor of the folder `parts` below the root, walked without following links."""
        try:
            fd = os.open(self.root, _DIR_FLAGS)
        except FileNotFoundError:
            raise FileMissing(f"{path!r} does not exist: the session has no files yet") from None
        except OSError as exc:
            raise FileAccessError(f"the session folder is not available: {exc}") from None
        try:
            for part in parts:
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise FileMissing(f"{path!r} does not exist") from None
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=fd)
                    try:
                        child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                    except OSError as exc:
                        raise self._refusal(path, exc) from None
                except NotADirectoryError as exc:
                    # O_DIRECTORY wins over O_NOFOLLOW: a symlink fails as "not a directory".
                    if _is_symlink(part, fd):
                        exc.errno = errno.ELOOP
                    raise self._refusal(path, exc) from None
                except OSError as exc:
                    raise self._refusal(path, exc) from None
                os.close(fd)
                fd = child
            yield fd
        finally:
            os.close(fd)

    @staticmethod
    def _refusal(path: str, exc: OSError) -> FileAccessError:
        if exc.errno == errno.ELOOP:
            return FileAccessError(
                f"{path!r} goes through a symlink; symlinks may leave the session folder "
                "and are not followed"
            )
        if exc.errno == errno.ENAMETOOLONG:
            return FileAccessError(f"a name in {path[:80]!r}... is too long for the file system")
        if exc.errno == errno.ENOTDIR:
            return FileAccessError(f"{path!r}: a part of it is a file, not a folder")
        if exc.errno == errno.ENOENT:
            return FileMissing(f"{path!r} does not exist; list_files shows what exists")
        return FileAccessError(f"{path!r}: {exc.strerror}")

    def _too_large(self, path: str, size: int) -> FileTooLarge:
        return FileTooLarge(
            f"{path!r} is {size:,} bytes, over the {self.max_read_bytes:,}-byte read limit; "
            "read part of it with code in the kernel instead"
        )


def remove_folder(folder: Path) -> None:
    """Delete `folder` and everything in it, whatever modes the kernel gave its files.

    Never follows symlinks (shutil.rmtree works on directory descriptors here).
    """

    def unlock(function: Any, path: str, _exc: Any) -> None:
        # A folder the kernel made unwritable or unreadable (chmod 0): open it up, retry.
        parent = os.path.dirname(path)
        with contextlib.suppress(OSError):
            os.chmod(parent, 0o700)
            if os.path.isdir(path) and not os.path.islink(path):
                os.chmod(path, 0o700)
        function(path)

    if folder.is_dir() and not folder.is_symlink():
        shutil.rmtree(folder, onerror=unlock)


def _is_symlink(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _read_up_to(fd: int, limit: int) -> bytes:
    chunks = []
    remaining = limit
    while remaining > 0:
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)
