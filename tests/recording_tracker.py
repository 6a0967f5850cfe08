"""A tracker that remembers what it was given: for tests of what the library logs."""

from pathlib import Path


class RecordingTracker:
    def __init__(self) -> None:
        self.metrics: dict = {}
        self.artifacts: list = []
        self.tags: dict = {}

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_artifact(self, path, folder=None):
        self.artifacts.append((Path(path).name, folder))

    def set_tags(self, tags):
        self.tags.update(tags)
