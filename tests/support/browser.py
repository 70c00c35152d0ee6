"""A real headless browser for page tests: Debian's ``chromium`` driven by Playwright.

No browser download (``playwright install``) is needed or used: Playwright
launches the system ``chromium`` through ``executable_path``. A missing
chromium or Playwright fails the test with the command that fixes it; it is
never skipped (CI installs both: ``./dev test`` installs chromium).

    async def test_x(browser_page, tmp_path):
        async with screenshot_on_failure(browser_page, tmp_path):
            await browser_page.goto(url)
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    """Debian's chromium (``$CHROMIUM`` overrides), or a failed test saying how to get it."""
    candidates = [os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    pytest.fail(
        "Debian's chromium is not installed: `apt-get install -y chromium` "
        "(./dev test installs it), or point $CHROMIUM at a chromium binary",
        pytrace=False,
    )


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.fail(
            "Playwright for Python is missing: `.venv/bin/pip install -e '.[dev]'` "
            "(no `playwright install`: the tests use Debian's chromium)",
            pytrace=False,
        )
    executable = chromium_path()
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=executable, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def browser_page(browser: Browser) -> AsyncIterator[Page]:
    """A page in a fresh context (own cookies), 1280x900, 10 s default timeouts."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(10_000)
    page = await context.new_page()
    try:
        yield page
    finally:
        await context.close()


@contextlib.asynccontextmanager
async def screenshot_on_failure(
    page: Page, directory: Path, name: str = "failure"
) -> AsyncIterator[None]:
    """Save ``directory/name.png`` (full page) and say where if the block fails."""
    try:
        yield
    except BaseException:
        path = directory / f"{name}.png"
        with contextlib.suppress(Exception):
            await page.screenshot(path=str(path), full_page=True)
            print(f"screenshot of the page at failure: {path}")
        raise
