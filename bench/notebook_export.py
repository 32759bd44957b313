"""Benchmark: export of a 1,000-cell transcript to .ipynb (target <= 200 ms).

Builds a transcript of 350 turns (user message, one execution, assistant answer:
1,050 cells) in a temporary SQLite store, with outputs shaped like real kernel
outputs (stdout, a DataFrame's HTML and text, a small PNG), then times what the
service does after every turn: read the transcript, build the notebook with
nbformat, serialize it and write it atomically. Prints one JSON line.
"""

from __future__ import annotations

import base64
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

from agent_service.exporter import NotebookExporter
from agent_service.notebook import build_notebook, dumps, validate
from agent_service.sqlite_store import SqliteStore

TURNS = 350
RUNS = 10


def _png() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (320, 240), (30, 120, 200)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _result(i: int, png: str) -> dict[str, object]:
    html = "<table><tr><th>a</th></tr>" + "".join(f"<tr><td>{j}</td></tr>" for j in range(10))
    outputs: list[dict[str, object]] = [
        {"output_type": "stream", "name": "stdout", "text": f"step {i}\n" * 5},
        {
            "output_type": "execute_result",
            "execution_count": i,
            "data": {"text/plain": "   a\n0  1", "text/html": html + "</table>"},
            "metadata": {},
        },
    ]
    if i % 10 == 0:
        outputs.append({"output_type": "display_data", "data": {"image/png": png}, "metadata": {}})
    return {"status": "ok", "execution_count": i, "outputs": outputs, "elapsed": 0.003}


def main() -> None:
    png = _png()
    with tempfile.TemporaryDirectory(prefix="ka-bench-") as tmp:
        store = SqliteStore(Path(tmp) / "t.sqlite3")
        store.create_session("bench", "kernel-agent")
        for i in range(1, TURNS + 1):
            store.append("bench", i, "user", {"content": f"Question {i}?"})
            store.append(
                "bench",
                i,
                "tool_result",
                {
                    "call_id": f"c{i}",
                    "name": "execute_code",
                    "arguments": {"code": f"df = make({i})\ndf"},
                    "text": "   a\n0  1",
                    "is_error": False,
                    "structured": _result(i, png),
                },
            )
            store.append("bench", i, "assistant", {"content": f"Answer {i}."})
        exporter = NotebookExporter(store, Path(tmp) / "notebooks")
        timings = []
        for _ in range(RUNS):
            started = time.perf_counter()
            path = exporter.export_now("bench")
            timings.append((time.perf_counter() - started) * 1000)
        assert path is not None
        record = store.get_session("bench")
        assert record is not None
        notebook = build_notebook(record, store.events("bench"))
        validate(notebook)
        size = len(dumps(notebook))
        store.close()
    p50 = statistics.median(timings)
    print(
        json.dumps(
            {
                "cells": len(notebook.cells),
                "export_p50_ms": round(p50, 1),
                "export_max_ms": round(max(timings), 1),
                "notebook_bytes": size,
                "runs": RUNS,
                "target_ms": 200,
                "met": p50 <= 200,
            }
        )
    )


if __name__ == "__main__":
    main()
