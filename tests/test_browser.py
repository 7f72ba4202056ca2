"""The preview in a real browser: Debian's headless Chromium, driven by Playwright.

Playwright drives the system's `/usr/bin/chromium` (installed by `.ci/run`); it never downloads
a browser of its own. The test clicks the way a developer does and looks at what is on screen,
including inside the sandboxed iframe that holds the HTML part.
"""

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from tests.ui import UiProcess

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Flags known to start headless Chromium reliably as root in a container, without any network
# traffic of its own (updates, sync, field trials).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 30_000


def test_click_through_to_a_sample_and_see_it_rendered(
    start_ui: Callable[..., UiProcess], tmp_path: Path
) -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: run .ci/run, or apt-get install chromium")
    ui = start_ui()
    screenshot = tmp_path / "sample.png"
    expect.set_options(timeout=TIMEOUT_MS)  # assertions wait this long (default 5 s)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=TIMEOUT_MS
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(ui.url)
            page.get_by_role("link", name="invoice", exact=True).click()
            expect(page.get_by_role("heading", name="invoice")).to_be_visible()
            page.get_by_role("link", name="overdue").click()
            expect(page.locator("h1.subject")).to_have_text("Invoice B-99 for Linus & Co")
            mail = page.frame_locator("iframe.mail")
            expect(mail.get_by_role("heading", name="Invoice B-99")).to_be_visible()
            expect(mail.get_by_text("Amount due: 990.00 EUR")).to_be_visible()
            # The inlined style reached the browser: the note is green.
            color = mail.locator("p.note").evaluate("node => getComputedStyle(node).color")
            assert color == "rgb(10, 125, 50)"
            page.get_by_role("link", name="Text").click()
            expect(page.locator("pre.text")).to_contain_text("Pay now")
            page.get_by_role("link", name="HTML mobile").click()
            expect(mail.get_by_text("Amount due: 990.00 EUR")).to_be_visible()
            # Live refresh: an edit shows up in the open page, nobody presses reload.
            body = tmp_path / "templates" / "invoice" / "body.html"
            body.write_text(body.read_text().replace("Amount due", "Still to pay"))
            expect(mail.get_by_text("Still to pay: 990.00 EUR")).to_be_visible()
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    with Image.open(screenshot) as image:
        colors = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colors is None or len(colors) > 10, "the screenshot is (nearly) blank"
