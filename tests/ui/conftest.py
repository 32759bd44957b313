"""A real browser on the real stack: headless Debian Chromium driven by Playwright.

`open_ui(stack)` opens the stack's /ui page in a fresh browser context and returns a `Ui`
whose checks take a screenshot when they fail and name it in the assertion message.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect
from playwright.async_api import Error as PlaywrightError

from tests.agent_service.conftest import Stack, stack, start_stack  # noqa: F401

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(tempfile.gettempdir()) / "kernel-agent-artifacts" / "ui"
# Quiet and offline: no sync, updates, field trials or QUIC probes to the internet.
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# A deadline for what the page must show, not a speed claim: generous for a loaded machine.
TIMEOUT_MS = 60_000


class Ui:
    """One page of the web UI, with the few gestures the tests need."""

    def __init__(self, page: Page, target: Stack, name: str) -> None:
        self.page = page
        self.stack = target
        self.name = name
        self._shots = 0

    async def open(self) -> Ui:
        await self.check("the page loads", self.page.goto(f"{self.stack.url}/ui/"))
        await self.see("#about", "kernels")
        return self

    async def reload(self) -> None:
        await self.check("the page reloads", self.page.reload())
        await self.see("#about", "kernels")

    async def send(self, text: str) -> None:
        box = self.page.locator("#message textarea")
        await self.check("the message box takes text", box.fill(text))
        await box.press("Enter")

    async def run_code(self, code: str) -> None:
        editor = self.page.locator("#code .cm-content")
        if not await editor.is_visible():  # the code box's panel starts closed
            panel = self.page.get_by_role("button", name="Run Python in this session's kernel")
            await self.check("the code box opens", panel.click())
        await self.check("the code box takes code", editor.fill(code))
        await self.page.locator("#run").click()

    async def idle(self) -> None:
        """The page shows no running turn: its running line and Stop button are gone."""
        await self.check(
            "the turn ends",
            expect(self.page.locator("#stop")).to_be_hidden(timeout=TIMEOUT_MS),
        )
        await self.check(
            "Send is back", expect(self.page.locator("#send")).to_be_visible(timeout=TIMEOUT_MS)
        )

    async def see(self, selector: str, text: str | re.Pattern[str]) -> None:
        """`selector` shows `text` within the timeout."""
        await self.check(
            f"{selector} shows {text!r}",
            expect(self.page.locator(selector).first).to_contain_text(text, timeout=TIMEOUT_MS),
        )

    async def images_loaded(self, selector: str, count: int = 1) -> list[str]:
        """At least `count` images under `selector` have loaded; returns their sources."""
        script = """([sel, n]) => {
            const imgs = [...document.querySelectorAll(sel + ' img')]
                .filter(i => i.complete && i.naturalWidth > 0);
            return imgs.length >= n ? imgs.map(i => i.src) : null;
        }"""
        handle = await self.check(
            f"{count} image(s) load in {selector}",
            self.page.wait_for_function(script, arg=[selector, count], timeout=TIMEOUT_MS),
        )
        sources: list[str] = await handle.json_value()
        return sources

    async def check(self, what: str, action: Awaitable[Any]) -> Any:
        """Await `action`; on failure, screenshot the page and say where the picture is."""
        try:
            return await action
        except (AssertionError, PlaywrightError) as exc:
            path = await self.screenshot()
            raise AssertionError(f"{what}: {exc}\nscreenshot: {path}") from exc

    async def screenshot(self) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self._shots += 1
        path = ARTIFACTS / f"{self.name}-{self._shots}.png"
        await self.page.screenshot(path=path, full_page=True)
        return path


@pytest.fixture(autouse=True)
def _needs_chromium(request: pytest.FixtureRequest) -> None:
    """Skip browser tests before any server starts (autouse fixtures come first)."""
    if "open_ui" in request.fixturenames and not CHROMIUM.exists():
        pytest.skip(
            f"{CHROMIUM} is missing: install Debian's chromium (scripts/ensure_chromium.sh)"
        )


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        # launch() gives every browser a fresh, temporary user-data-dir.
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=30_000
        )
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def open_ui(
    browser: Browser, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[[Stack], Awaitable[Ui]]]:
    """Factory: a new page on a stack's /ui; its context is closed after the test."""
    contexts = []
    name = re.sub(r"[^\w.-]+", "_", request.node.name)

    async def open_page(target: Stack) -> Ui:
        context = await browser.new_context(
            accept_downloads=True, viewport={"width": 1280, "height": 900}
        )
        contexts.append(context)
        context.set_default_timeout(TIMEOUT_MS)
        page = await context.new_page()
        return await Ui(page, target, f"{name}-{len(contexts)}").open()

    yield open_page
    for context in contexts:
        await context.close()
