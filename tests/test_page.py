"""The page of `ddrs serve`, in a real browser: Debian's chromium driven by Playwright."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")
playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(),
                       reason="needs Debian's chromium (apt-get install chromium)"),
]
from test_serve import TOKEN, _free_port, start_server  # noqa: E402

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield browser
        browser.close()


def digit_png(tmp_path: Path) -> Path:
    from ddrs.data import get_dataset

    x = get_dataset("digits", "test")[0][0]
    img = Image.fromarray((x[0].numpy() * 255).round().astype("uint8"), mode="L")
    path = tmp_path / "digit.png"
    img.resize((64, 64), Image.NEAREST).save(path)
    return path


@pytest.fixture
def server(digits_checkpoint, tmp_path):
    port = _free_port()
    process = start_server(digits_checkpoint, tmp_path / "m.sqlite", port, "--n", "2000")
    yield f"http://127.0.0.1:{port}/"
    process.kill()
    process.communicate()


def test_the_page_answers_an_upload_and_says_what_it_means(browser, server, tmp_path):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(server)
    page.click("#send")  # no file yet
    assert page.inner_text("#error") == "Choose an image file first."
    page.set_input_files("#file", str(digit_png(tmp_path)))
    held = []

    def hold(route):  # keep the query waiting until the page's waiting state was seen
        held.append(route)

    page.route("**/v1/certify", hold)
    page.click("#send")
    page.wait_for_function("document.getElementById('send').disabled")
    assert page.is_visible("#spinner") and page.is_hidden("#answer")
    page.wait_for_timeout(200)
    held[0].continue_()
    page.unroute("**/v1/certify")
    page.wait_for_selector("#answer", state="visible", timeout=60_000)
    assert not page.is_disabled("#send") and page.is_hidden("#spinner")
    verdict = page.inner_text("#verdict")
    assert re.fullmatch(r"class \d( \(\d\))?|abstain: no class is certain enough", verdict)
    assert re.search(r"Certified radius \d\.\d{3}: every image within L2 distance", page.inner_text(
        "#guarantee")) or verdict.startswith("abstain")
    assert re.search(r"noise level sigma\s+0\.\d{3}", page.inner_text("#details"))
    assert "memory entry 0" in page.inner_text("#memory")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 1200, "nothing overflows a 1,200 px window"
    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("DDRS_SCREENSHOT"):
        shutil.copy(shot, os.environ["DDRS_SCREENSHOT"])
    # the same image again: the stored answer
    page.click("#send")
    page.wait_for_function("document.getElementById('memory').innerText.includes('before')")
    assert page.inner_text("#verdict") == verdict


def test_errors_are_shown_on_the_page(browser, server, tmp_path):
    page = browser.new_page()
    page.goto(server)
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    page.set_input_files("#file", str(not_image))
    page.click("#send")
    page.wait_for_selector("#error", state="visible")
    assert page.inner_text("#error").startswith("Error 400: the upload is not an image")
    page.set_input_files("#file", str(digit_png(tmp_path)))
    page.route("**/v1/certify", lambda route: route.fulfill(
        status=413, content_type="application/json",
        body=json.dumps({"error": "request body over the limit of 10 bytes"})))
    page.click("#send")
    page.wait_for_function("document.getElementById('error').innerText.includes('413')")
    page.unroute("**/v1/certify")
    page.route("**/v1/certify", lambda route: route.abort())
    page.click("#send")
    page.wait_for_function("document.getElementById('error').innerText.includes('reached')")
    assert "could not be reached" in page.inner_text("#error")
    page.unroute("**/v1/certify")
    abstain = {"predict": -1, "class_name": None, "radius": 0.0, "sigma": 0.25,
               "changed": False, "shrunk": False, "mc_predict": -1, "mc_radius": 0.0,
               "repeat": False, "entry": 3, "expert": ""}
    page.route("**/v1/certify", lambda route: route.fulfill(
        status=200, content_type="application/json", body=json.dumps(abstain)))
    page.click("#send")
    page.wait_for_selector("#answer", state="visible")
    assert page.inner_text("#verdict") == "abstain: no class is certain enough"
    assert "-1" not in page.inner_text("#verdict")


def test_a_token_is_asked_for_and_kept_for_the_session(browser, digits_checkpoint, tmp_path):
    (tmp_path / "token").write_text(TOKEN)
    port = _free_port()
    process = start_server(digits_checkpoint, tmp_path / "m.sqlite", port, "--token-file",
                           str(tmp_path / "token"))
    try:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        assert page.is_visible("#token") and "needs a token" in page.inner_text("#token-row")
        assert "m.sqlite" not in page.content()
        page.set_input_files("#file", str(digit_png(tmp_path)))
        page.click("#send")
        page.wait_for_selector("#error", state="visible")
        assert "Error 401" in page.inner_text("#error") and "token" in page.inner_text("#error")
        page.fill("#token", TOKEN)
        page.click("#send")
        page.wait_for_selector("#answer", state="visible", timeout=60_000)
        page.reload()
        assert page.input_value("#token") == TOKEN  # kept for this browser session
    finally:
        process.kill()
        process.communicate()
