"""File access confined to one session folder.

Every path is relative to the folder; absolute paths, `..` and symlinks that
resolve outside it are refused. Reads and writes are bounded in size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import FileAccessError, FileTooLarge


@dataclass(frozen=True)
class SessionFiles:
    """List, read and write files inside `root`."""

    root: Path
    max_read_bytes: int
    max_write_bytes: int
    max_entries: int = 1000

    def resolve(self, path: str) -> Path:
        """The absolute path of `path` inside the root, or FileAccessError."""
        if "\x00" in path:
            raise FileAccessError("path contains a NUL byte")
        pure = PurePosixPath(path.replace("\\", "/"))
        if pure.is_absolute():
            raise FileAccessError(
                f"{path!r} is absolute; give a path relative to the session folder"
            )
        if ".." in pure.parts:
            raise FileAccessError(f"{path!r} leaves the session folder ('..' is not allowed)")
        root = self.root.resolve()
        target = (root / pure).resolve()
        if target != root and root not in target.parents:
            raise FileAccessError(f"{path!r} resolves outside the session folder (symlink)")
        return target

    def relative(self, target: Path) -> str:
        rel = target.relative_to(self.root.resolve()).as_posix()
        return rel or "."

    def list(self, path: str = ".") -> list[dict[str, Any]]:
        """Entries of a folder: name, type, size and modification time (UTC)."""
        folder = self.resolve(path)
        if not folder.exists():
            raise FileAccessError(f"{path!r} does not exist")
        if not folder.is_dir():
            raise FileAccessError(f"{path!r} is a file, not a folder; use read_file")
        entries = []
        for entry in sorted(os.scandir(folder), key=lambda e: e.name)[: self.max_entries]:
            stat = entry.stat(follow_symlinks=False)
            kind = "dir" if entry.is_dir(follow_symlinks=False) else "file"
            if entry.is_symlink():
                kind = "symlink"
            entries.append(
                {
                    "name": entry.name,
                    "path": self.relative(folder / entry.name) if kind != "symlink" else entry.name,
                    "type": kind,
                    "size": stat.st_size,
                    "modified": datetime.fromtimestamp(stat.st_mtime, UTC).isoformat(),
                }
            )
        return entries

    def read_text(self, path: str) -> str:
        """A UTF-8 text file's content."""
        target = self.resolve(path)
        if not target.is_file():
            kind = "a folder" if target.is_dir() else "missing"
            raise FileAccessError(f"{path!r} is {kind}; list_files shows what exists")
        size = target.stat().st_size
        if size > self.max_read_bytes:
            raise FileTooLarge(
                f"{path!r} is {size:,} bytes, over the {self.max_read_bytes:,}-byte read limit; "
                "read part of it with code in the kernel instead"
            )
        data = target.read_bytes()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise FileAccessError(
                f"{path!r} is binary ({size:,} bytes); open it with code in the kernel"
            ) from None

    def write_text(self, path: str, content: str) -> int:
        """Write `content` as UTF-8, creating folders; returns the bytes written."""
        data = content.encode("utf-8")
        if len(data) > self.max_write_bytes:
            raise FileTooLarge(
                f"content is {len(data):,} bytes, over the {self.max_write_bytes:,}-byte limit"
            )
        target = self.resolve(path)
        if target == self.root.resolve() or target.is_dir():
            raise FileAccessError(f"{path!r} is a folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        return len(data)
