"""An execution's MCP result, always within one byte budget.

MCP clients refuse an SSE event over 1 MiB, so every `execute_code` result fits
`result_max_bytes` whatever the cell did. The budget is spent in this order:

1. the model's text (bounded to `model_text_chars`);
2. images for the model: each downscaled to `image_max_bytes` at most, all of them
   sharing a third of the budget (smaller copies when there are many);
3. images in the structured outputs, full size in order as far as they fit; one
   that does not is replaced by a downscaled copy whose full-size original is
   saved in the session folder (`.outputs/`) and named in its metadata;
4. the remaining outputs, head and tail around a marker, measured as JSON.

Images are decoded and re-encoded in a worker thread: never on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernel_schema import incarnation_of

from .execution import ExecutionResult
from .outputs import Output, truncation_marker
from .rendering import Image, all_outputs, bound_image, image_of, render

logger = logging.getLogger(__name__)

_OUTPUT_OVERHEAD = 96  # JSON keys and punctuation of one output, roughly
_RESULT_OVERHEAD = 2048  # the JSON-RPC envelope, content keys, scalar fields
_MIN_MODEL_IMAGE = 24_000
_ORIGINALS = ".outputs"
_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/gif": "gif", "image/webp": "webp"}


@dataclass(frozen=True)
class Budget:
    """Byte limits of one result (from Settings)."""

    result_bytes: int
    model_text_chars: int
    image_bytes: int


@dataclass
class Identity:
    """Who the result belongs to: session handle and kernel incarnation."""

    handle: str | None = None
    created: bool = False
    kernel_id: str | None = None
    generation: int | None = None


@dataclass
class BuiltResult:
    text: str
    images: list[Image]
    structured: dict[str, Any]


def is_image(output: Output) -> bool:
    """A rich output carrying a raster image (PNG, JPEG, GIF, WebP)."""
    data: dict[str, Any] = output.get("data") or {}
    return any(k.startswith("image/") and k != "image/svg+xml" for k in data)


def _json_len(value: Any) -> int:
    # ensure_ascii: an upper bound of the UTF-8 bytes any serializer will send.
    return len(json.dumps(value))


def output_size(output: Output) -> int:
    """Bytes of `output` serialized as JSON (an upper bound within a few bytes)."""
    kind = output["output_type"]
    if kind == "stream":
        return _OUTPUT_OVERHEAD + _json_len(output["text"])
    if kind == "error":
        return _OUTPUT_OVERHEAD + _json_len(output["traceback"]) + _json_len(output["evalue"])
    size = _OUTPUT_OVERHEAD
    for key, value in output.get("data", {}).items():
        size += len(key) + 4 + (_json_len(value) if not isinstance(value, str) else len(value) + 2)
        if isinstance(value, str) and not key.startswith("image/"):
            size += _json_len(value) - len(value) - 2  # escapes, only where text may have them
    metadata = output.get("metadata")
    if metadata:
        size += _json_len(metadata)
    return size


def _quick_size(outputs: Iterable[Output]) -> int:
    """A cheap estimate of the outputs' JSON size (escaping not counted)."""
    size = 0
    for output in outputs:
        size += _OUTPUT_OVERHEAD
        kind = output["output_type"]
        if kind == "stream":
            size += len(output["text"])
        elif kind == "error":
            size += sum(len(line) + 4 for line in output["traceback"])
        else:
            size += sum(len(str(v)) + len(k) for k, v in output.get("data", {}).items())
            size += 8 * len(output.get("metadata") or ())
    return size


def _cut_stream(output: Output, room: int, keep_end: bool) -> tuple[Output, int]:
    """`output` (a stream) cut to about `room` bytes of JSON; returns it and chars dropped."""
    text: str = output["text"]
    ratio = max(1.0, (_json_len(text) - 2) / max(1, len(text)))
    chars = max(0, int((room - _OUTPUT_OVERHEAD) / ratio))
    kept = text[-chars:] if keep_end else text[:chars]
    if chars == 0:
        kept = ""
    return {**output, "text": kept}, len(text) - len(kept)


def fit_outputs(
    outputs: list[Output],
    budget: int,
    pinned: set[int] = frozenset(),  # type: ignore[assignment]
) -> tuple[list[Output], int, int]:
    """`outputs` within `budget` bytes of JSON: head and tail kept around a marker.

    Outputs whose id() is in `pinned` are kept in place and not counted (their cost
    is already accounted for). Returns the outputs, bytes and outputs dropped.
    """
    sizes = [0 if id(o) in pinned else output_size(o) for o in outputs]
    if sum(sizes) <= budget:
        return outputs, 0, 0
    room = max(0, budget - 200)  # the marker
    head_room = int(room * 0.6)
    tail_room = room - head_room
    kept: dict[int, Output] = {}
    used = 0
    head_end = 0  # first index not in the head
    for i, output in enumerate(outputs):
        head_end = i
        if sizes[i] == 0 or used + sizes[i] <= head_room:
            kept[i] = output
            used += sizes[i]
            continue
        if output["output_type"] == "stream" and head_room - used > 256:
            kept[i], _ = _cut_stream(output, head_room - used, keep_end=False)
            head_end = i + 1
        break
    else:
        head_end = len(outputs)
    used = 0
    for i in range(len(outputs) - 1, head_end - 1, -1):
        if i in kept:
            break
        output = outputs[i]
        if sizes[i] == 0 or used + sizes[i] <= tail_room:
            kept[i] = output
            used += sizes[i]
            continue
        if output["output_type"] == "stream" and tail_room - used > 256:
            kept[i], _ = _cut_stream(output, tail_room - used, keep_end=True)
        break
    for i in range(head_end, len(outputs)):  # pinned images in the dropped middle stay
        if sizes[i] == 0:
            kept[i] = outputs[i]
    dropped_bytes = 0
    dropped_outputs = 0
    fitted: list[Output] = []
    marker_at = None
    for i, output in enumerate(outputs):
        if i in kept:
            fitted.append(kept[i])
            if kept[i] is not output:
                dropped_bytes += len(output["text"]) - len(kept[i]["text"])
        else:
            dropped_bytes += sizes[i]
            dropped_outputs += 1
            if marker_at is None:
                marker_at = len(fitted)
    if marker_at is None:  # only streams were cut: mark after the head
        marker_at = min(len(fitted), head_end)
    fitted.insert(marker_at, truncation_marker("stdout", dropped_bytes, dropped_outputs))
    return fitted, dropped_bytes, dropped_outputs


def _model_images(candidates: list[tuple[int, Image]], budget: Budget) -> list[tuple[int, Image]]:
    """The images the model sees, downscaled to share a third of the result. In a thread."""
    if not candidates:
        return []
    share = budget.result_bytes // 3
    each = min(budget.image_bytes, max(_MIN_MODEL_IMAGE, share // len(candidates)))
    shown: list[tuple[int, Image]] = []
    used = 0
    for key, image in candidates:
        if used + min(each, len(image.data)) > share:
            break
        small = bound_image(image.data, image.mime_type, each)
        if small is None:
            continue
        shown.append((key, small))
        used += len(small.data)
    return shown


def _save_original(image: Image, folder: Path, name: str) -> str | None:
    """Write the full-size image into the session folder; its path relative to it."""
    try:
        target = folder / _ORIGINALS / f"{name}.{_EXTENSIONS.get(image.mime_type, 'bin')}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(base64.b64decode(image.data))
    except (OSError, binascii.Error, ValueError):
        logger.warning("could not save a full-size image in %s", folder, exc_info=True)
        return None
    return str(target.relative_to(folder))


def _structured_images(
    outputs: list[Output],
    budget: int,
    model_copies: dict[int, Image],
    image_bytes: int,
    folder: Path | None,
    prefix: str,
) -> tuple[list[Output], set[int], int, int]:
    """Images kept full size in order while they fit, else downscaled. In a thread.

    Returns the outputs (replaced images are new dicts), the id() of every image output
    kept (pinned), the bytes they take, and how many were downscaled.
    """
    result: list[Output] = []
    pinned: set[int] = set()
    used = 0
    downscaled = 0
    for index, output in enumerate(outputs):
        image = image_of(output) if is_image(output) else None
        if image is None:
            result.append(output)
            continue
        size = output_size(output)
        if used + size <= budget:
            result.append(output)
            pinned.add(id(output))
            used += size
            continue
        small = model_copies.get(id(output))
        room = max(_MIN_MODEL_IMAGE, min(image_bytes, budget - used))
        if small is None or len(small.data) > room:
            small = bound_image(image.data, image.mime_type, room)
        original = (
            _save_original(image, folder, f"{prefix}-{index}") if folder is not None else None
        )
        metadata = {**(output.get("metadata") or {})}
        note: dict[str, Any] = {"downscaled": True, "original_bytes": len(image.data)}
        if original is not None:
            note["original_file"] = original
        metadata["kernel_agent"] = note
        data = {k: v for k, v in output["data"].items() if not k.startswith("image/")}
        if small is not None and used + len(small.data) + 256 <= budget:
            data[small.mime_type] = small.data
            downscaled += 1
        else:
            where = f" (saved as {original})" if original else ""
            data["text/plain"] = f"[{image.mime_type} image too large for this result{where}]"
        replaced = {**output, "data": data, "metadata": metadata}
        result.append(replaced)
        pinned.add(id(replaced))
        used += output_size(replaced)
    return result, pinned, used, downscaled


async def build_result(
    result: ExecutionResult,
    budget: Budget,
    identity: Identity,
    folder: Path | None,
) -> BuiltResult:
    """The model's text and images and the structured result, within `budget`."""
    candidates = [(id(o), i) for o in all_outputs(result) if (i := image_of(o)) is not None]
    shown: list[tuple[int, Image]] = []
    if candidates:
        shown = await asyncio.to_thread(_model_images, candidates, budget)
    text = render(result, text_limit=budget.model_text_chars, shown={k for k, _ in shown})
    images = [image for _, image in shown]
    structured = _structured(result, identity)
    room = (
        budget.result_bytes
        - _RESULT_OVERHEAD
        - _json_len(text)
        - sum(len(i.data) + 64 for i in images)
        - _json_len(structured["message"])
    )
    outputs = result.outputs
    background = result.background_outputs
    if _quick_size(outputs) + _quick_size(background) > room // 8:
        structured.update(await _fit(result, room, dict(shown), budget.image_bytes, folder))
    return BuiltResult(text=text, images=images, structured=structured)


async def _fit(
    result: ExecutionResult,
    room: int,
    model_copies: dict[int, Image],
    image_bytes: int,
    folder: Path | None,
) -> dict[str, Any]:
    """Outputs and background outputs re-bounded to `room` bytes of JSON."""
    prefix = f"{result.execution_count or 0}-{secrets.token_hex(3)}"
    background_room = room // 8 if result.background_outputs else 0
    fields: dict[str, Any] = {}
    dropped_total = 0
    downscaled_total = 0
    for key, share in (("background_outputs", background_room), ("outputs", None)):
        outputs: list[Output] = getattr(result, key)
        if not outputs:
            continue
        space = share if share is not None else room - background_room
        pinned: set[int] = set()
        used = 0
        if any(is_image(o) for o in outputs):
            text_needs = sum(output_size(o) for o in outputs if not is_image(o))
            outputs, pinned, used, downscaled = await asyncio.to_thread(
                _structured_images,
                outputs,
                space - min(text_needs, space // 4),
                model_copies,
                image_bytes,
                folder,
                f"{prefix}{'-bg' if share is not None else ''}",
            )
            downscaled_total += downscaled
        fitted, dropped, _ = fit_outputs(outputs, space - used, pinned)
        fields[key] = fitted
        dropped_total += dropped
    if dropped_total:
        fields["truncated"] = True
        fields["truncated_bytes"] = result.truncated_bytes + dropped_total
    fields["images_downscaled"] = downscaled_total
    return fields


def _structured(result: ExecutionResult, identity: Identity) -> dict[str, Any]:
    """The ExecuteResult fields as a JSON-ready dict (validated by the tests and clients)."""
    error = None
    if result.status == "error":
        for output in reversed(result.outputs):
            if output["output_type"] == "error":
                error = {"ename": output["ename"], "evalue": output["evalue"]}
                break
    incarnation = None
    if identity.kernel_id is not None and identity.generation is not None:
        incarnation = incarnation_of(identity.kernel_id, identity.generation)
    return {
        "status": result.status,
        "execution_count": result.execution_count,
        "outputs": result.outputs,
        "elapsed": round(result.elapsed, 6),
        "error": error,
        "truncated": result.truncated,
        "truncated_bytes": result.truncated_bytes,
        "output_file": result.output_file,
        "kernel_restarted": result.kernel_restarted,
        "state_lost": result.state_lost,
        "message": result.message,
        "background_outputs": result.background_outputs,
        "images_downscaled": 0,
        "session": identity.handle,
        "session_created": identity.created,
        "kernel_id": identity.kernel_id,
        "kernel_generation": identity.generation,
        "incarnation": incarnation,
    }
