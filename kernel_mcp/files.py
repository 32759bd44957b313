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
import logging
import os
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import FileAccessError, FileMissing, FileTooLarge

logger = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO the kernel put in place of a file must not hang the server.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# At most this many folders are open at once while a tree is walked (one per level):
# deeper folders are left out of a full listing (marked truncated), or moved up to be
# deleted.
_MAX_DEPTH = 32


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
                found = sorted(filter(_named, scan), key=lambda e: e.name)[: self.max_entries]
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

    def walk(self, limit: int = 10_000) -> tuple[builtins.list[dict[str, Any]], str | None]:
        """Every file below the root (and every symlink, not followed), depth first.

        Returns the entries (path, type, size, modified) sorted by path, and why the
        listing is incomplete: "limit" (it stopped at `limit` entries: what comes after
        the last entry in walking order, path components compared, is unknown), "depth"
        (it left folders deeper than _MAX_DEPTH unread), or None (it is whole).
        """
        entries: builtins.list[dict[str, Any]] = []
        truncated: str | None = None
        # One open folder per level, each with the names still to visit in it.
        stack: builtins.list[tuple[int, tuple[str, ...], builtins.list[str]]] = []
        with self._folder(".", ()) as root:
            names = self._names(root)
            stack.append((os.dup(root), (), names))
        try:
            while stack:
                fd, parts, names = stack[-1]
                if not names:
                    os.close(stack.pop()[0])
                    continue
                name = names.pop()
                try:
                    info = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:  # removed meanwhile
                    continue
                if stat.S_ISDIR(info.st_mode):
                    if len(stack) >= _MAX_DEPTH:
                        truncated = "depth"
                        continue
                    try:
                        child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                    except OSError:  # replaced by a link meanwhile, or unreadable
                        continue
                    try:
                        stack.append((child, (*parts, name), self._names(child)))
                    except BaseException:
                        os.close(child)
                        raise
                    continue
                kind = "symlink" if stat.S_ISLNK(info.st_mode) else "file"
                if kind == "file" and not stat.S_ISREG(info.st_mode):
                    continue  # FIFOs, sockets, devices: nothing to download
                if len(entries) >= limit:
                    truncated = "limit"
                    break
                entries.append(
                    {
                        "path": "/".join((*parts, name)),
                        "type": kind,
                        "size": info.st_size,
                        "modified": datetime.fromtimestamp(info.st_mtime, UTC).isoformat(),
                    }
                )
        finally:
            for fd, _, _ in stack:
                os.close(fd)
        entries.sort(key=lambda e: e["path"])
        return entries, truncated

    @staticmethod
    def _names(fd: int) -> builtins.list[str]:
        """The names in folder `fd`, in reverse order (popped from the end: sorted)."""
        return sorted(filter(_named, os.listdir(fd)), reverse=True)

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
                try:
                    remove_tree(folder, name)
                except OSError as exc:
                    raise self._refusal(path, exc) from None
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


def _named(entry: str | os.DirEntry[str]) -> bool:
    """Whether a folder entry's name is text: one that is not valid UTF-8 (bytes from an
    archive, say) could not travel in JSON or a URL, so listings leave it out."""
    name = entry if isinstance(entry, str) else entry.name
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        logger.warning("a name that is not valid UTF-8 is left out of a listing: %r", name)
        return False
    return True


def remove_folder(folder: Path) -> None:
    """Delete `folder` and everything in it, whatever modes the kernel gave its files.

    Never follows symlinks: a link is removed, not what it points to.
    """
    try:
        parent = os.open(folder.parent, _DIR_FLAGS)
    except FileNotFoundError:
        return
    try:
        remove_tree(parent, folder.name)
    except (FileNotFoundError, NotADirectoryError):
        pass  # gone already, or a file or link in its place: not a session folder to delete
    finally:
        os.close(parent)


def remove_tree(parent: int, name: str) -> None:
    """Delete the folder `name` of folder `parent` and everything below it.

    Each folder is opened relative to its parent with O_NOFOLLOW, so a link the kernel
    puts anywhere is removed, never followed. Iterative, with at most _MAX_DEPTH folders
    open: kernel code can nest folders thousands deep, and a deeper folder is moved up
    into the top one (a rename, which never follows links) and removed from there.
    Folders the kernel made unreadable or unwritable (chmod 0) are opened up first.
    """
    # One open folder per level: (its name, its descriptor, the sub-folders left in it);
    # each one's parent is the entry below it (the first one's: `parent`).
    stack: builtins.list[tuple[str, int, builtins.list[str]]] = []
    try:
        _push(stack, name, _open_unlocked(parent, name))
        while stack:
            folder_name, fd, folders = stack[-1]
            if not folders:
                stack.pop()
                os.close(fd)
                if stack:
                    _unlocked(os.rmdir, folder_name, stack[-1][1])
                else:
                    os.rmdir(folder_name, dir_fd=parent)  # the caller's folder stays as is
                continue
            child = folders.pop()
            if len(stack) >= _MAX_DEPTH:
                moved = f".removing-{uuid.uuid4().hex}"
                try:
                    os.rename(child, moved, src_dir_fd=fd, dst_dir_fd=stack[0][1])
                except FileNotFoundError:
                    continue
                stack[0][2].append(moved)
                continue
            try:
                opened = _open_unlocked(fd, child)
            except FileNotFoundError:
                continue
            except NotADirectoryError:  # turned into a file or a link meanwhile
                _unlocked(os.unlink, child, fd)
                continue
            _push(stack, child, opened)
    finally:
        for _, fd, _ in stack:
            os.close(fd)


def _push(stack: builtins.list[tuple[str, int, builtins.list[str]]], name: str, fd: int) -> None:
    """Put the opened folder `fd` on `stack` with its files removed (closed on failure)."""
    try:
        stack.append((name, fd, _clear_files(fd)))
    except BaseException:
        os.close(fd)
        raise


def _clear_files(fd: int) -> builtins.list[str]:
    """Unlink everything in folder `fd` but its sub-folders; returns their names."""
    with contextlib.suppress(PermissionError):
        os.fchmod(fd, stat.S_IRWXU)  # what the kernel locked (we own it, or are root)
    folders = []
    for name in os.listdir(fd):
        try:
            info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(info.st_mode):
                folders.append(name)
            else:
                os.unlink(name, dir_fd=fd)
        except FileNotFoundError:
            continue
    return folders


def _open_unlocked(parent: int, name: str) -> int:
    """Open folder `name` without following a link; a folder locked with chmod is opened up."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent)
    except PermissionError:
        # O_PATH opens without reading it; chmod through /proc acts on that very folder.
        path_fd = os.open(name, _DIR_FLAGS | os.O_PATH, dir_fd=parent)
        try:
            os.chmod(f"/proc/self/fd/{path_fd}", stat.S_IRWXU)
        finally:
            os.close(path_fd)
        return os.open(name, _DIR_FLAGS, dir_fd=parent)


def _unlocked(remove: Any, name: str, fd: int) -> None:
    """`remove(name, dir_fd=fd)`, opening up a folder `fd` the kernel made unwritable."""
    try:
        remove(name, dir_fd=fd)
    except FileNotFoundError:
        pass
    except PermissionError:
        os.fchmod(fd, stat.S_IRWXU)
        remove(name, dir_fd=fd)


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
