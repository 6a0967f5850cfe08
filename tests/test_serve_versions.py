"""One model version per deployment, on the running app: a model re-exported while it serves
reaches no replica, not even one started afterwards, until the app is deployed again."""

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import requests
from ray import serve
from served_answers import (
    SERVED_PRECISION,
    TOLERANCE,
    assert_matches_offline,
    offline_probabilities,
)

from serve.schemas import ServeSettings
from serve.testing import deployment_options, start_app
from vitbirds.inference.stand_in import make_model_dir
from vitbirds.lifecycle.store import content_digest
from vitbirds.model.files import load_model
from vitbirds.paths import CACHE_ENV

APP = "vitbirds-versions"
CLASSIFIER_PREFIX = f"SERVE_REPLICA::{APP}#Classifier#"


@pytest.fixture(scope="module")
def deployed(
    ray_session, tmp_path_factory: pytest.TempPathFactory, cub_classes: list[str]
) -> Iterator[tuple[str, Path]]:
    """(url, model dir) of an app deployed from a `latest` directory."""
    work = tmp_path_factory.mktemp("serve_versions")
    latest = make_model_dir(work / "models" / "latest", cub_classes, seed=0)
    settings = ServeSettings(
        model_dir=str(latest), prediction_log=str(work / "predictions.jsonl"), drift_interval_s=0
    )
    with pytest.MonkeyPatch.context() as patch:
        # The builder snapshots here; replicas are processes of the session's Ray, whose
        # environment was fixed when it started, so they find the snapshot by its path.
        patch.setenv(CACHE_ENV, str(work / "cache"))
        url = start_app(settings, deployment_options(0.1), name=APP)
    yield url, latest
    serve.delete(APP)
    serve.shutdown()  # the next module starts Serve on a port of its own


def _classifier_replicas() -> set[str]:
    named = ray.util.list_named_actors(all_namespaces=True)
    return {a["name"] for a in named if a["name"].startswith(CLASSIFIER_PREFIX)}


def _kill(replica: str) -> None:
    ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=True)


def _wait_for_a_new_replica(old: set[str], url: str, timeout_s: float = 240) -> set[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        current = _classifier_replicas()
        if current and not current & old:
            try:
                if requests.get(url + "/healthz", timeout=10).status_code == 200:
                    return current
            except requests.RequestException:
                pass
        time.sleep(1)
    pytest.fail(f"no new Classifier replica answered within {timeout_s} s")


def test_a_replica_restarted_after_a_reexport_serves_the_deployed_version(
    deployed, cub_classes, photo
):
    url, latest = deployed
    deployed_digest = requests.get(url + "/model").json()["model_sha256"]
    assert deployed_digest == content_digest(latest)
    offline = load_model(latest)  # the deployed weights, before they are overwritten

    # Re-export: other weights and the class list reversed, same number of classes.
    make_model_dir(latest, list(reversed(cub_classes)), seed=1)
    assert content_digest(latest) != deployed_digest
    old = _classifier_replicas()
    assert old
    for replica in old:
        _kill(replica)
    _wait_for_a_new_replica(old, url)

    health = requests.get(url + "/healthz").json()
    assert health["classifier"]["model_sha256"] == deployed_digest
    assert health["classifier"]["precision"] == SERVED_PRECISION.name
    model = requests.get(url + "/model").json()
    assert model["model_sha256"] == deployed_digest and model["classes"] == cub_classes
    response = requests.post(url + "/predict", data=photo, headers={"content-type": "image/jpeg"})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    expected = offline_probabilities(offline, photo, SERVED_PRECISION)
    assert_matches_offline(predictions, expected, atol=TOLERANCE[SERVED_PRECISION.name])
    assert all(p["label"] == cub_classes[p["index"]] for p in predictions)
