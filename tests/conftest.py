"""Suite-wide setup: offline litellm, no real LLM provider unless a test is marked `llm`."""

from __future__ import annotations

import os

import pytest

# Set before anything imports litellm: no cost-map download, no tokenizer fetches.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")

_PROVIDER_KEYS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "AGENT_API_KEY")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_key = any(os.environ.get(k) for k in _PROVIDER_KEYS)
    skip = pytest.mark.skip(reason="needs a real LLM provider key (OPENAI_API_KEY, ...)")
    for item in items:
        if "llm" in item.keywords and not has_key:
            item.add_marker(skip)
