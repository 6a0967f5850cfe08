"""The web page at GET /, driven by a real headless Chromium (tests/browser.py)."""

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from browser import chromium, open_page, requires_browser, screenshot, wait_for_bars
from ray import serve
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait

from serve.schemas import ServeSettings
from serve.testing import deployment_options, start_app
from vitbirds.model.files import MODEL_CARD_FILE

pytestmark = requires_browser


@pytest.fixture(scope="module")
def url(ray_session, tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[str]:
    work = tmp_path_factory.mktemp("web")
    (model_dir / MODEL_CARD_FILE).write_text("# Model card: the web page's test model\n")
    settings = ServeSettings(model_dir=str(model_dir), prediction_log=str(work / "log.jsonl"))
    yield start_app(settings, deployment_options(0.1))
    serve.shutdown()


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with chromium() as driver:
        yield driver


def _wait_for_results(browser) -> None:
    wait_for_bars(browser)
    WebDriverWait(browser, 60).until(
        lambda d: d.execute_script(
            "const img = document.getElementById('overlay');"
            "return img.complete && img.naturalWidth > 0;"
        )
    )


def test_choosing_a_photo_shows_five_bars_and_the_attention_overlay(
    browser, url, photo, photo_file
):
    open_page(browser, url)
    assert "classes" in browser.find_element(By.ID, "model").text
    card = browser.find_element(By.ID, "model-card")
    assert card.get_attribute("href") == url + "/model/card"
    browser.find_element(By.ID, "file").send_keys(str(photo_file))
    _wait_for_results(browser)
    screenshot(browser, "web_page_upload")

    expected = requests.post(url + "/predict", files={"file": photo}).json()
    labels = [e.get_attribute("title") for e in browser.find_elements(By.CSS_SELECTOR, ".label")]
    assert labels == [p["label"] for p in expected["predictions"]]
    widths = [e.size["width"] for e in browser.find_elements(By.CSS_SELECTOR, "#bars .fill")]
    assert all(width > 0 for width in widths)
    assert widths == sorted(widths, reverse=True)
    overlay_width = browser.execute_script("return document.getElementById('overlay').naturalWidth")
    assert overlay_width > 3 * 224  # photo | heat map | overlay
    assert not browser.find_element(By.ID, "error").is_displayed()


def test_dropping_a_photo_works_too(browser, url, photo):
    open_page(browser, url)
    browser.execute_script(
        """
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "dropped.jpg", {type: "image/jpeg"}));
        const drop = document.getElementById("drop");
        drop.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true}));
        """,
        base64.b64encode(photo).decode("ascii"),
    )
    _wait_for_results(browser)
    assert "dropped.jpg" in browser.find_element(By.ID, "status").text


def test_a_file_that_is_not_an_image_shows_the_reason(browser, url, tmp_path):
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("this is not a photo")
    open_page(browser, url)
    browser.find_element(By.ID, "file").send_keys(str(not_an_image))
    error = browser.find_element(By.ID, "error")
    WebDriverWait(browser, 30).until(lambda _: error.is_displayed())
    assert "422" in error.text and "not an image" in error.text
    screenshot(browser, "web_page_error")
