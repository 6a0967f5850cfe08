"""What every job does as it starts: one log format, and a line saying where relative outputs
go when that is not the current directory (a Ray job with a working directory)."""

import argparse
import logging

from vitbirds.paths import output_note

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def start_job(level: int = logging.WARNING) -> None:
    """Everyone's log lines from `level` up, in LOG_FORMAT; then where the outputs go."""
    logging.basicConfig(level=level, format=LOG_FORMAT)
    note = output_note()
    if note:
        print(note, flush=True)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (no usage dump), still with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    """An argparse type: a whole number above 0, or an error naming the value."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value
