"""The sweep's resumable state: one JSON line per finished attempt, appended as it comes in.

A rerun reads the file back and skips every point with an `ok` line; failed points run again.
Lines are written whole and flushed one by one, so an interrupted sweep loses at most the line
being written; an unreadable line is counted and reported, and its point simply runs again.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlmctl.report import _plain
from qlmctl.sweep.plan import Point
from qlmctl.sweep.point import PointOutcome

POINTS_FILE = "points.jsonl"


@dataclass
class PointRecord:
    """A point's final state in this sweep: its labels and metrics, or its error."""

    key: str
    labels: dict[str, Any]
    ok: bool
    attempts: int
    metrics: dict[str, Any] | None
    error: str | None
    wall_s: float
    worker: str
    cached: bool = False
    """Read back from an earlier run, not run now."""

    @property
    def attainment(self) -> float | None:
        return None if self.metrics is None else self.metrics.get("slo_attainment")


class ResultStore:
    """Appends outcomes to `folder/points.jsonl` and remembers every point done there."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / POINTS_FILE
        self.bad_lines = 0
        """Lines that could not be read back (e.g. cut short by an interruption)."""
        self._done: dict[str, PointRecord] = {}
        self._cut_short = False
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(0, 2)
            if f.tell():
                f.seek(-1, 2)
                # A line cut short must not swallow the next one written after it.
                self._cut_short = f.read(1) != b"\n"
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                    if data["status"] == "ok":
                        self._done[data["key"]] = PointRecord(
                            data["key"], data["point"], True, data["attempt"], data["metrics"], None,
                            data["wall_s"], data["worker"], cached=True,
                        )
                except (json.JSONDecodeError, KeyError, TypeError):
                    self.bad_lines += 1

    def __len__(self) -> int:
        return len(self._done)

    def done(self, key: str) -> PointRecord | None:
        """The earlier successful run of this point, if any."""
        return self._done.get(key)

    def append(self, point: Point, outcome: PointOutcome, attempt: int) -> None:
        """Record one attempt (successful or not) on disk, at once."""
        data = {
            "key": point.key,
            "status": "ok" if outcome.ok else "failed",
            "attempt": attempt,
            "point": point.labels(),
            "metrics": outcome.metrics,
            "error": outcome.error,
            "traceback": outcome.traceback,
            "wall_s": outcome.wall_s,
            "worker": outcome.worker,
            "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        line = json.dumps(_plain(data), allow_nan=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            if self._cut_short:
                f.write("\n")
                self._cut_short = False
            f.write(line)
        if outcome.ok:
            self._done[point.key] = PointRecord(
                point.key, point.labels(), True, attempt, outcome.metrics, None, outcome.wall_s, outcome.worker
            )

    def reset(self) -> None:
        """Forget every earlier result (delete the file)."""
        self.path.unlink(missing_ok=True)
        self._done.clear()
        self.bad_lines = 0
