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
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium)"
    ),
]
from helpers import TOKEN, free_port, start_server  # noqa: E402

FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


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
    port = free_port()
    process = start_server(digits_checkpoint, tmp_path / "m.sqlite", port, "--n", "2000")
    yield f"http://127.0.0.1:{port}/"
    process.kill()
    process.communicate()


def screenshot(page, tmp_path: Path, name: str) -> None:
    """A full-page screenshot; with DDRS_SCREENSHOTS=DIR (`make screenshots`), kept there."""
    shot = tmp_path / f"{name}.png"
    page.screenshot(path=str(shot), full_page=True)
    folder = os.environ.get("DDRS_SCREENSHOTS")
    if folder:
        shutil.copy(shot, Path(folder) / f"serve-{name}.png")


def test_the_page_answers_an_upload_and_says_what_it_means(browser, server, tmp_path):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors = []
    page.on(
        "console", lambda message: errors.append(message.text) if message.type == "error" else None
    )
    page.goto(server)
    # the guarantee with its probability, before any query
    assert "probability at least 1 − α = 0.99 (α = 0.01)" in page.inner_text("body")
    assert "null" not in page.inner_text("#settings")
    page.click("#send")  # no file yet
    assert page.inner_text("#error") == "Choose an image file first."
    page.set_input_files("#file", str(digit_png(tmp_path)))
    assert page.is_visible("#upload")  # the image as chosen
    held = []

    def hold(route):  # keep the query waiting until the page's waiting state was seen
        held.append(route)

    page.route("**/v1/certify", hold)
    page.click("#send")
    page.wait_for_selector("#send:disabled")  # no page scripts from tests: the policy holds
    assert page.is_visible("#spinner") and page.is_hidden("#answer")
    page.wait_for_timeout(200)
    held[0].continue_()
    page.unroute("**/v1/certify")
    page.wait_for_selector("#answer", state="visible", timeout=60_000)
    assert not page.is_disabled("#send") and page.is_hidden("#spinner")
    verdict = page.inner_text("#verdict")
    assert re.fullmatch(r"class \d( \(\d\))?|abstain: no class is certain enough", verdict)
    assert re.search(
        r"Certified radius \d\.\d{3}: every image within L2 distance .* with "
        r"probability at least 0\.99 over the sampling",
        page.inner_text("#guarantee"),
    ) or verdict.startswith("abstain")
    assert re.search(r"noise level sigma\s+0\.\d{3}", page.inner_text("#details"))
    assert "memory entry 0" in page.inner_text("#memory")
    # what the model sees: the 64 x 64 upload reduced to the 8 x 8 input, enlarged 20x
    page.wait_for_selector("#preview", state="visible")
    assert page.evaluate("document.getElementById('preview').naturalWidth") == 160
    assert page.is_visible("#upload")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 1200, "nothing overflows a 1,200 px window"
    screenshot(page, tmp_path, "certify")
    # the same image again: the stored answer, said to be a repeat
    page.click("#send")
    page.locator("#memory", has_text="before").wait_for()
    assert page.inner_text("#verdict") == verdict
    assert "answered before (memory entry 0)" in page.inner_text("#memory")
    assert "nothing was sampled again" in page.inner_text("#memory")
    assert "(stored)" in page.inner_text("#details")
    assert errors == [], errors  # the page's policy blocked nothing it needs


def test_errors_are_shown_on_the_page(browser, server, tmp_path):
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    page.goto(server)
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    page.set_input_files("#file", str(not_image))
    page.click("#send")
    page.wait_for_selector("#error", state="visible")
    assert page.inner_text("#error") == (
        "The upload is not an image this service can read (send a PNG or JPEG file)."
    )
    assert "Error" not in page.inner_text("#error")  # no HTTP jargon
    screenshot(page, tmp_path, "error")
    page.set_input_files("#file", str(digit_png(tmp_path)))
    too_big = (
        "the image is 12000 x 12000 pixels (144.0 megapixels); this service takes "
        "images of up to 16.8 megapixels"
    )
    page.route(
        "**/v1/certify",
        lambda route: route.fulfill(
            status=413, content_type="application/json", body=json.dumps({"error": too_big})
        ),
    )
    page.click("#send")
    page.locator("#error", has_text="megapixels").wait_for()
    assert page.inner_text("#error") == too_big[0].upper() + too_big[1:] + "."
    page.unroute("**/v1/certify")
    page.route("**/v1/certify", lambda route: route.abort())
    page.click("#send")
    page.locator("#error", has_text="reached").wait_for()
    assert "could not be reached" in page.inner_text("#error")
    page.unroute("**/v1/certify")
    page.route(
        "**/v1/certify",
        lambda route: route.fulfill(
            status=503,
            content_type="application/json",
            body=json.dumps({"error": "the memory's database is unavailable; retry in a moment"}),
        ),
    )
    page.click("#send")
    page.locator("#error", has_text="memory").wait_for()
    assert "try again in a moment" in page.inner_text("#error")
    page.unroute("**/v1/certify")
    abstain = {
        "predict": -1,
        "class_name": None,
        "radius": 0.0,
        "sigma": 0.25,
        "changed": False,
        "shrunk": False,
        "mc_predict": -1,
        "mc_radius": 0.0,
        "repeat": False,
        "entry": 3,
        "expert": "",
    }
    page.route(
        "**/v1/certify",
        lambda route: route.fulfill(
            status=200, content_type="application/json", body=json.dumps(abstain)
        ),
    )
    page.click("#send")
    page.wait_for_selector("#answer", state="visible")
    assert page.inner_text("#verdict") == "abstain: no class is certain enough"
    assert "-1" not in page.inner_text("#verdict")
    screenshot(page, tmp_path, "abstain")


def test_a_token_is_asked_for_and_kept_for_the_session(browser, digits_checkpoint, tmp_path):
    (tmp_path / "token").write_text(TOKEN)
    port = free_port()
    process = start_server(
        digits_checkpoint, tmp_path / "m.sqlite", port, "--token-file", str(tmp_path / "token")
    )
    try:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        assert page.is_visible("#token") and "needs a token" in page.inner_text("#token-row")
        assert "m.sqlite" not in page.content()
        assert "α = 0.01" in page.inner_text("body")  # alpha, part of the guarantee
        page.set_input_files("#file", str(digit_png(tmp_path)))
        page.click("#send")
        page.wait_for_selector("#error", state="visible")
        assert page.inner_text("#error") == (
            "This service needs its token: enter it in the token field and send again."
        )
        page.fill("#token", "a-wrong-token-of-some-length")
        page.click("#send")
        page.locator("#error", has_text="accepted").wait_for()
        assert page.inner_text("#error").startswith("The token was not accepted")
        page.fill("#token", TOKEN)
        page.click("#send")
        page.wait_for_selector("#answer", state="visible", timeout=60_000)
        page.reload()
        assert page.input_value("#token") == TOKEN  # kept for this browser session
    finally:
        process.kill()
        process.communicate()
