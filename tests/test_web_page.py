"""The web page at GET /, driven by a real headless Chromium (Debian's chromium + chromium-driver).

Each test keeps a screenshot under runs/screenshots/ for a person to look at.
"""

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from ray import serve
from skip_reasons import MISSING_BROWSER

from serve.schemas import ServeSettings
from serve.testing import deployment_options, make_model_dir, photo_classes, start_app
from vitbirds.paths import repo_root

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOTS = repo_root() / "runs" / "screenshots"

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason=f"{MISSING_BROWSER} needs /usr/bin/chromium and /usr/bin/chromedriver "
    "(apt-get install chromium chromium-driver)",
)
webdriver = pytest.importorskip("selenium.webdriver")
By = pytest.importorskip("selenium.webdriver.common.by").By
WebDriverWait = pytest.importorskip("selenium.webdriver.support.wait").WebDriverWait

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=900,1100",
)


@pytest.fixture(scope="module")
def photo(shared_data: Path) -> Path:
    valid = shared_data / "cub100" / "valid"
    return sorted((valid / photo_classes(valid)[0]).glob("*.jpg"))[0]


@pytest.fixture(scope="module")
def url(ray_session, tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Iterator[str]:
    work = tmp_path_factory.mktemp("web")
    model_dir = make_model_dir(work / "model", photo_classes(shared_data / "cub100" / "valid"))
    settings = ServeSettings(model_dir=str(model_dir), prediction_log=str(work / "log.jsonl"))
    yield start_app(settings, deployment_options(0.1))
    serve.shutdown()


@pytest.fixture(scope="module")
def browser() -> Iterator:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=str(CHROMEDRIVER))
    driver = webdriver.Chrome(options=options, service=service)
    yield driver
    driver.quit()


def _screenshot(browser, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    browser.save_screenshot(str(path))
    return path


def _wait_for_results(browser) -> None:
    def ready(driver) -> bool:
        bars = driver.find_elements(By.CSS_SELECTOR, "#bars .bar")
        loaded = driver.execute_script(
            "const img = document.getElementById('overlay');"
            "return img.complete && img.naturalWidth > 0;"
        )
        return len(bars) == 5 and loaded

    WebDriverWait(browser, 60).until(ready)


def _open(browser, url: str) -> None:
    browser.get(url + "/")
    WebDriverWait(browser, 30).until(
        lambda d: d.find_element(By.ID, "model").text not in ("", "loading model…")
    )


def test_choosing_a_photo_shows_five_bars_and_the_attention_overlay(browser, url, photo):
    _open(browser, url)
    assert "classes" in browser.find_element(By.ID, "model").text
    browser.find_element(By.ID, "file").send_keys(str(photo))
    _wait_for_results(browser)
    _screenshot(browser, "web_page_upload")

    expected = requests.post(url + "/predict", files={"file": photo.read_bytes()}).json()
    labels = [e.get_attribute("title") for e in browser.find_elements(By.CSS_SELECTOR, ".label")]
    assert labels == [p["label"] for p in expected["predictions"]]
    widths = [e.size["width"] for e in browser.find_elements(By.CSS_SELECTOR, "#bars .fill")]
    assert all(width > 0 for width in widths)
    assert widths == sorted(widths, reverse=True)
    overlay_width = browser.execute_script("return document.getElementById('overlay').naturalWidth")
    assert overlay_width > 3 * 224  # photo | heat map | overlay
    assert not browser.find_element(By.ID, "error").is_displayed()


def test_dropping_a_photo_works_too(browser, url, photo):
    _open(browser, url)
    browser.execute_script(
        """
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "dropped.jpg", {type: "image/jpeg"}));
        const drop = document.getElementById("drop");
        drop.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true}));
        """,
        base64.b64encode(photo.read_bytes()).decode("ascii"),
    )
    _wait_for_results(browser)
    assert "dropped.jpg" in browser.find_element(By.ID, "status").text


def test_a_file_that_is_not_an_image_shows_the_reason(browser, url, tmp_path):
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("this is not a photo")
    _open(browser, url)
    browser.find_element(By.ID, "file").send_keys(str(not_an_image))
    error = browser.find_element(By.ID, "error")
    WebDriverWait(browser, 30).until(lambda _: error.is_displayed())
    assert "422" in error.text and "not an image" in error.text
    _screenshot(browser, "web_page_error")
