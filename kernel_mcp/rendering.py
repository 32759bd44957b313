"""Present an ExecutionResult to a model: bounded text plus images.

The model gets plain text (ANSI codes stripped, head and tail kept around a
truncation marker) with a placeholder where each image stands; which images the
model sees, and how small, the result budget decides (`results`). Downscaling is
CPU work of ~50-200 ms per large image: callers run it in a thread.
"""

from __future__ import annotations

import base64
import io
import logging
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

from .execution import ExecutionResult
from .outputs import Output

logger = logging.getLogger(__name__)

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07")
_IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
_MODEL_IMAGE_TYPES = ("image/png", "image/jpeg")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def bound_text(text: str, limit: int) -> str:
    """`text` if short enough, else its head and tail around a marker."""
    if len(text) <= limit:
        return text
    half = limit // 2
    dropped = len(text) - 2 * half
    return f"{text[:half]}\n[... {dropped:,} characters truncated ...]\n{text[-half:]}"


@dataclass
class Image:
    data: str  # base64
    mime_type: str


def image_of(output: Output) -> Image | None:
    """The raster image an output carries (its first image MIME type), if any."""
    data: dict[str, Any] = output.get("data") or {}
    for mime in _IMAGE_TYPES:
        value = data.get(mime)
        if isinstance(value, str):
            return Image(data=value, mime_type=mime)
    return None


def _output_text(output: Output, shown: Collection[int]) -> str:
    kind = output["output_type"]
    if kind == "stream":
        return str(output["text"])
    if kind == "error":
        return "\n".join(output["traceback"]) or f"{output['ename']}: {output['evalue']}"
    data: dict[str, Any] = output.get("data", {})
    parts: list[str] = []
    image = image_of(output)
    if image is not None:
        if id(output) in shown:
            parts.append(f"[{image.mime_type} image shown below]")
        else:
            parts.append(
                f"[{image.mime_type} image not shown to you: too many or too large images "
                "in one result; the user sees it]"
            )
    elif "image/svg+xml" in data:
        parts.append("[SVG image output; not shown to the model]")
    if "text/plain" in data:
        parts.append(str(data["text/plain"]))
    elif "text/markdown" in data:
        parts.append(str(data["text/markdown"]))
    elif "text/html" in data:
        parts.append(str(data["text/html"]))
    elif "application/json" in data:
        parts.append(str(data["application/json"]))
    if "text/html" in data and "text/plain" in data and "<table" in str(data["text/html"]):
        parts.append("[an HTML table was also displayed to the user]")
    return "\n".join(parts) + "\n"


def bound_image(b64: str, mime: str, max_bytes: int) -> Image | None:
    """The image, downscaled if its base64 exceeds `max_bytes`; None if it cannot be.

    CPU-bound (PIL): call it in a thread.
    """
    if len(b64) <= max_bytes and mime in _MODEL_IMAGE_TYPES:
        return Image(data=b64, mime_type=mime)
    try:
        from PIL import Image as PILImage

        with PILImage.open(io.BytesIO(base64.b64decode(b64))) as img:
            img.load()
            picture = img.convert("RGB")
        for side in (2048, 1536, 1024, 768, 512, 384, 256):
            copy = picture.copy()
            copy.thumbnail((side, side))
            buffer = io.BytesIO()
            copy.save(buffer, format="JPEG", quality=85)
            encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
            if len(encoded) <= max_bytes:
                return Image(data=encoded, mime_type="image/jpeg")
    except Exception:
        logger.warning("could not downscale a %s image of %d bytes", mime, len(b64), exc_info=True)
    return None


def all_outputs(result: ExecutionResult) -> Iterator[Output]:
    """Background outputs, then the cell's own: the order the model reads them."""
    yield from result.background_outputs
    yield from result.outputs


def render(result: ExecutionResult, *, text_limit: int, shown: Collection[int] = ()) -> str:
    """The model's text view of `result`; `shown` holds id() of the image outputs it sees."""
    sections: list[str] = []
    if result.background_outputs:
        background = "".join(_output_text(o, shown) for o in result.background_outputs)
        sections.append(f"[output from background code since the last call]\n{background}")
    body = "".join(_output_text(o, shown) for o in result.outputs)
    sections.append(body if body.strip() else "[no output]")
    if result.message:
        sections.append(f"[{result.status}] {result.message}")
    text = strip_ansi("\n".join(s.rstrip("\n") for s in sections))
    return bound_text(text, text_limit)
