"""What every job does as it starts: one log format, and a line saying where relative outputs
go when that is not the current directory (a Ray job with a working directory)."""

import logging

from vitbirds.paths import output_note

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def start_job(level: int = logging.WARNING) -> None:
    """Everyone's log lines from `level` up, in LOG_FORMAT; then where the outputs go."""
    logging.basicConfig(level=level, format=LOG_FORMAT)
    note = output_note()
    if note:
        print(note, flush=True)
