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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from qlmctl.errors import UserError
from qlmctl.sweep.bundle import Bundle, materialise, original_path, with_origins

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
    """SUMMARY_METRICS, plus `attainment_by_class` ({class: fraction}) and
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
        run = simulate(sc, point.config.policy, requests)
        summary = run.summary
        metrics = {k: summary.get(k) for k in SUMMARY_METRICS}
        metrics["attainment_by_class"] = dict(summary.get("slo_attainment_by_class") or {})
        metrics["offered_rate_rps"] = report.mean_rate_rps
        return PointOutcome(point.key, True, metrics, None, None, time.perf_counter() - start, worker)
    except Exception as e:  # noqa: BLE001 - every failure goes back to the driver, with its point
        tb = traceback.format_exc()
        if folder is not None:
            tb = with_origins(tb, folder, origins)
        return PointOutcome(
            point.key, False, None, _describe_error(e, folder, origins), tb, time.perf_counter() - start, worker
        )


__all__ = ["LocalBundle", "PointOutcome", "SUMMARY_METRICS", "error_in_origins", "lost_outcome", "open_bundle",
           "run_point"]
