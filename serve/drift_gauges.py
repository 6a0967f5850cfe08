"""Live drift gauges: the monitoring job's headline numbers, recomputed by the ingress from its own
prediction log every few minutes, for Prometheus and `GET /drift`.

The numbers are `vitbirds.monitoring.assess.headline_gauges` of the same assessment that
`jobs/monitor.py --prediction-log LOG --window W` makes, so a dashboard and the job's monitor.json
agree on the same window. The work runs in a daemon thread (numpy and scipy release the GIL for
most of it), so requests never wait for it; the job stays the place for reports and retraining.
Each assessment reads only the newest log files that cover its window (`read_recent`), and at
most `max_read_bytes` of them (the newest), so a refresh costs a bounded time and memory however
large the log or its files grow. An assessment on request (`GET /drift?refresh=true`, open to
anyone) is refused while the last one is younger than `min_refresh_interval_s`.
"""

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vitbirds.errors import DataError, ModelFileError
from vitbirds.monitoring.assess import MonitorConfig, Observations, headline_gauges, parse_window
from vitbirds.monitoring.predictions import read_recent
from vitbirds.monitoring.reference import ReferenceProfile, load_reference_profile
from vitbirds.monitoring.run import log_verdict

logger = logging.getLogger("ray.serve")

Publish = Callable[[dict[str, float]], None]
# The newest bytes of the log one assessment reads at most: ~14,000 records of ~1.2 KB, which
# parse into ~45 MiB of Python objects; the window's older records are then left out, and said so.
DEFAULT_MAX_READ_BYTES = 16 * 1024 * 1024


class DriftWatcher:
    """Assesses the latest `window` of the prediction log against the model's reference profile
    every `interval_s` seconds and hands the headline gauges to `publish`.

    `latest` is what `GET /drift` shows: status "pending" until the log holds a prediction of
    this model version, "disabled" (with the reason) when the model has no reference profile,
    "error" (with the reason) when the log cannot be compared with it, else "ok" with the
    decision, its reasons and the gauges.
    """

    def __init__(
        self,
        model_dir: str | Path,
        log_path: str | Path,
        *,
        model_version: str,
        class_names: list[str],
        window: str,
        interval_s: float,
        publish: Publish,
        config: MonitorConfig | None = None,
        min_refresh_interval_s: float = 30.0,
        max_read_bytes: int = DEFAULT_MAX_READ_BYTES,
    ) -> None:
        self.log_path = Path(log_path)
        self.max_read_bytes = max_read_bytes
        self.model_version = model_version
        self.class_names = class_names
        self.window = parse_window(window)
        self.interval_s = interval_s
        self.publish = publish
        self.min_refresh_interval_s = min_refresh_interval_s
        self._last_started: float | None = None  # time.monotonic() of the last assessment
        self.config = config or MonitorConfig()
        self.profile: ReferenceProfile | None = None
        self.latest: dict[str, Any] = {"status": "pending", "reasons": ["no assessment yet"]}
        self._stop = threading.Event()
        self._busy = threading.Lock()  # one assessment at a time, however many ask
        self._thread: threading.Thread | None = None
        try:
            self.profile = load_reference_profile(model_dir)
        except ModelFileError as error:
            self.latest = {"status": "disabled", "reasons": [str(error)]}
            logger.warning("drift gauges disabled: %s", error)

    def refresh_wait_s(self) -> float:
        """Seconds before an assessment on request is allowed again (0: now)."""
        if self._last_started is None:
            return 0.0
        elapsed = time.monotonic() - self._last_started
        return max(0.0, self.min_refresh_interval_s - elapsed)

    def assess_once(self) -> dict[str, Any]:
        """One assessment of the latest window; updates `latest` and the gauges, returns it.

        While another assessment runs this returns the previous result instead of queueing a
        second one, so repeated `GET /drift?refresh=true` cannot pile up work.
        """
        if self.profile is None or not self._busy.acquire(blocking=False):
            return self.latest
        try:
            self._last_started = time.monotonic()
            return self._assess()
        except DataError as error:  # e.g. log embeddings that do not fit the reference's
            self.latest = {"status": "error", "reasons": [str(error)]}
            return self.latest
        finally:
            self._busy.release()

    def _assess(self) -> dict[str, Any]:
        contents = read_recent(
            self.log_path,
            self.window,
            min_predictions=self.config.min_samples,
            model_version=self.model_version,
            max_bytes=self.max_read_bytes,
        )
        try:
            observed = Observations.from_log(
                contents, self.class_names, model_version=self.model_version
            )
        except DataError as error:  # nothing of this model version logged yet
            self.latest = {"status": "pending", "reasons": [str(error)]}
            return self.latest
        verdict, _ = log_verdict(self.profile, observed, self.config, self.window)
        assessment = verdict.to_dict()
        gauges = headline_gauges(assessment)
        self.publish(gauges)
        reasons = list(assessment["reasons"])
        if contents.truncated:
            reasons.append(
                f"read the log's newest {self.max_read_bytes / 2**20:g} MiB only: "
                f"{assessment['num_observed']} predictions, fewer than the window holds"
            )
        self.latest = {
            "status": "ok",
            "decision": assessment["decision"],
            "reasons": reasons,
            "num_observed": assessment["num_observed"],
            "window_s": self.window.total_seconds(),
            "assessed_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "gauges": gauges,
        }
        return self.latest

    def start(self) -> None:
        """Starts the periodic assessments (none when disabled or `interval_s` is 0)."""
        if self.profile is None or self.interval_s <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="drift-gauges", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.assess_once()
            except Exception:  # a bad log line or a bug here must never take the ingress down
                logger.exception("drift assessment failed; retrying in %.0f s", self.interval_s)
