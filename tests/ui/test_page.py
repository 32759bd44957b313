"""The page's own behaviour: titles, Delete, the running state and Stop, outputs shown once,
the keyboard."""

from __future__ import annotations

import re

import httpx
import pytest
from playwright.async_api import expect

from kernel_agent_pytest.scripted_llm import Gate, Hold, Text, ToolCall

from .conftest import TIMEOUT_MS, Stack

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.timeout(240),
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting:Warning"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated:Warning"),
]

LONG_CELL = "x = 41\nimport time\nprint('sleeping', flush=True)\ntime.sleep(600)"
PLOT = "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()"


async def _sessions(stack: Stack) -> list[dict]:
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
        data: list[dict] = (await http.get("/v1/sessions")).json()["data"]
    return data


async def test_title_and_delete_needs_a_selection_and_a_confirmation(stack: Stack, open_ui) -> None:
    stack.llm.script(Text("Hello."))
    ui = await open_ui(stack)
    delete = ui.page.locator("#delete")
    await ui.check(
        "Delete is off without a session", expect(delete).to_be_disabled(timeout=TIMEOUT_MS)
    )
    await ui.send("## **Plot** the `sales` of [the file](http://example.com/f.csv)\nthen more")
    await ui.see("#chat", "Hello.")
    await ui.check(
        "the title is the first line without markup",
        expect(ui.page.locator("#sessions input")).to_have_value(
            re.compile(r"^Plot the sales of the file · \w{8}$"), timeout=TIMEOUT_MS
        ),
    )
    await ui.check("Delete is on for the session", expect(delete).to_be_enabled(timeout=TIMEOUT_MS))
    # Gradio puts a group's id on two nested elements; absent from the page when hidden
    confirm = ui.page.locator("#delete-confirm:visible")
    await delete.click()
    await ui.see("#delete-question", "removed for good")
    await ui.page.locator("#delete-no").click()
    await ui.check(
        "keeping it hides the question", expect(confirm).to_have_count(0, timeout=TIMEOUT_MS)
    )
    await ui.see("#chat", "Hello.")
    assert len(await _sessions(stack)) == 1

    await delete.click()
    await ui.page.locator("#delete-yes").click()
    await ui.see("#status", "Deleted session")
    await ui.check("Delete is off again", expect(delete).to_be_disabled(timeout=TIMEOUT_MS))
    await ui.check("the question is gone", expect(confirm).to_have_count(0, timeout=TIMEOUT_MS))
    assert await _sessions(stack) == []


async def test_stop_during_a_long_cell_keeps_the_kernel(stack: Stack, open_ui) -> None:
    stack.llm.script(ToolCall("execute_code", {"code": LONG_CELL}))
    ui = await open_ui(stack)
    await ui.send("sleep for ten minutes")
    await ui.see("#turn-state", "Running")
    await ui.see("#chat", "sleeping")  # the cell runs
    await ui.page.locator("#stop").click()
    await ui.see("#chat", "Stopped: you stopped this turn.")
    await ui.see("#chat", "KeyboardInterrupt")
    await ui.idle()
    await ui.check(
        "the running line is gone",
        expect(ui.page.locator("#turn-state")).not_to_contain_text("Running", timeout=TIMEOUT_MS),
    )
    # the next turn runs in the same kernel: x survived
    stack.llm.script(ToolCall("execute_code", {"code": "print(x + 1)"}), Text("Same kernel."))
    await ui.send("is x still there?")
    await ui.see("#chat", "Same kernel.")
    await ui.see("#chat", re.compile(r"^42$", re.MULTILINE))
    await ui.idle()


async def test_a_plot_and_an_error_are_shown_once(stack: Stack, open_ui) -> None:
    gate = Gate()
    stack.llm.script(
        ToolCall("execute_code", {"code": PLOT}),
        ToolCall("execute_code", {"code": "print('before', flush=True)\n1 / 0"}),
        Hold(gate, Text("Both shown.")),
    )
    ui = await open_ui(stack)
    await ui.send("plot, then fail")

    async def shown_once() -> None:
        await ui.images_loaded("#chat")
        await ui.see("#chat", "Traceback")
        text = await ui.page.locator("#chat").inner_text()
        assert "[image/png" not in text, text
        assert text.count("ZeroDivisionError: division by zero") == 1, text
        assert await ui.page.locator("#chat img").count() == 1

    # while the turn streams (the model holds its answer), then as recorded
    await stack.llm.wait_for_requests(3, within=TIMEOUT_MS / 1000)
    await shown_once()
    gate.open()
    await ui.see("#chat", "Both shown.")
    await ui.idle()
    await shown_once()


async def test_enter_sends_and_shift_enter_starts_a_new_line(stack: Stack, open_ui) -> None:
    stack.llm.script(Text("Two lines received."))
    ui = await open_ui(stack)
    box = ui.page.locator("#message textarea")
    await box.press_sequentially("first line")
    await box.press("Shift+Enter")
    await box.press_sequentially("second line")
    await ui.check(
        "Shift+Enter made a new line",
        expect(box).to_have_value("first line\nsecond line", timeout=TIMEOUT_MS),
    )
    await box.press("Enter")
    await ui.see("#chat", "Two lines received.")
    await ui.check("the box is emptied", expect(box).to_have_value("", timeout=TIMEOUT_MS))
    sent = stack.llm.requests[0]["messages"][-1]
    assert sent == {"role": "user", "content": "first line\nsecond line"}
