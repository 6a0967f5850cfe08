"""A model without attention maps (the ResNet-18 baseline, the distillation teacher) is served:
/predict answers as for a ViT, /explain says why there is no overlay, and the web page shows the
predictions without one."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch
from browser import chromium, open_page, requires_browser, screenshot, wait_for_bars
from ray import serve
from selenium.webdriver.common.by import By
from served_answers import SERVED_PRECISION

from serve.schemas import ServeSettings
from serve.testing import deployment_options, start_app
from vitbirds.inference.scoring import ImagePreprocessor, model_normaliser
from vitbirds.inference.stand_in import make_model_dir
from vitbirds.model.files import LoadedModel, load_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, cub_classes: list[str]) -> Path:
    return make_model_dir(
        tmp_path_factory.mktemp("resnet") / "model", cub_classes, architecture="resnet18"
    )


@pytest.fixture(scope="module")
def url(ray_session, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("resnet_log") / "predictions.jsonl"
    settings = ServeSettings(model_dir=str(model_dir), prediction_log=str(log))
    yield start_app(settings, deployment_options(0.1))
    serve.shutdown()


def _offline_top5(loaded: LoadedModel, data: bytes) -> list[str]:
    """The top-5 labels the Classifier computes, at the precision it runs at."""
    crop = ImagePreprocessor(loaded.metadata).model_input(data)
    image = model_normaliser(loaded.metadata)(crop)
    with torch.inference_mode(), SERVED_PRECISION.autocast():
        probabilities = loaded.model(image[None]).float().softmax(dim=-1)[0]
    return [loaded.metadata.class_names[i] for i in probabilities.topk(5).indices]


def test_model_info_says_there_are_no_attention_maps(url):
    info = requests.get(url + "/model", timeout=30).json()
    assert info["architecture"] == "resnet18" and info["attention_maps"] is False


def test_predict_answers_with_the_resnets_top5(url, model_dir, photo):
    response = requests.post(url + "/predict", files={"file": photo}, timeout=60)
    assert response.status_code == 200
    labels = [p["label"] for p in response.json()["predictions"]]
    assert labels == _offline_top5(load_model(model_dir), photo)


def test_a_model_without_a_card_says_so_with_a_json_reason(url):
    response = requests.get(url + "/model/card", timeout=30)
    assert response.status_code == 404 and response.json()["reason"] == "no_model_card"
    assert requests.get(url + "/model", timeout=30).json()["model_card"] is False


def test_explain_is_refused_with_a_json_reason(url, photo):
    response = requests.post(url + "/explain", files={"file": photo}, timeout=60)
    assert response.status_code == 409
    body = response.json()
    assert body["reason"] == "no_attention_maps"
    assert "resnet18" in body["error"] and "/predict" in body["error"]


@requires_browser
def test_the_web_page_shows_predictions_and_says_why_there_is_no_overlay(url, photo_file):
    with chromium() as browser:
        open_page(browser, url)
        browser.find_element(By.ID, "file").send_keys(str(photo_file))
        wait_for_bars(browser)
        screenshot(browser, "web_page_resnet")
        assert not browser.find_element(By.ID, "error").is_displayed()
        assert not browser.find_element(By.ID, "overlay").is_displayed()
        note = browser.find_element(By.ID, "no-overlay")
        assert note.is_displayed() and "resnet18" in note.text and "no attention maps" in note.text
