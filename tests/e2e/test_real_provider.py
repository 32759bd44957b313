"""One real conversation with a real model: runs only with a provider key (marker `llm`).

Set OPENAI_API_KEY (model `openai/gpt-4o-mini`, or KERNEL_AGENT_TEST_MODEL) or
ANTHROPIC_API_KEY (model `anthropic/claude-haiku-4-5`) to run it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

from tests.agent_service.conftest import Stack

pytestmark = [pytest.mark.llm, pytest.mark.kernel, pytest.mark.timeout(180)]


def _model() -> tuple[str, str]:
    if os.environ.get("OPENAI_API_KEY"):
        model = os.environ.get("KERNEL_AGENT_TEST_MODEL", "openai/gpt-4o-mini")
        return model, os.environ["OPENAI_API_KEY"]
    model = os.environ.get("KERNEL_AGENT_TEST_MODEL", "anthropic/claude-haiku-4-5")
    return model, os.environ.get("ANTHROPIC_API_KEY", "")


async def test_a_real_model_computes_in_the_kernel(start_stack: Callable[..., Any]) -> None:
    model, key = _model()
    stack: Stack = start_stack(model=model, api_base=None, api_key=key)
    client = stack.new_async_client()
    answer = await client.chat.completions.create(
        model="kernel-agent",
        messages=[
            {
                "role": "user",
                "content": "Use Python to compute the sum of the squares of 1..123 and store it "
                "in a variable called total. Reply with the number only.",
            }
        ],
        extra_headers={"X-Session-Id": "real-1"},
    )
    content = answer.choices[0].message.content or ""
    assert "```python" in content, "the model ran code"
    assert "627874" in content
    follow = await client.chat.completions.create(
        model="kernel-agent",
        messages=[{"role": "user", "content": "What is total // 2? Compute it in Python."}],
        extra_headers={"X-Session-Id": "real-1"},
    )
    assert "313937" in (follow.choices[0].message.content or "")
