"""The sweep driver: feeds points to an executor, retries failures, runs the bisections, and
records every outcome as it arrives.

One loop serves both kinds of work. Grid points are known up front; bisection probes appear as
earlier probes of the same configuration come back, and go ahead of the grid (they are on the
critical path of their search). A point is run once per sweep even when the grid and a search
both ask for it, and never when the store already holds it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from qlmctl.sweep.bisection import Bisection
from qlmctl.sweep.executors import WAIT_S, Executor
from qlmctl.sweep.plan import Configuration, Point, SweepPlan
from qlmctl.sweep.point import PointOutcome
from qlmctl.sweep.store import PointRecord, ResultStore

class SweepReporter:
    """Hooks for progress and failure reports; the defaults do nothing."""

    def asked(self, point: Point, is_probe: bool) -> None:
        """The sweep needs `point` (called once per point, cached ones included)."""

    def point_done(self, point: Point, record: PointRecord, is_probe: bool) -> None:
        """A point finished now or was found in the store (`record.cached`)."""

    def point_failed(self, point: Point, outcome: PointOutcome, attempt: int, max_attempts: int) -> None:
        """An attempt failed; it is retried while `attempt < max_attempts`."""

    def capacity_done(self, config: Configuration, search: Bisection) -> None:
        """A configuration's search ended (converged, out of its bracket, or failed)."""


@dataclass
class SweepResult:
    plan: SweepPlan
    records: dict[str, PointRecord]
    """Every point of the sweep (grid and probes), by key: its metrics or its final error."""
    grid_keys: list[str]
    probe_keys: list[str]
    """Bisection probes, in the order first asked for."""
    searches: list[tuple[Configuration, Bisection]]
    ran: int = 0
    """Attempts run now (retries included)."""
    cached: int = 0
    """Points read back from an earlier run."""

    @property
    def failed(self) -> list[PointRecord]:
        return [r for r in self.records.values() if not r.ok]

    @property
    def keys(self) -> list[str]:
        """Grid points then probes, each once."""
        return list(dict.fromkeys(self.grid_keys + self.probe_keys))


@dataclass
class _Runner:
    plan: SweepPlan
    executor: Executor
    store: ResultStore
    reporter: SweepReporter
    max_attempts: int = 1
    points: dict[str, Point] = field(default_factory=dict)
    records: dict[str, PointRecord] = field(default_factory=dict)
    attempt: dict[str, int] = field(default_factory=dict)
    probe_queue: deque[str] = field(default_factory=deque)
    grid_queue: deque[str] = field(default_factory=deque)
    active: set[str] = field(default_factory=set)
    """Keys queued or in flight."""
    waiters: dict[str, list[Callable[[PointRecord], None]]] = field(default_factory=dict)
    ready: deque[str] = field(default_factory=deque)
    """Resolved keys whose waiters are still to be called."""
    probe_keys: list[str] = field(default_factory=list)
    probe_set: set[str] = field(default_factory=set)
    reported: set[int] = field(default_factory=set)
    ran: int = 0
    cached: int = 0

    def request(self, point: Point, is_probe: bool, callback: Callable[[PointRecord], None] | None = None) -> None:
        key = point.key
        if key not in self.points:
            self.points[key] = point
            self.reporter.asked(point, is_probe)
        if is_probe and key not in self.probe_set:
            self.probe_set.add(key)
            self.probe_keys.append(key)
        if callback is not None:
            self.waiters.setdefault(key, []).append(callback)
        if key in self.records:
            self.ready.append(key)
            return
        if key in self.active:
            return
        earlier = self.store.done(key)
        if earlier is not None:
            earlier.labels = point.labels()
            self.records[key] = earlier
            self.cached += 1
            self.reporter.point_done(point, earlier, is_probe)
            self.ready.append(key)
            return
        self.active.add(key)
        self.attempt[key] = 1
        (self.probe_queue if is_probe else self.grid_queue).append(key)

    def search(self, config: Configuration, b: Bisection) -> None:
        """Ask for the next probes of `b`, or report it when it has ended."""
        if b.done:
            if id(b) not in self.reported:
                self.reported.add(id(b))
                self.reporter.capacity_done(config, b)
            return
        for rate in b.next_rates():
            def on_probe(rec: PointRecord, rate: float = rate) -> None:
                attainment = rec.attainment if rec.ok else None
                error = rec.error if not rec.ok else "no requests: no attainment"
                steady = bool((rec.metrics or {}).get("steady", True))
                b.record(rate, attainment, error, steady)
                self.search(config, b)

            self.request(config.at(rate), True, on_probe)
        if b.done:  # ended without a probe (a bracket that cannot shrink)
            self.search(config, b)

    def _handle(self, outcome: PointOutcome) -> None:
        key = outcome.key
        point = self.points[key]
        attempt = self.attempt[key]
        self.ran += 1
        self.store.append(point, outcome, attempt)
        if not outcome.ok:
            self.reporter.point_failed(point, outcome, attempt, self.max_attempts)
            if attempt < self.max_attempts:
                self.attempt[key] = attempt + 1
                is_probe = key in self.probe_set
                (self.probe_queue if is_probe else self.grid_queue).append(key)
                return
        record = PointRecord(
            key, point.labels(), outcome.ok, attempt, outcome.metrics, outcome.error, outcome.wall_s, outcome.worker
        )
        self.records[key] = record
        self.active.discard(key)
        if outcome.ok:
            self.reporter.point_done(point, record, key in self.probe_set)
        self.ready.append(key)

    def loop(self) -> None:
        while True:
            while self.ready:
                key = self.ready.popleft()
                for callback in self.waiters.pop(key, []):
                    callback(self.records[key])
            while self.executor.in_flight < self.executor.slots and (self.probe_queue or self.grid_queue):
                key = (self.probe_queue or self.grid_queue).popleft()
                self.executor.submit(self.points[key])
            if self.executor.in_flight == 0:
                if self.ready:
                    continue
                break
            for outcome in self.executor.wait(WAIT_S):
                self._handle(outcome)


def run_sweep(
    plan: SweepPlan,
    executor: Executor,
    store: ResultStore,
    reporter: SweepReporter | None = None,
) -> SweepResult:
    """Run every point of `plan` not already in `store`, and every bisection, on `executor`.

    Outcomes are appended to the store as they arrive, so an interrupted sweep resumes where it
    stopped. A point that fails is retried up to `spec.retries` times, then recorded as failed;
    a bisection whose probe fails ends with status `failed`. Nothing is left out of the result.
    """
    spec = plan.spec
    runner = _Runner(plan, executor, store, reporter or SweepReporter(), max_attempts=1 + spec.retries)
    for bundle in plan.bundles.values():
        executor.add_bundle(bundle)

    searches: list[tuple[Configuration, Bisection]] = []
    if spec.bisection is not None:
        b = spec.bisection
        for config in plan.configurations:
            search = Bisection(spec.target_attainment, b.rate_min_rps, b.rate_max_rps, b.tolerance_rps,
                               b.max_iterations, b.probes_per_round)
            searches.append((config, search))
            runner.search(config, search)
    for point in plan.points:
        runner.request(point, False)
    runner.loop()

    grid_keys = [p.key for p in plan.points]
    missing = [k for k in grid_keys + runner.probe_keys if k not in runner.records]
    if missing:  # the loop only ends when every asked-for point is resolved
        raise RuntimeError(f"sweep ended with {len(missing)} unresolved points")
    return SweepResult(plan, runner.records, grid_keys, runner.probe_keys, searches, runner.ran, runner.cached)
