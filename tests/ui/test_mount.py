"""The page is optional: off by setting, and the service starts without gradio."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from agent_service.app import create_app
from agent_service.config import Settings


def _mounted(settings: Settings) -> bool:
    return any(getattr(route, "path", None) == "/ui" for route in create_app(settings).routes)


def test_ui_is_mounted_unless_turned_off(tmp_path: Path) -> None:
    assert _mounted(Settings(data_dir=tmp_path, notebooks_dir=tmp_path))
    assert not _mounted(Settings(data_dir=tmp_path, notebooks_dir=tmp_path, ui=False))


def test_service_starts_without_gradio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now fails
    monkeypatch.delitem(sys.modules, "agent_service.ui", raising=False)
    assert not _mounted(Settings(data_dir=tmp_path, notebooks_dir=tmp_path))
