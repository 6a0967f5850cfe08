"""The Serve application over real HTTP on 127.0.0.1, with real photos from ../shared/data.

One app for the module (starting Serve costs ~30 s on two cores), with small queue limits so an
overload is cheap to provoke; the overload test runs last.
"""

import asyncio
import base64
import http.client
import io
import json
import struct
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import ray
import requests
from PIL import Image
from ray import serve
from served_answers import (
    ATOL,
    assert_matches_offline,
    offline_probabilities,
)

from jobs.benchlib.mutate import encode, png_header_only
from serve.schemas import FEEDBACK_MAX_BYTES, ServeSettings
from serve.server_timing import parse_server_timing
from serve.testing import deployment_options, photo_classes, start_app
from vitbirds.data import discover_dataset
from vitbirds.data.sources import samples_for_model
from vitbirds.model.files import MODEL_CARD_FILE, LoadedModel, load_model
from vitbirds.monitoring.predictions import EMBEDDING_DIM, LOGGED_TOP_K, read_log
from vitbirds.monitoring.reference import build_reference_profile, save_reference_profile

BODY_LIMIT = 2_000_000
CARD = "# Model card: a random-weight test model\n\nFor tests only: ✓ not for birds.\n"
INGRESS_QUEUE = 16
CLASSIFIER_QUEUE = 16


@pytest.fixture(scope="module")
def photos(shared_data: Path) -> list[Path]:
    """One photo from each of six classes."""
    valid = shared_data / "cub100" / "valid"
    return [sorted((valid / name).glob("*.jpg"))[0] for name in photo_classes(valid)[:60:10]]


@pytest.fixture(scope="module")
def model_dir(model_dir: Path, shared_data: Path, cub_classes: list[str]) -> Path:
    """The module's model, with the reference profile and the model card training saves beside
    it."""
    (model_dir / MODEL_CARD_FILE).write_text(CARD, encoding="utf-8")
    splits = discover_dataset(shared_data / "cub100")
    samples = samples_for_model(splits.valid, splits.classes, cub_classes)
    save_reference_profile(model_dir, build_reference_profile(load_model(model_dir), samples))
    return model_dir


@pytest.fixture(scope="module")
def offline(model_dir: Path) -> LoadedModel:
    return load_model(model_dir)


@pytest.fixture(scope="module")
def log_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serve_log") / "predictions.jsonl"


@pytest.fixture(scope="module")
def url(ray_session, model_dir: Path, log_file: Path) -> Iterator[str]:
    settings = ServeSettings(
        model_dir=str(model_dir), prediction_log=str(log_file), max_body_bytes=BODY_LIMIT,
        drift_interval_s=0,  # assessed on request only (GET /drift?refresh=true)
        precision="fp32",  # the exact path: served answers are the model's to 1e-5
    )  # fmt: skip
    options = deployment_options(
        0.1,
        Ingress={"max_ongoing_requests": 32, "max_queued_requests": INGRESS_QUEUE},
        Classifier={
            "max_ongoing_requests": 8,
            "max_queued_requests": CLASSIFIER_QUEUE,
            "user_config": {"max_batch_size": 8},
        },
    )
    yield start_app(settings, options)
    serve.shutdown()


def post_image(url: str, data: bytes, path: str = "/predict", **params) -> requests.Response:
    return requests.post(
        url + path, files={"file": ("photo", data, "application/octet-stream")}, params=params
    )


def rle8_bmp() -> bytes:
    """A BMP whose header says RLE8: a format Pillow decodes in pure Python."""
    data = bytearray(encode(Image.new("P", (8, 8)), "BMP"))
    data[30:34] = struct.pack("<I", 1)
    return bytes(data)


# --- predictions -------------------------------------------------------------------------------


def test_predictions_equal_the_models_output_for_the_same_file(url, photos, offline):
    for path in photos:
        data = path.read_bytes()
        response = post_image(url, data)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model_name"] == offline.metadata.name
        assert body["model_version"] == offline.metadata.version
        assert len(body["request_id"]) == 32
        assert_matches_offline(body["predictions"], offline_probabilities(offline, data))


def test_raw_image_body_and_top_k(url, photo, offline):
    response = requests.post(
        url + "/predict", data=photo, params={"top_k": 3}, headers={"Content-Type": "image/jpeg"}
    )
    assert response.status_code == 200, response.text
    assert_matches_offline(response.json()["predictions"], offline_probabilities(offline, photo), 3)


def test_a_prediction_says_where_its_time_went(url, photo):
    """Server-Timing: the Ingress's stages, and within the Classifier call its replica's part and
    within that the batch's forward pass."""
    response = post_image(url, photo)
    assert response.status_code == 200, response.text
    timing = parse_server_timing(response.headers["Server-Timing"])
    stages = ["read", "decode", "classifier", "classifier-replica", "classifier-batch", "record"]
    assert list(timing) == stages
    assert all(ms >= 0 for ms in timing.values())
    assert timing["classifier"] >= timing["classifier-replica"] >= timing["classifier-batch"] > 0


def test_concurrent_requests_are_all_answered_and_counted_in_batches(url, photos, offline):
    """How batches form is tested without timing in test_serve_batching.py; here, that every
    concurrent request is answered with its own photo's prediction and counted in a batch."""
    before = requests.get(url + "/healthz").json()["classifier"]
    datas = [photos[i % len(photos)].read_bytes() for i in range(12)]

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(
                *[
                    client.post(url + "/predict", content=d, headers={"content-type": "image/jpeg"})
                    for d in datas
                ]
            )

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * len(datas)
    for data, response in zip(datas, responses, strict=True):
        assert_matches_offline(response.json()["predictions"], offline_probabilities(offline, data))
    after = requests.get(url + "/healthz").json()["classifier"]
    assert after["requests"] - before["requests"] == len(datas)
    assert 1 <= after["batches"] - before["batches"] <= len(datas)
    images_in_batches = sum(int(size) * count for size, count in after["batch_sizes"].items())
    assert images_in_batches == after["requests"]


# --- inputs that are valid images in awkward forms ---------------------------------------------


def _rgba(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, image.width, dtype=np.uint8), (image.height, 1))
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


AWKWARD = {
    "tiff": lambda im: encode(im, "TIFF"),
    "webp": lambda im: encode(im, "WEBP", quality=90),
    "png_with_alpha": lambda im: encode(_rgba(im), "PNG"),
    "grayscale_jpeg": lambda im: encode(im.convert("L"), "JPEG", quality=90),
    "cmyk_jpeg": lambda im: encode(im.convert("CMYK"), "JPEG", quality=90),
    "palette_gif": lambda im: encode(im.convert("P"), "GIF"),
    "sixteen_bit_png": lambda im: encode(
        Image.fromarray(np.asarray(im.convert("L"), dtype=np.uint16) * 257), "PNG"
    ),
}


@pytest.mark.parametrize("kind", AWKWARD)
def test_awkward_but_valid_images_are_predicted(url, photo, offline, kind):
    data = AWKWARD[kind](Image.open(io.BytesIO(photo)))
    response = post_image(url, data)
    assert response.status_code == 200, response.text
    assert_matches_offline(response.json()["predictions"], offline_probabilities(offline, data))


def test_exif_rotation_is_applied(url, photo):
    upright = Image.open(io.BytesIO(photo)).convert("RGB").crop((0, 0, 227, 170))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    stored_sideways = upright.transpose(Image.Transpose.ROTATE_90)
    rotated = post_image(url, encode(stored_sideways, "PNG", exif=exif), top_k=100).json()
    reference = post_image(url, encode(upright, "PNG"), top_k=100).json()
    ignored = post_image(url, encode(stored_sideways, "PNG"), top_k=100).json()

    def by_index(body: dict) -> np.ndarray:
        values = {p["index"]: p["probability"] for p in body["predictions"]}
        return np.array([values[i] for i in sorted(values)])

    np.testing.assert_allclose(by_index(rotated), by_index(reference), atol=ATOL)
    assert not np.allclose(by_index(ignored), by_index(reference), atol=ATOL)


# --- hostile inputs ----------------------------------------------------------------------------


def _chunks(total: int, size: int = 256 * 1024) -> Iterator[bytes]:
    for start in range(0, total, size):
        yield b"\xff" * min(size, total - start)


def upload(data: bytes, field: str = "file", name: str | None = "a.jpg") -> dict:
    return {"files": {field: (name, data)}}


def raw(data: bytes, content_type: str = "image/jpeg", **extra) -> dict:
    return {"data": data, "headers": {"content-type": content_type}, **extra}


FITS = b"SIMPLE  =                    T" + b" " * 2850

# name -> (requests.post keyword arguments given a real photo, status, reason)
HOSTILE = {
    "not_an_image": (lambda p: upload(b"just some text"), 422, "not_an_image"),
    "truncated_jpeg": (lambda p: upload(p[: len(p) // 2]), 422, "undecodable_image"),
    "zero_byte_upload": (lambda p: upload(b""), 400, "empty"),
    "zero_byte_body": (lambda p: raw(b""), 400, "empty"),
    "decompression_bomb": (lambda p: upload(png_header_only(40000, 40000)), 413, "too_many_pixels"),
    "oversized_body": (lambda p: raw(b"\xff" * (BODY_LIMIT + 1)), 413, "too_large"),
    "oversized_chunked_body": (lambda p: raw(_chunks(BODY_LIMIT * 2)), 413, "too_large"),
    "oversized_upload": (lambda p: upload(p + b"\x00" * BODY_LIMIT), 413, "too_large"),
    "wrong_content_type": (lambda p: raw(p, "text/plain"), 415, "unsupported_content_type"),
    "missing_content_type": (lambda p: raw(p, ""), 415, "unsupported_content_type"),
    "missing_file_field": (lambda p: upload(p, field="image"), 400, "missing_file"),
    "file_sent_as_text_field": (lambda p: upload(p, name=None), 400, "missing_file"),
    "multipart_without_boundary": (lambda p: raw(p, "multipart/form-data"), 400, "bad_multipart"),
    "bad_top_k": (lambda p: raw(p, params={"top_k": 0}), 422, "invalid_request"),
    "rle_bmp": (lambda p: upload(rle8_bmp()), 415, "unsupported_format"),
    "fits": (lambda p: upload(FITS), 415, "unsupported_format"),
    "tall_and_thin": (lambda p: upload(png_header_only(1, 5_000_000)), 422, "extreme_aspect_ratio"),
    "wide_and_flat": (lambda p: upload(png_header_only(6_000_000, 1)), 422, "extreme_aspect_ratio"),
}  # fmt: skip


@pytest.mark.parametrize("path", ["/predict", "/explain"])
@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_input_gets_a_4xx_and_the_next_request_works(url, photo, offline, case, path):
    arguments, status, reason = HOSTILE[case]
    response = requests.post(url + path, **arguments(photo))
    assert response.status_code == status, response.text
    assert response.json()["reason"] == reason
    assert response.json()["error"]
    good = post_image(url, photo)
    assert good.status_code == 200
    assert_matches_offline(good.json()["predictions"], offline_probabilities(offline, photo))


def test_oversized_body_is_refused_before_it_is_sent(url):
    """Content-Length alone earns the 413: the client never has to upload the 50 MB."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.putrequest("POST", "/predict")
    connection.putheader("Content-Type", "image/jpeg")
    connection.putheader("Content-Length", str(50_000_000))
    connection.endheaders()  # and not one byte of the body
    response = connection.getresponse()
    assert response.status == 413
    assert json.loads(response.read())["reason"] == "too_large"
    connection.close()


def test_an_oversized_body_sent_whole_reads_its_413_through_serve(url):
    """urllib sends all 11 MB before it reads the answer: the edge reads the body out first, so
    the 413 arrives instead of a connection reset (more cases: tests/test_http_edge.py)."""
    request = urllib.request.Request(
        url + "/predict", data=bytes(11_000_000), headers={"Content-Type": "image/jpeg"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 413
    assert json.loads(refused.value.read())["reason"] == "too_large"


def test_replicas_survive_hostile_inputs(url):
    status = serve.status().applications["vitbirds"]
    for name in ("Ingress", "Classifier", "AttentionExplainer"):
        assert status.deployments[name].replica_states == {"RUNNING": 1}, name
    health = requests.get(url + "/healthz").json()
    # Counters since the replica started: a restarted Classifier would have forgotten the
    # earlier tests' requests.
    assert health["classifier"]["requests"] > 2 * len(HOSTILE)


# --- explain, model, health, docs, page --------------------------------------------------------


def test_explain_returns_the_overlay_png(url, photo):
    response = post_image(url, photo, path="/explain")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    overlay = Image.open(io.BytesIO(response.content))
    width, height = overlay.size
    assert width > 3 * 224 and height >= 224  # photo | heat map | overlay (+ caption)
    assert np.asarray(overlay.convert("RGB")).std() > 10


def test_explain_as_json_carries_the_png_and_the_predictions(url, photo, offline):
    response = requests.post(
        url + "/explain",
        files={"file": ("a.jpg", photo, "image/jpeg")},
        headers={"Accept": "application/json"},
    )
    assert response.status_code == 200
    body = response.json()
    assert_matches_offline(body["predictions"], offline_probabilities(offline, photo))
    png = Image.open(io.BytesIO(base64.b64decode(body["overlay_png_base64"])))
    assert png.format == "PNG"


def test_the_model_card_is_served_as_markdown(url):
    response = requests.get(url + "/model/card", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/markdown")
    assert response.text == CARD
    assert requests.get(url + "/model", timeout=30).json()["model_card"] is True


def test_model_info(url, offline):
    info = requests.get(url + "/model").json()
    assert info["classes"] == offline.metadata.class_names
    assert info["image_size"] == offline.metadata.image_size
    assert info["version"] == offline.metadata.version
    assert info["synthetic"] is False


def test_openapi_docs_describe_the_endpoints(url):
    assert requests.get(url + "/docs").status_code == 200
    paths = requests.get(url + "/openapi.json").json()["paths"]
    assert {"/predict", "/explain", "/feedback", "/healthz", "/model", "/model/card"} <= set(paths)
    assert "multipart/form-data" in paths["/predict"]["post"]["requestBody"]["content"]


def test_index_page_is_served(url):
    response = requests.get(url + "/")
    assert response.status_code == 200
    assert "text/html" in response.headers["content-type"]
    assert 'id="file"' in response.text


# --- prediction log, feedback, metrics ---------------------------------------------------------


def _wait_for(read, timeout_s: float = 10.0):
    """The log is appended from a background thread: poll until `read()` is truthy."""
    deadline = time.monotonic() + timeout_s
    while not (value := read()):
        assert time.monotonic() < deadline, "not in the prediction log"
        time.sleep(0.1)
    return value


def test_every_prediction_is_logged_and_feedback_attaches_a_label(url, photo, log_file, offline):
    body = post_image(url, photo).json()
    request_id = body["request_id"]
    record = _wait_for(
        lambda: {r.request_id: r for r in read_log(log_file).predictions}.get(request_id)
    )
    assert record.model_version == offline.metadata.version
    assert record.endpoint == "predict"
    assert record.label == body["predictions"][0]["label"]
    assert record.confidence == pytest.approx(body["predictions"][0]["probability"])
    assert [p["index"] for p in record.top_k] == [p["index"] for p in body["predictions"]]
    assert len(record.embedding) == EMBEDDING_DIM

    true_label = offline.metadata.class_names[3]
    response = requests.post(
        url + "/feedback", json={"request_id": request_id, "label": true_label}
    )
    assert response.status_code == 202
    assert _wait_for(lambda: read_log(log_file).true_labels.get(request_id)) == true_label


def test_the_log_stores_a_fixed_top_k_whatever_the_client_asked(url, photo, log_file):
    few = post_image(url, photo, top_k=2).json()
    many = post_image(url, photo, top_k=100).json()
    assert len(few["predictions"]) == 2 and len(many["predictions"]) == 100
    for body in (few, many):
        record = _wait_for(
            lambda b=body: {r.request_id: r for r in read_log(log_file).predictions}.get(
                b["request_id"]
            )
        )
        assert len(record.top_k) == LOGGED_TOP_K


def test_feedback_for_an_unknown_request_id_is_refused(url, offline):
    label = offline.metadata.class_names[0]
    response = requests.post(url + "/feedback", json={"request_id": "f" * 32, "label": label})
    assert response.status_code == 404
    assert response.json()["reason"] == "unknown_request_id"


def test_feedback_is_accepted_once_per_request_id(url, photo, offline):
    request_id = post_image(url, photo).json()["request_id"]
    label = offline.metadata.class_names[1]
    first = requests.post(url + "/feedback", json={"request_id": request_id, "label": label})
    assert first.status_code == 202
    second = requests.post(url + "/feedback", json={"request_id": request_id, "label": label})
    assert second.status_code == 409
    assert second.json()["reason"] == "already_labelled"


def test_feedback_body_over_the_limit_is_refused(url):
    body = json.dumps({"request_id": "x", "label": "y" * FEEDBACK_MAX_BYTES})
    response = requests.post(
        url + "/feedback", data=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["reason"] == "too_large"


def test_feedback_with_an_unknown_label_is_refused(url):
    response = requests.post(url + "/feedback", json={"request_id": "x", "label": "Dodo"})
    assert response.status_code == 422
    assert response.json()["reason"] == "unknown_label"
    assert requests.post(url + "/feedback", json={"label": "Dodo"}).status_code == 422


def test_custom_metrics_reach_rays_metrics_endpoint(url, photo):
    requests.post(url + "/predict", data=b"not an image", headers={"content-type": "image/png"})
    post_image(url, photo)
    port = ray._private.worker.global_worker.node.metrics_export_port
    wanted = ("vitbirds_rejected_inputs", "vitbirds_predictions", "vitbirds_prediction_confidence")
    deadline = time.monotonic() + 60
    while True:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        names = {line.split("{")[0] for line in text.splitlines() if not line.startswith("#")}
        found = {w: any(w in name for name in names) for w in wanted}
        if all(found.values()) and 'reason="not_an_image"' in text:
            return
        assert time.monotonic() < deadline, f"metrics missing after 60 s: {found}"
        time.sleep(2)


def test_live_drift_gauges_reach_the_drift_endpoint_and_rays_metrics(url, photo, log_file):
    assert post_image(url, photo).status_code == 200
    deadline = time.monotonic() + 30
    while not read_log(log_file).predictions:  # the log is written in the background
        assert time.monotonic() < deadline, "no prediction logged after 30 s"
        time.sleep(0.5)
    status = requests.get(url + "/drift", params={"refresh": "true"}, timeout=120).json()
    assert status["status"] == "ok" and status["decision"] in ("OK", "WATCH", "RETRAIN")
    assert 1 <= status["num_observed"] <= len(read_log(log_file).predictions)
    assert {"vitbirds_monitor_decision", "vitbirds_monitor_estimated_accuracy"} <= set(
        status["gauges"]
    )
    assert requests.get(url + "/drift").json() == status  # kept until the next assessment
    again = requests.get(url + "/drift", params={"refresh": "true"}, timeout=30)
    assert again.status_code == 429  # anyone may ask: at most once per 30 s
    assert again.json()["reason"] == "refresh_too_soon"
    assert 1 <= int(again.headers["retry-after"]) <= 30
    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline = time.monotonic() + 60
    while (
        "vitbirds_monitor_estimated_accuracy"
        not in requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    ):
        assert time.monotonic() < deadline, "drift gauges missing from the metrics after 60 s"
        time.sleep(2)


# --- overload (last: it fills every queue) -----------------------------------------------------


def test_overload_gets_fast_503s_and_the_service_recovers(url, photo):
    async def flood(n: int) -> list[tuple[httpx.Response, float]]:
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:

            async def one() -> tuple[httpx.Response, float]:
                started = time.perf_counter()
                response = await client.post(
                    url + "/predict", content=photo, headers={"content-type": "image/jpeg"}
                )
                return response, time.perf_counter() - started

            return await asyncio.gather(*[one() for _ in range(n)])

    results = asyncio.run(flood(160))
    statuses = [response.status_code for response, _ in results]
    assert set(statuses) <= {200, 503}
    assert statuses.count(503) > 0 and statuses.count(200) > 0
    rejected = [response for response, _ in results if response.status_code == 503]
    assert all(response.headers.get("retry-after") == "1" for response in rejected)
    # Bounded queues bound the wait: nobody waits for 160 requests' worth of work.
    assert max(seconds for _, seconds in results) < 15

    assert post_image(url, photo).status_code == 200
    assert requests.get(url + "/healthz").status_code == 200
