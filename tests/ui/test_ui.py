"""The web UI in a real browser, against the real service, kernels and the scripted LLM."""

from __future__ import annotations

import re

import nbformat
import pytest
from playwright.async_api import expect

from kernel_agent_pytest.scripted_llm import Error, Gate, Hold, Stall, Text, ToolCall, ToolCalls

from .conftest import TIMEOUT_MS, Stack, Ui

pytestmark = [
    pytest.mark.kernel,
    # Each page check waits up to TIMEOUT_MS on a loaded machine; the backstop sits above that.
    pytest.mark.timeout(240),
    # gradio's own event analytics use pandas options that pandas 3 deprecates
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting:Warning"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated:Warning"),
]

PLOT = (
    "import time\nimport matplotlib.pyplot as plt\n"
    "for step in ('first', 'second'):\n"
    "    print('step', step, flush=True)\n"
    "    time.sleep(2 if step == 'first' else 0)\n"
    "plt.plot([1, 3, 2])\nplt.show()"
)


async def test_chat_streams_text_live_output_code_and_an_image(stack: Stack, open_ui) -> None:
    stack.llm.script(
        ToolCalls([ToolCall("execute_code", {"code": PLOT})], text="Let me plot that."),
        Text(
            "The plot shows **three** points. " + "Words stream in. " * 4 + "The end.", delay=0.05
        ),
    )
    ui = await open_ui(stack)
    await ui.send("plot three points")
    await ui.see("#chat", "Let me plot that.")
    await ui.see("#chat", "step first")
    # live output: the first line is on the page while the cell still sleeps
    await ui.check("output streams while the cell runs", _lacks(ui, "#chat", "step second"))
    await ui.see("#chat code", "plt.plot([1, 3, 2])")
    await ui.see("#chat", "step second")
    sources = await ui.images_loaded("#chat")
    # served by the service while streaming; embedded from the transcript once the turn is saved
    assert "/outputs/" in sources[0] or sources[0].startswith("data:image/png"), sources
    await ui.see("#chat", "The plot shows")
    await ui.check("the answer streams", _lacks(ui, "#chat", "The end."))
    await ui.see("#chat strong", "three")
    await ui.see("#chat", "The end.")
    await ui.check(
        "the new session is listed",
        expect(ui.page.locator("#sessions input")).to_have_value(
            re.compile(r"^plot three points · \w{8}$"), timeout=TIMEOUT_MS
        ),
    )


async def test_chat_shows_dataframes_as_tables(stack: Stack, open_ui) -> None:
    code = "import pandas as pd\npd.DataFrame({'city': ['Oslo', 'Lima'], 'n': [7, 9]})"
    stack.llm.script(ToolCall("execute_code", {"code": code}), Text("Two cities."))
    ui = await open_ui(stack)
    await ui.send("a table please")
    await ui.see("#chat", "Two cities.")
    await ui.see("#chat table", "Lima")


async def _lacks(ui: Ui, selector: str, text: str) -> None:
    """`selector` does not show `text` right now."""
    await expect(ui.page.locator(selector)).not_to_contain_text(text, timeout=1)


async def test_code_box_runs_python_with_tables_images_and_errors(stack: Stack, open_ui) -> None:
    ui = await open_ui(stack)
    await ui.run_code(
        "import pandas as pd\nimport matplotlib.pyplot as plt\nprint('from the box')\n"
        "plt.plot([2, 1])\nplt.show()\npd.DataFrame({'left': [1, 2], 'right': [3, 4]})"
    )
    await ui.see("#code-output", "from the box")
    await ui.see("#code-output table", "right")
    await ui.images_loaded("#code-output")
    await ui.run_code("1 / 0")
    await ui.see("#code-output", "ZeroDivisionError")
    # the side panels: how to attach to this kernel, the skills, the models
    for panel in ("Attach JupyterLab", "Skills", "Settings"):
        await ui.page.get_by_role("button", name=panel).click()
    await ui.page.locator("#attach").click()
    await ui.see("#attach-info", "jupyter console --existing")
    await ui.see("#skills", "sympy-math")
    await ui.check(
        "the models are offered",
        expect(ui.page.locator("#model input")).to_have_value("kernel-agent"),
    )
    # the model hears of it next turn; the chat goes to the same session
    stack.llm.script(Text("I see you divided by zero."))
    await ui.send("what did I run?")
    await ui.see("#chat", "divided by zero")
    seen = stack.llm.requests[-1]["messages"]
    assert any("1 / 0" in str(m.get("content")) for m in seen), seen


async def test_reload_switch_back_to_a_session_and_download_its_notebook(
    stack: Stack, open_ui, tmp_path
) -> None:
    stack.llm.script(ToolCall("execute_code", {"code": "x = 6 * 7\nprint(x)"}), Text("x is 42."))
    ui = await open_ui(stack)
    await ui.send("compute x")
    await ui.see("#chat", "x is 42.")
    await ui.reload()
    await ui.check(
        "the chat is empty after a reload",
        expect(ui.page.locator("#chat")).not_to_contain_text("x is 42", timeout=TIMEOUT_MS),
    )
    await ui.page.locator("#sessions input").click()
    await ui.check(
        "the earlier session is listed", ui.page.get_by_role("option", name="compute x").click()
    )
    await ui.see("#chat", "x is 42.")
    await ui.see("#chat code", "x = 6 * 7")
    await ui.see("#chat", "42")
    download_button = ui.page.locator("#download")
    await ui.check("the notebook is ready", expect(download_button).to_be_enabled())
    async with ui.page.expect_download() as info:
        await download_button.click()
    download = await info.value
    assert download.suggested_filename.endswith(".ipynb")
    path = tmp_path / download.suggested_filename
    await download.save_as(path)
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code[0].source == "x = 6 * 7\nprint(x)"
    assert code[0].outputs[0]["text"] == "42\n"
    # and the conversation goes on in that session
    stack.llm.script(Text("Still 42."))
    await ui.send("and now?")
    await ui.see("#chat", "Still 42.")
    assert [m["role"] for m in stack.llm.requests[-1]["messages"][1:]] == [
        "user", "assistant", "tool", "assistant", "user",
    ]  # fmt: skip


async def test_busy_session_and_provider_failure_are_readable(stack: Stack, open_ui) -> None:
    stack.llm.script(Stall(3, Text("Slow answer.")))
    ui = await open_ui(stack)
    await ui.send("take your time")
    await stack.llm.wait_for_requests(1)
    await ui.run_code("print('meanwhile')")
    await ui.see("#code-output", "running a turn")
    await ui.see("#chat", "Slow answer.")
    await ui.idle()  # the page is done with that turn: the next message is not its
    # retry-after 0: litellm retries at once, so the page shows the failure without backoff.
    stack.llm.script(*[Error(500, "the provider is down", headers={"retry-after": "0"})] * 3)
    await ui.send("again")
    await ui.see("#status", "the provider is down")
    await ui.see("#chat", "Error")
    text = await ui.page.locator("body").inner_text()
    assert "Traceback" not in text


async def test_a_message_sent_during_a_turn_is_answered_not_dropped(stack: Stack, open_ui) -> None:
    gate = Gate()
    stack.llm.script(Hold(gate, Text("First answer.")))
    ui = await open_ui(stack)
    await ui.send("first question")
    await ui.see("#chat", "first question")  # the same update emptied the message box
    await stack.llm.wait_for_requests(1)
    await ui.send("second question")  # Enter while the turn runs: sent, and refused aloud
    await ui.see("#status", "already running a turn")
    gate.open()
    await ui.see("#chat", "First answer.")
    await ui.idle()
    assert len(stack.llm.requests) == 1, "the refused message never reached the model"


async def test_no_model_configured_is_explained(start_stack, open_ui) -> None:
    stack = start_stack(model=None)
    ui = await open_ui(stack)
    await ui.see("#status", "No model is configured")
    await ui.send("hello?")
    await ui.see("#status", "AGENT_MODEL")
    await ui.run_code("print(40 + 2)")
    await ui.see("#code-output", "42")


async def test_api_key_is_entered_in_the_page(start_stack, open_ui) -> None:
    stack = start_stack(api_keys=["sekrit"])
    stack.llm.script(
        ToolCall("execute_code", {"code": "import matplotlib.pyplot as plt\nplt.plot([1])"}),
        Text("Plotted."),
    )
    ui = await open_ui(stack)
    await ui.see("#status", "Enter an API key")
    await ui.page.locator("#api-key input").fill("sekrit")
    await ui.page.locator("#api-key input").press("Enter")
    await ui.check(
        "the key is accepted",
        expect(ui.page.locator("#status")).not_to_contain_text("API key", timeout=TIMEOUT_MS),
    )
    await ui.send("plot one point")
    await ui.see("#chat", "Plotted.")
    sources = await ui.images_loaded("#chat")
    assert sources[0].startswith("data:image/png;base64,"), sources[0][:80]
    await ui.reload()  # the browser keeps the key
    await ui.check(
        "the saved key is used after a reload",
        expect(ui.page.locator("#status")).to_be_empty(),
    )
