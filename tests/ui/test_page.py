"""The page's own behaviour: titles, Delete, the running state and Stop, outputs shown once,
the keyboard."""

from __future__ import annotations

import re

import httpx
import pytest
from playwright.async_api import expect

from kernel_agent_pytest.scripted_llm import Gate, Hold, Text, ToolCall
from tests.support.streams import LONG_CELL, read_all, read_until

from .conftest import TIMEOUT_MS, Stack

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.timeout(240),
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting:Warning"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated:Warning"),
]

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
    await ui.see("#chat", "sleeping now")  # its output, not the code: the cell runs
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


async def test_a_session_reopened_mid_turn_can_be_stopped(stack: Stack, open_ui) -> None:
    # The turn runs for another client (or a page since reloaded): nothing streams it here.
    stack.llm.script(ToolCall("execute_code", {"code": LONG_CELL}))
    stream = await stack.new_async_client().chat.completions.create(
        model="kernel-agent",
        messages=[{"role": "user", "content": "sleep elsewhere"}],
        stream=True,
        extra_headers={"X-Session-Id": "elsewhere"},
    )
    await read_until(stream, "sleeping now")
    ui = await open_ui(stack)
    await ui.page.locator("#sessions input").click()
    await ui.check(
        "the running session is listed",
        ui.page.get_by_role("option", name=re.compile("sleep elsewhere")).click(),
    )
    await ui.see("#status", "running a turn right now")
    await ui.check(
        "Stop is offered", expect(ui.page.locator("#stop")).to_be_visible(timeout=TIMEOUT_MS)
    )
    await ui.page.locator("#stop").click()
    await ui.see("#chat", "Stopped: you stopped this turn.")  # the turn as saved, once ended
    await ui.see("#chat", "KeyboardInterrupt")
    await ui.idle()
    assert "Stopped: you stopped this turn." in await read_all(stream)  # the other client's


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


WRITE_CSV = (
    "import pandas as pd\ndf = pd.read_csv('sales.csv')\ndf['double'] = df.revenue * 2\n"
    "df.to_csv('doubled.csv', index=False)\nprint(df.revenue.sum())"
)
# What a browser does when files are dropped on the chat (Playwright drags no files itself).
DROP = """([name, text]) => {
    const transfer = new DataTransfer();
    transfer.items.add(new File([text], name, { type: "text/plain" }));
    const chat = document.querySelector("#chat");
    for (const type of ["dragenter", "dragover", "drop"]) {
        chat.dispatchEvent(new DragEvent(type, { dataTransfer: transfer, bubbles: true }));
    }
}"""


async def test_files_upload_download_and_delete(stack: Stack, open_ui, tmp_path) -> None:
    data = tmp_path / "sales.csv"
    data.write_text("month,revenue\n1,10\n2,30\n")
    ui = await open_ui(stack)
    await ui.see("#files-hint", "No files yet")
    # picked: the session starts with the upload
    await ui.page.locator("#upload input[type=file]").set_input_files(data)
    await ui.see("#status", "Added sales.csv")
    await ui.see("#file-list", "sales.csv · 24 bytes")
    # the agent reads it and writes a file of its own
    stack.llm.script(ToolCall("execute_code", {"code": WRITE_CSV}), Text("Wrote doubled.csv."))
    await ui.send("double the revenue")
    await ui.see("#chat", "Wrote doubled.csv.")
    await ui.see("#chat", "40")
    await ui.idle()
    await ui.see("#chat", "Files written in this turn: doubled.csv")
    await ui.see("#file-list", "doubled.csv")
    told = stack.llm.requests[0]["messages"]
    assert any("sales.csv" in str(m.get("content")) for m in told[:-1]), told
    await ui.check(
        "the session is named by its first message",
        expect(ui.page.locator("#sessions input")).to_have_value(
            re.compile(r"^double the revenue · \w{8}$"), timeout=TIMEOUT_MS
        ),
    )
    # download what the agent wrote
    await ui.page.locator("#file-list label", has_text="doubled.csv").click()
    button = ui.page.locator("#file-download")
    await ui.check("the file is ready", expect(button).to_be_enabled(timeout=TIMEOUT_MS))
    async with ui.page.expect_download(timeout=TIMEOUT_MS) as info:
        await button.click()
    download = await info.value
    assert download.suggested_filename == "doubled.csv"
    saved = tmp_path / "downloaded.csv"
    await download.save_as(saved)
    assert saved.read_text().splitlines() == ["month,revenue,double", "1,10,20", "2,30,60"]
    # dropped on the chat, then deleted
    await ui.page.evaluate(DROP, ["notes.txt", "dropped on the chat"])
    await ui.see("#status", "Added notes.txt")
    await ui.see("#file-list", "notes.txt")
    await ui.page.locator("#file-list label", has_text="notes.txt").click()
    delete = ui.page.locator("#file-delete")
    await ui.check("the file can be deleted", expect(delete).to_be_enabled(timeout=TIMEOUT_MS))
    await delete.click()
    await ui.see("#status", "Deleted notes.txt")
    await ui.check(
        "the file is gone",
        expect(ui.page.locator("#file-list")).not_to_contain_text("notes.txt", timeout=TIMEOUT_MS),
    )
    await ui.see("#file-list", "sales.csv")
