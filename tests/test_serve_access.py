"""API keys and rate limits through the running Serve app, as the RayService runs it (keys in
$VITBIRDS_API_KEYS, from a Secret there), and the web page asking for a key (the checks
themselves, without Ray: tests/test_access.py)."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from browser import chromium, open_page, requires_browser, wait_for_bars
from ray import serve
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait

from serve.access import API_KEYS_ENV
from serve.schemas import ServeSettings
from serve.testing import deployment_options, start_app

API_KEY, PAGE_KEY = "test-api-key-" + "a" * 16, "test-page-key-" + "b" * 16
BURST = 3


@pytest.fixture(scope="module")
def url(ray_session, tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[str]:
    work = tmp_path_factory.mktemp("access")
    settings = ServeSettings(
        model_dir=str(model_dir),
        prediction_log=str(work / "log.jsonl"),
        api_rate_per_s=0.001,  # one request back every 1,000 s: none during the test
        api_burst=BURST,
    )
    keys = {"runtime_env": {"env_vars": {API_KEYS_ENV: f"{API_KEY},{PAGE_KEY}"}}}
    options = deployment_options(0.1, Ingress={"ray_actor_options": {"num_cpus": 0.1, **keys}})
    yield start_app(settings, options)
    serve.shutdown()


def test_predict_needs_a_key_then_keeps_to_its_rate(url, photo) -> None:
    assert requests.get(url + "/model", timeout=30).json()["api_key_required"] is True
    assert requests.get(url + "/healthz", timeout=30).status_code == 200  # no key needed

    refused = requests.post(url + "/predict", files={"file": photo}, timeout=60)
    assert refused.status_code == 401 and refused.json()["reason"] == "unauthorized"
    explain = requests.post(url + "/explain", files={"file": photo}, timeout=60)
    assert explain.status_code == 401

    forms = [{"X-API-Key": API_KEY}, {"Authorization": f"Bearer {API_KEY}"}]
    for number in range(BURST):
        answer = requests.post(
            url + "/predict", files={"file": photo}, headers=forms[number % 2], timeout=60
        )
        assert answer.status_code == 200 and len(answer.json()["predictions"]) == 5
    limited = requests.post(url + "/predict", files={"file": photo}, headers=forms[0], timeout=60)
    assert limited.status_code == 429 and limited.json()["reason"] == "rate_limited"
    assert int(limited.headers["retry-after"]) >= 1


@requires_browser
def test_the_web_page_asks_for_the_key_and_sends_it(url, photo_file) -> None:
    with chromium() as browser:
        open_page(browser, url)
        key_input = browser.find_element(By.ID, "api-key")
        assert key_input.is_displayed()
        browser.find_element(By.ID, "file").send_keys(str(photo_file))
        error = browser.find_element(By.ID, "error")
        WebDriverWait(browser, 60).until(lambda _: error.is_displayed() and "401" in error.text)

        key_input.send_keys(PAGE_KEY)
        browser.execute_script("document.getElementById('file').value = '';")  # same file again
        browser.find_element(By.ID, "file").send_keys(str(photo_file))
        wait_for_bars(browser)
        assert not browser.find_element(By.ID, "error").is_displayed()
