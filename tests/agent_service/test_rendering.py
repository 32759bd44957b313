"""What a text-only client sees of tool activity: each output once."""

from __future__ import annotations

import pytest

from kernel_agent_pytest.scripted_llm import Text, ToolCall

from .conftest import Stack
from .test_chat import stream_turn

pytestmark = pytest.mark.kernel

PLOT = "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()"
ERROR = "print('before', flush=True)\n1 / 0"


async def test_a_plot_and_an_error_are_shown_once(stack: Stack) -> None:
    stack.llm.script(
        ToolCall("execute_code", {"code": PLOT}),
        ToolCall("execute_code", {"code": ERROR}),
        ToolCall("execute_code", {"code": "print('ValueError: only printed')"}),
        Text("Done."),
    )
    content, _ = await stream_turn(stack, "once", "plot, then fail")
    assert "[image/png]" not in content
    assert content.count("![output 1](") == 1
    plot_part = content.split("```python\n" + ERROR)[0]
    assert "```text" not in plot_part  # no output block for a plot alone
    # the summary once, at the end of its traceback, after the cell's printed line
    assert content.count("ZeroDivisionError: division by zero") == 1
    assert content.index("before") < content.index("Traceback") < content.index("division by")
    # a printed line that merely looks like an error summary is still shown
    assert "```text\nValueError: only printed\n```" in content
