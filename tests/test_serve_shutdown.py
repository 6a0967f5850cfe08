"""A graceful shutdown under load loses no prediction it answered: every 200's request id is in
the prediction log once the app is gone, and the Ingress's destructor (which writes the queued
records) neither fails nor holds up the shutdown. At this load the writer keeps up, so what the
flush itself guarantees is pinned where a write can be stalled: tests/test_serve_predictions.py."""

import threading
import time
from pathlib import Path

import httpx
from ray import serve

from serve.schemas import ServeSettings
from serve.testing import deployment_options, photo_classes, start_app
from vitbirds.inference.stand_in import make_model_dir
from vitbirds.monitoring.predictions import read_log

APP = "vitbirds-shutdown"


def test_every_answered_prediction_is_in_the_log_after_a_shutdown_under_load(
    ray_session, tmp_path: Path, shared_data: Path
) -> None:
    valid = shared_data / "cub100" / "valid"
    photos = [p.read_bytes() for p in sorted(valid.glob("*/*.jpg"))[:8]]
    model_dir = make_model_dir(tmp_path / "model", photo_classes(valid))
    log = tmp_path / "predictions.jsonl"
    settings = ServeSettings(model_dir=str(model_dir), prediction_log=str(log), drift_interval_s=0)
    url = start_app(settings, deployment_options(0.1), name=APP)
    answered: list[str] = []
    stop = threading.Event()

    def client(offset: int) -> None:
        with httpx.Client(timeout=30) as session:
            index = offset
            while not stop.is_set():
                try:
                    response = session.post(
                        url + "/predict",
                        content=photos[index % len(photos)],
                        headers={"content-type": "image/jpeg"},
                    )
                except httpx.HTTPError:
                    continue  # the app is going away
                if response.status_code == 200:
                    answered.append(response.json()["request_id"])
                index += 1

    clients = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for thread in clients:
        thread.start()
    try:
        deadline = time.monotonic() + 120
        while len(answered) < 40:  # under load
            assert time.monotonic() < deadline, f"only {len(answered)} answers in 120 s"
            stop.wait(0.05)
        serve.delete(APP)
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=60)
        serve.shutdown()  # the next module starts Serve on a port of its own
    logged = {record.request_id for record in read_log(log).predictions}
    assert len(answered) >= 40
    assert set(answered) <= logged
