"""HRA Studio in a real browser: headless Debian chromium driven by playwright uploads photos, trains with the real
trainer, generates and finds an image in the gallery. Screenshots go to $HRA_TEST_ARTIFACTS (default: tmp)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from test_app import PHOTOS, Server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium; CI installs it)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")


@pytest.fixture()
def artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("HRA_TEST_ARTIFACTS") or tmp_path / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_upload_train_generate_in_a_browser(tmp_path, artifacts):
    server = Server(tmp_path / "data")
    server.start()
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(server.url)
            assert "draws noise" in page.locator("#demo-note").inner_text()

            page.locator("#photos input[type=file]").set_input_files([str(p) for p in PHOTOS])
            page.get_by_text(f"{len(PHOTOS)} photo(s) accepted.").wait_for(timeout=30_000)
            assert page.locator("#photo-preview img").count() == len(PHOTOS)
            page.locator("#train-steps input").fill("4")
            page.locator("#start-train").click()
            page.locator("#start-msg").get_by_text("Job ").wait_for(timeout=30_000)
            page.locator("#job-progress[data-status=running]").wait_for(timeout=120_000)
            page.locator("#job-progress[data-status=done]").wait_for(timeout=300_000)
            page.locator("#samples img").first.wait_for(timeout=10_000)
            page.screenshot(path=artifacts / "app_train.png", full_page=True)
            assert "step 4/4" in page.locator("#job-progress").inner_text()

            page.get_by_role("tab", name="Generate").click()
            adapter = page.locator("#gen-adapter input")
            page.wait_for_function("el => el.value.startsWith('sks-')", arg=adapter.element_handle(), timeout=10_000)
            page.locator("#g-steps input").fill("10")
            page.locator("#generate").click()
            page.locator("#gallery img").first.wait_for(timeout=120_000)
            assert page.locator("#gallery img").count() == 1
            page.screenshot(path=artifacts / "app_generate.png", full_page=True)
            browser.close()
        assert not errors, errors
    finally:
        server.stop()
        log = next(tmp_path.glob("app-*.log"), None)
        if log is not None:
            shutil.copy(log, artifacts / "app_browser.log")
