"""Where a request's time went, as an HTTP `Server-Timing` header (W3C Server Timing).

Browsers' developer tools draw it beside the request, and `jobs/bench_serve.py` reads it to split
a lone client's latency into its stages instead of guessing. Durations are milliseconds; a stage
may contain later ones (`classifier` is the Ingress's call, `classifier-replica` the part of it
inside the Classifier replica, `classifier-batch` the forward pass of the batch it joined).
"""

import time


class ServerTiming:
    """Stage durations in the order they were marked."""

    def __init__(self) -> None:
        self.durations: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, stage: str) -> None:
        """`stage` took the time since the previous mark (or since this object was made)."""
        now = time.perf_counter()
        self.durations[stage] = 1000 * (now - self._last)
        self._last = now

    def add(self, stage: str, milliseconds: float) -> None:
        """A duration measured elsewhere (in another replica)."""
        self.durations[stage] = milliseconds

    def header(self) -> str:
        return ", ".join(f"{stage};dur={ms:.1f}" for stage, ms in self.durations.items())


def parse_server_timing(header: str) -> dict[str, float]:
    """{stage: milliseconds} from a `Server-Timing` header; entries without `dur` are left out."""
    durations = {}
    for entry in header.split(","):
        name, *params = (part.strip() for part in entry.split(";"))
        for param in params:
            key, _, value = param.partition("=")
            if name and key.strip() == "dur":
                try:
                    durations[name] = float(value.strip().strip('"'))
                except ValueError:
                    continue
    return durations
