"""Describe an unknown file without loading all of it: size, kind, a first look.

``peek(path)`` returns a :class:`FilePeek`; it prints as a short report and its
fields (``kind``, ``size``, ``encoding``, ``details``, ``lines``) are usable in code.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["FilePeek", "guess_kind", "peek"]

_SAMPLE_BYTES = 64 * 1024
_JSON_FULL_PARSE_LIMIT = 20 * 1024 * 1024

# (prefix, kind); checked in order against the first bytes of the file.
_MAGIC: list[tuple[bytes, str]] = [
    (b"\x89PNG\r\n\x1a\n", "png image"),
    (b"\xff\xd8\xff", "jpeg image"),
    (b"GIF87a", "gif image"),
    (b"GIF89a", "gif image"),
    (b"%PDF", "pdf"),
    (b"PK\x03\x04", "zip archive (also xlsx/docx/pptx)"),
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"PAR1", "parquet"),
    (b"SQLite format 3\x00", "sqlite database"),
    (b"\x93NUMPY", "numpy .npy"),
    (b"\x89HDF\r\n\x1a\n", "hdf5"),
    (b"RIFF", "riff (wav/webp/avi)"),
]


@dataclass
class FilePeek:
    path: Path
    size: int
    kind: str
    encoding: str | None = None
    details: dict[str, object] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        out = [f"{self.path}  ({_human(self.size)}, {self.kind}"]
        if self.encoding:
            out[0] += f", {self.encoding}"
        out[0] += ")"
        out += [f"  {key}: {value}" for key, value in self.details.items()]
        if self.lines:
            out.append("  first entries:" if self.kind == "directory" else "  first lines:")
            out += [f"    {line}" for line in self.lines]
        return "\n".join(out)

    def _repr_pretty_(self, printer, cycle) -> None:  # IPython shows str() for the last expr
        printer.text(str(self))


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _decode(sample: bytes) -> tuple[str, str] | None:
    """Decode a byte sample as text, or return None if it looks binary."""
    if b"\x00" in sample:
        return None
    encoding = "utf-8-sig" if sample.startswith(codecs.BOM_UTF8) else "utf-8"
    try:
        return sample.decode(encoding), encoding
    except UnicodeDecodeError as exc:
        # A multi-byte character cut at the end of the sample is still utf-8.
        if exc.start >= len(sample) - 3:
            return sample[: exc.start].decode(encoding), encoding
    text = sample.decode("latin-1")
    printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in text)
    return (text, "latin-1") if printable / max(len(text), 1) > 0.95 else None


def guess_kind(path: str | Path) -> str:
    """Just the kind, e.g. ``"csv"``, ``"json"``, ``"png image"``, ``"binary"``."""
    return peek(path, n=0).kind


def _describe_json(path: Path, size: int, info: FilePeek) -> bool:
    if size > _JSON_FULL_PARSE_LIMIT:
        return False
    try:
        data = json.loads(path.read_text(encoding=info.encoding or "utf-8"))
    except (ValueError, UnicodeDecodeError):
        return False
    info.kind = "json"
    if isinstance(data, dict):
        info.details["top level"] = f"object with {len(data)} keys"
        info.details["keys"] = list(data)[:20]
    elif isinstance(data, list):
        info.details["top level"] = f"array of {len(data)} items"
        if data and isinstance(data[0], dict):
            info.details["item keys"] = list(data[0])[:20]
    else:
        info.details["top level"] = type(data).__name__
    return True


def _describe_jsonl(lines: list[str], info: FilePeek) -> bool:
    records = [line for line in lines if line.strip()]
    if len(records) < 2:
        return False
    try:
        first = [json.loads(line) for line in records[:5]]
    except ValueError:
        return False
    info.kind = "jsonl (one JSON value per line)"
    if isinstance(first[0], dict):
        info.details["record keys"] = list(first[0])[:20]
    return True


def _describe_csv(lines: list[str], info: FilePeek) -> bool:
    if len(lines) < 2:
        return False
    try:
        dialect = csv.Sniffer().sniff("\n".join(lines[:20]), delimiters=",;\t|")
    except csv.Error:
        return False
    rows = list(csv.reader(io.StringIO("\n".join(lines[:20])), dialect))
    widths = {len(row) for row in rows if row}
    if len(widths) != 1 or widths.pop() < 2:
        return False
    names = {",": "csv", "\t": "tsv"}
    info.kind = names.get(dialect.delimiter, f"csv (sep={dialect.delimiter!r})")
    info.details["delimiter"] = dialect.delimiter
    info.details["columns"] = rows[0]
    return True


def peek(path: str | Path, n: int = 5) -> FilePeek:
    """Describe the file at ``path``: size, kind guess and a first look.

    Text files get their first ``n`` lines (and a line count when the file is
    under 20 MB), JSON its top-level keys or array length, CSV/TSV its delimiter
    and header, images their pixel size. Directories list their first ``n`` entries.
    """
    path = Path(path)
    if path.is_dir():
        entries = sorted(path.iterdir())
        info = FilePeek(path, 0, "directory", details={"entries": len(entries)})
        info.lines = [p.name + ("/" if p.is_dir() else "") for p in entries[:n]]
        return info
    size = path.stat().st_size
    with path.open("rb") as fh:
        sample = fh.read(_SAMPLE_BYTES)
    info = FilePeek(path, size, "empty" if size == 0 else "binary")
    if size == 0:
        return info

    for prefix, kind in _MAGIC:
        if sample.startswith(prefix):
            info.kind = kind
            if kind.endswith("image"):
                _describe_image(path, info)
            return info
    if sample[:1] == b"\x80" and sample[1:2] in {bytes([p]) for p in range(2, 6)}:
        info.kind = "python pickle (only unpickle files you trust)"
        return info

    decoded = _decode(sample)
    if decoded is None:
        info.details["first bytes"] = sample[:32].hex(" ")
        return info
    text, info.encoding = decoded
    info.kind = "text"
    lines = text.splitlines()
    if len(sample) == size:
        info.details["lines"] = len(lines)
    elif size <= _JSON_FULL_PARSE_LIMIT:
        with path.open("rb") as fh:
            info.details["lines"] = sum(1 for _ in fh)
    info.lines = [line if len(line) <= 200 else line[:199] + "…" for line in lines[:n]]

    stripped = text.lstrip()
    if stripped[:1] in "{[" and not _describe_jsonl(lines, info):
        _describe_json(path, size, info)
    elif path.suffix.lower() in {".jsonl", ".ndjson"}:
        _describe_jsonl(lines, info)
    elif path.suffix.lower() not in {".md", ".txt", ".py", ".log"}:
        _describe_csv(lines, info)
    return info


def _describe_image(path: Path, info: FilePeek) -> None:
    try:
        from PIL import Image
    except ImportError:
        return
    try:
        with Image.open(path) as img:
            info.details["pixels"] = f"{img.width}x{img.height}"
            info.details["mode"] = img.mode
    except OSError as exc:
        info.details["unreadable"] = str(exc)
