"""HRA Studio in a real browser: headless Debian chromium driven by playwright, on the demo world: a rejected field and
a bad import leave no red "Error" badge, one click picks a demo subject, the real trainer trains it, the page shows
samples and the loss curve, and Generate finds the new adapter and its prompt. Screenshots go to
$HRA_TEST_ARTIFACTS (default: tmp)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from test_app import Server

from hra_diffusion.demo_world import find_demo_world

pytestmark = pytest.mark.slow

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


def no_error_badges(page) -> bool:
    return page.get_by_text("Error", exact=True).count() == 0


@pytest.mark.skipif(find_demo_world() is None, reason="assets/demo_world is not built")
def test_upload_train_generate_in_a_browser(tmp_path, artifacts):
    server = Server(tmp_path / "data", demo_world=True)
    server.start()
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(server.url)
            assert "Demo world" in page.locator("#demo-note").inner_text()

            page.locator("#example-star_toy").click()
            page.get_by_text("5 photo(s) accepted.").wait_for(timeout=30_000)
            assert page.locator("#photo-preview img").count() == 5
            page.locator("#train-steps input").fill("4")
            r_box = page.get_by_label("r (reflections)")
            r_box.fill("7")  # odd r: refused, with the reason where the job message goes
            page.locator("#start-train").click()
            page.locator("#start-msg").get_by_text("odd number of reflections").wait_for(timeout=30_000)
            assert no_error_badges(page)
            r_box.fill("8")
            page.locator("#start-train").click()
            page.locator("#start-msg").get_by_text("submitted").wait_for(timeout=30_000)
            page.locator("#job-progress[data-status=running]").wait_for(timeout=120_000)
            page.locator("#job-progress[data-status=done]").wait_for(timeout=300_000)
            page.locator("#samples img").first.wait_for(timeout=10_000)
            assert "step 4" in page.locator("#samples").inner_text()  # samples are labelled with their step
            page.screenshot(path=artifacts / "app_train.png", full_page=True)
            assert "step 4/4" in page.locator("#job-progress").inner_text()

            page.get_by_role("tab", name="Adapters").click()
            bad = tmp_path / "not_an_adapter.safetensors"
            bad.write_bytes(b"not safetensors at all")
            page.get_by_text("Import an adapter file").click()
            page.locator("#import-file input[type=file]").set_input_files(str(bad))
            page.get_by_role("button", name="Import", exact=True).click()
            page.locator("#shelf-msg").get_by_text("Not done:").wait_for(timeout=30_000)
            assert no_error_badges(page)

            page.get_by_role("tab", name="Generate").click()
            adapter = page.locator("#gen-adapter input")
            page.wait_for_function("el => el.value.startsWith('qwe-')", arg=adapter.element_handle(), timeout=10_000)
            assert page.locator("#gen-prompt textarea").input_value() == "a photo of qwe toy"
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
