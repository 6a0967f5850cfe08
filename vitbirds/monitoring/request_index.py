"""Which request ids the prediction log holds, how old each is and whether it has a label: what
`POST /feedback` checks before accepting a label.

Several Ingress replicas append to one log, so the index follows the log file itself: at start it
reads the files that cover `max_age`, then on each miss reads only the bytes appended since the
last look (following the file through a rotation). A flood of made-up ids thus costs a `stat` and
an empty read each, never a scan of the log. Entries older than `max_age` are forgotten, and at
most `max_entries` are kept (the oldest go first), so memory stays bounded however busy the log.
"""

import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

from vitbirds.monitoring.predictions import parse_time, rotated_files


@dataclass
class RequestEntry:
    time: datetime
    labelled: bool = False


class RequestIndex:
    """request_id -> RequestEntry for the log's recent predictions; thread-safe."""

    def __init__(
        self, path: str | Path, max_age: timedelta, *, max_entries: int = 1_000_000
    ) -> None:
        self.path = Path(path)
        self.max_age = max_age
        self.max_entries = max_entries
        self._entries: OrderedDict[str, RequestEntry] = OrderedDict()
        self._lock = threading.Lock()
        self._handle: IO[bytes] | None = None
        self._pending = b""  # a last line not yet complete
        self._open_current()  # before reading the rotated files: nothing falls in between
        horizon = datetime.now(UTC) - max_age
        for closed, rotated in rotated_files(self.path):
            if closed >= horizon:
                self._ingest_file(rotated)
        self._catch_up()

    def lookup(self, request_id: str) -> RequestEntry | None:
        """The entry, reading what the log gained since the last look if it is not known yet."""
        with self._lock:
            if request_id not in self._entries:
                self._catch_up()
            self._forget_old()
            return self._entries.get(request_id)

    def add(self, request_id: str, time: datetime) -> None:
        """A prediction this process just made (its log line may not be written yet)."""
        with self._lock:
            self._entries.setdefault(request_id, RequestEntry(time))
            self._forget_old()

    def mark_labelled(self, request_id: str) -> bool:
        """Records the label; False if the id already had one (or is unknown)."""
        with self._lock:
            entry = self._entries.get(request_id)
            if entry is None or entry.labelled:
                return False
            entry.labelled = True
            return True

    def __len__(self) -> int:
        return len(self._entries)

    def _open_current(self) -> None:
        try:
            self._handle = self.path.open("rb")
        except FileNotFoundError:
            self._handle = None
        self._pending = b""

    def _catch_up(self) -> None:
        """Reads what was appended; after rotations, the old file's rest, the files rotated
        since, then the new file."""
        if self._handle is not None:
            self._ingest(self._handle.read())
        try:
            current = os.stat(self.path).st_ino
        except FileNotFoundError:
            return
        if self._handle is not None and os.fstat(self._handle.fileno()).st_ino == current:
            return
        followed = os.fstat(self._handle.fileno()).st_ino if self._handle is not None else None
        if self._handle is not None:
            self._handle.close()
        self._ingest_rotated_after(followed)
        self._open_current()
        if self._handle is not None:
            self._ingest(self._handle.read())

    def _ingest_rotated_after(self, followed: int | None) -> None:
        """The rotated files newer than the one we followed (all recent ones if it is gone)."""
        horizon = datetime.now(UTC) - self.max_age
        rotated = [(closed, p) for closed, p in rotated_files(self.path) if closed >= horizon]
        inodes = []
        for _, path in rotated:
            try:
                inodes.append(path.stat().st_ino)
            except FileNotFoundError:
                inodes.append(None)
        start = inodes.index(followed) + 1 if followed in inodes else 0
        for _, path in rotated[start:]:
            self._ingest_file(path)

    def _ingest_file(self, path: Path) -> None:
        """A whole closed file (rotated: complete lines only)."""
        saved, self._pending = self._pending, b""
        try:
            with path.open("rb") as handle:
                self._ingest(handle.read() + b"\n")
        except FileNotFoundError:
            pass
        self._pending = saved

    def _ingest(self, data: bytes) -> None:
        data = self._pending + data
        complete, _, self._pending = data.rpartition(b"\n")
        for line in complete.split(b"\n"):
            try:
                record = json.loads(line)
                kind, request_id = record["kind"], str(record["request_id"])
            except (ValueError, TypeError, KeyError):
                continue
            if kind == "prediction" and (moment := parse_time(record.get("time"))) is not None:
                self._entries.setdefault(request_id, RequestEntry(moment))
            elif kind == "feedback" and request_id in self._entries:
                self._entries[request_id].labelled = True
        self._forget_old()

    def _forget_old(self) -> None:
        horizon = datetime.now(UTC) - self.max_age
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if len(self._entries) <= self.max_entries and oldest.time >= horizon:
                return
            self._entries.popitem(last=False)
