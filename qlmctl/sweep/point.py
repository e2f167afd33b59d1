"""One point of a sweep, run in a worker: load the bundled scenario, build requests, simulate.

`run_point` is what a sweep point's task runs in an executor's worker (`Point.run`). It never
raises: a failure comes back as an outcome with the error and its traceback, so that the driver can
report it with the point's parameters and retry it. `open_bundle` and `error_in_origins` serve any
task that runs on a bundle (the evaluation's too).
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from qlmctl.errors import UserError
from qlmctl.sweep.bundle import Bundle, materialise, original_path, with_origins

if TYPE_CHECKING:
    from qlmctl.core.request import Request

SUMMARY_METRICS: tuple[str, ...] = (
    "num_requests",
    "completed",
    "slo_attainment",
    "request_goodput",
    "request_throughput",
    "output_throughput",
    "p50_ttft_ms",
    "p99_ttft_ms",
    "p50_tpot_ms",
    "p99_tpot_ms",
    "p99_e2el_ms",
    "num_preemptions",
    "num_evictions",
    "num_swaps",
    "mean_utilisation",
    "duration",
    "sim_wall_s",
)
"""Keys of `metrics.summarize` kept per point (same names and units: ms, req/s, tok/s, s)."""


class _Config(Protocol):
    @property
    def policy(self) -> str: ...

    @property
    def measure(self) -> tuple[float, float, bool]: ...


class Point(Protocol):
    """What running a point needs of it: `qlmctl.sweep.plan.Point` (a protocol here, as the plan's points
    run themselves through this module)."""

    @property
    def key(self) -> str: ...

    @property
    def config(self) -> _Config: ...

    def overrides(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class LocalBundle:
    """A bundle already written to this machine's disk (what the local pool ships)."""

    scenario_file: Path
    origins: dict[str, str]


@dataclass
class PointOutcome:
    """What one attempt at a point gave."""

    key: str
    ok: bool
    metrics: dict[str, Any] | None
    """SUMMARY_METRICS over the whole run, but `slo_attainment` and `attainment_by_class` ({class: fraction})
    over the measured window (warm-up left out; the whole run's is `slo_attainment_run`); `STEADY_METRICS`;
    `offered_rate_rps` (the replayed requests' mean arrival rate)."""
    error: str | None
    """`ExceptionType: message` when not ok."""
    traceback: str | None
    wall_s: float
    """Seconds the attempt took in the worker: loading, building requests, simulating."""
    worker: str
    """host:pid of the process that ran it."""


def open_bundle(source: Bundle | LocalBundle) -> tuple[Path, dict[str, str]]:
    """The scenario file of `source` on this machine (written out once if it is not yet) and its
    origins (local file name -> the path the driver read it from)."""
    if isinstance(source, LocalBundle):
        return source.scenario_file, source.origins
    return materialise(source), source.origins


def error_in_origins(e: UserError, folder: Path, origins: dict[str, str]) -> UserError:
    """`e` raised on the bundle materialised in `folder`, naming the user's files instead."""
    path = original_path(e.path, folder, origins)
    # A line in the bundled copy means nothing in the user's file; the field still does.
    line = e.line if path == e.path else None
    return UserError(with_origins(e.message, folder, origins), path, line, e.field)


def _describe_error(e: BaseException, folder: Path | None, origins: dict[str, str]) -> str:
    if folder is None:
        return f"{type(e).__name__}: {e}"
    if isinstance(e, UserError):
        return f"UserError: {error_in_origins(e, folder, origins).one_line()}"
    return f"{type(e).__name__}: {with_origins(str(e), folder, origins)}"


def lost_outcome(point: Point, e: BaseException, what: str) -> PointOutcome:
    """The outcome of a point whose worker died or whose task was lost."""
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    return PointOutcome(point.key, False, None, f"{type(e).__name__}: {what}: {e}", tb, 0.0, "?")


def run_point(point: Point, source: Bundle | LocalBundle) -> PointOutcome:
    """Simulate `point` on its bundled scenario and return the key metrics (never raises)."""
    from qlmctl.runner import simulate
    from qlmctl.scenario import load_scenario
    from qlmctl.workload import build_requests

    start = time.perf_counter()
    worker = f"{socket.gethostname()}:{os.getpid()}"
    folder: Path | None = None
    origins: dict[str, str] = {}
    try:
        scenario_file, origins = open_bundle(source)
        folder = scenario_file.parent
        sc = load_scenario(scenario_file, point.overrides())
        requests, report = build_requests(sc)
        warmup, min_ratio, stop = point.config.measure
        start_s, end_s = measured_window(requests, sc.spec.workload.duration_s, warmup)
        watch = SteadyWatch(requests, start_s, end_s, min_ratio) if stop else None
        run = simulate(sc, point.config.policy, requests, stop_if=watch, copy_requests=False)
        summary = run.summary
        metrics = {k: summary.get(k) for k in SUMMARY_METRICS}
        metrics.update(steady_metrics(run.result.requests, start_s, end_s, min_ratio, run.stopped_early))
        metrics["slo_attainment_run"] = summary.get("slo_attainment")
        metrics["slo_attainment"] = metrics.pop("window_slo_attainment")
        metrics["attainment_by_class"] = metrics.pop("window_attainment_by_class")
        metrics["offered_rate_rps"] = report.mean_rate_rps
        return PointOutcome(point.key, True, metrics, None, None, time.perf_counter() - start, worker)
    except Exception as e:  # noqa: BLE001 - every failure goes back to the driver, with its point
        tb = traceback.format_exc()
        if folder is not None:
            tb = with_origins(tb, folder, origins)
        return PointOutcome(
            point.key, False, None, _describe_error(e, folder, origins), tb, time.perf_counter() - start, worker
        )


STEADY_METRICS: tuple[str, ...] = (
    "steady", "stopped_early", "window_start_s", "window_s", "window_offered_rps", "window_completed_rps",
    "window_throughput_ratio", "window_goodput",
)
"""Per point, beside SUMMARY_METRICS: whether it reached a steady state (completed at least the sweep's
`min_throughput_ratio` of its offered rate over the measured window) and the window's figures."""

STOP_CHECK_FRACTION = 0.25
"""A run is checked for hopeless overload once this fraction of its measured window has passed."""
STOP_BACKLOG_FRACTION = 0.5
"""... and stopped if it has finished fewer than this fraction of the requests that arrived by then."""


def measured_window(requests: Sequence[Request], duration_s: float | None, warmup_fraction: float) -> tuple[float, float]:
    """The arrival window a point's metrics cover: the arrival span (`duration_s` when set, else first to last
    arrival) less its first `warmup_fraction`."""
    if not requests:
        return 0.0, 1.0
    first = min(r.arrival_s for r in requests)
    last = max(r.arrival_s for r in requests)
    end = first + duration_s if duration_s is not None else last + 1e-9
    end = max(end, first + 1e-9)
    return first + warmup_fraction * (end - first), end


def steady_metrics(requests: Sequence[Request], start_s: float, end_s: float, min_ratio: float,
                   stopped_early: bool) -> dict[str, Any]:
    """`metrics.window_summary` over [start_s, end_s) with `steady` (completed >= min_ratio x offered)."""
    from qlmctl.metrics import window_summary

    w = window_summary(requests, start_s, end_s)
    ratio = w["window_throughput_ratio"]
    return {"steady": bool(ratio is not None and ratio >= min_ratio and not stopped_early),
            "stopped_early": stopped_early, "window_start_s": start_s, **w}


class SteadyWatch:
    """`runner.simulate`'s `stop_if` for a sweep point: stops a run that can no longer be steady.

    During the window, once `STOP_CHECK_FRACTION` of it has passed: when fewer than `STOP_BACKLOG_FRACTION`
    of the requests arrived so far have finished (the backlog grows at half the offered rate or more). After
    the window: once, when its completed throughput is settled and below `min_ratio` of the offered rate
    (the drain that would follow only serves requests nobody counts as on time)."""

    def __init__(self, requests: Sequence[Request], start_s: float, end_s: float, min_ratio: float) -> None:
        import numpy as np

        self._arrivals = np.sort(np.fromiter((r.arrival_s for r in requests), dtype=np.float64, count=len(requests)))
        self.start_s, self.end_s, self.min_ratio = start_s, end_s, min_ratio
        self._after_checked = False

    def __call__(self, now: float, done: int, requests: Sequence[Request]) -> bool:
        if now < self.start_s + STOP_CHECK_FRACTION * (self.end_s - self.start_s):
            return False
        if now < self.end_s:
            arrived = int(self._arrivals.searchsorted(now, side="right"))
            return done < STOP_BACKLOG_FRACTION * arrived
        if self._after_checked:
            return False
        self._after_checked = True
        from qlmctl.metrics import window_summary

        ratio = window_summary(requests, self.start_s, self.end_s)["window_throughput_ratio"]
        return ratio is not None and ratio < self.min_ratio


__all__ = ["LocalBundle", "PointOutcome", "STEADY_METRICS", "SUMMARY_METRICS", "SteadyWatch", "measured_window",
           "steady_metrics", "error_in_origins", "lost_outcome", "open_bundle",
           "run_point"]
