"""`qlmctl sweep`: sweep files, planning, bisection, retries, resuming, and the same table on Ray."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from qlmctl.errors import UserError
from qlmctl.metrics import window_summary
from qlmctl.sweep import (
    Bisection,
    CapacityStatus,
    Executor,
    LocalExecutor,
    PointOutcome,
    ResultStore,
    SweepReporter,
    build_plan,
    load_sweep,
    run_sweep,
)
from qlmctl.sweep.point import SteadyWatch, measured_window
from qlmctl.sweep.store import POINTS_FILE
from qlmctl.sweep.tables import capacity_frame, results_frame, write_tables

REPO = Path(__file__).resolve().parents[1]
TRACE = REPO / "traces" / "azure_conv_2023_first3000.csv"
RUN_COLUMNS = ["wall_s", "worker", "sim_wall_s"]
"""Columns that describe the run, not the result (they differ between any two runs)."""

SCENARIO = {
    "name": "tiny",
    "seed": 0,
    "models": {"m": {"profile": {
        "base_s": 0.005, "per_prefill_token_s": 4e-5, "per_decode_seq_s": 2e-4, "kv_blocks": 4000,
        "max_num_seqs": 32, "max_num_batched_tokens": 2048, "max_model_len": 8192,
    }}},
    "cluster": {"instances": [{"count": 1, "gpu": "H200", "model": "m"}]},
    "slo_classes": {"interactive": {"ttft_s": 2}, "batch": {"ttft_s": 30}},
    "workload": {"trace": str(TRACE), "model": {"constant": "m"},
                 "slo_class": {"split": {"interactive": 0.5, "batch": 0.5}}},
}


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def make_sweep(folder: Path) -> Path:
    """4 grid points (2 policies x 2 rates) and 2 short bisections, 200 requests per point."""
    write_yaml(folder / "tiny.yaml", SCENARIO)
    return write_yaml(folder / "sweep.yaml", {
        "name": "t",
        "scenarios": ["tiny.yaml"],
        "policies": ["fcfs", "edf"],
        "rates_rps": [5, 40],
        "max_requests": 200,
        "duration_s": 20,
        "target_attainment": 0.9,
        "bisection": {"rate_min_rps": 2, "rate_max_rps": 80, "tolerance_rps": 15, "max_iterations": 3},
    })


@pytest.fixture
def sweep_file(tmp_path: Path) -> Path:
    return make_sweep(tmp_path)


def comparable(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=RUN_COLUMNS).reset_index(drop=True)


# --- the sweep file -------------------------------------------------------------------------


@pytest.mark.parametrize("change, field", [
    ({"rates_rps": [10, -1]}, "rates_rps"),
    ({"bisection": {"rate_min_rps": 5, "rate_max_rps": 1}}, "bisection"),
    ({"retries": -1}, "retries"),
    ({"speed": 3}, "speed"),
])
def test_bad_sweep_file_names_file_line_and_field(sweep_file: Path, change: dict, field: str) -> None:
    data = yaml.safe_load(sweep_file.read_text())
    data.update(change)
    write_yaml(sweep_file, data)
    with pytest.raises(UserError) as e:
        load_sweep(sweep_file)
    assert e.value.path == str(sweep_file)
    assert e.value.field is not None and e.value.field.startswith(field)
    assert e.value.line is not None


def test_unknown_policy_and_incomplete_list_point(sweep_file: Path) -> None:
    data = yaml.safe_load(sweep_file.read_text())
    write_yaml(sweep_file, {**data, "policies": ["fcfs", "nope"]})
    with pytest.raises(UserError) as e:
        build_plan(load_sweep(sweep_file), sweep_file)
    line = sweep_file.read_text().splitlines().index("- nope") + 1
    assert (e.value.field, e.value.line) == ("policies.1", line)

    listed = {**data, "mode": "list", "bisection": None, "points": [{"policy": "fcfs", "rate_rps": 5}, {"rate_rps": 9}]}
    write_yaml(sweep_file, listed)
    with pytest.raises(UserError) as e:
        build_plan(load_sweep(sweep_file), sweep_file)
    assert e.value.field == "points.1.policy"


def test_plan_expands_the_grid_with_stable_keys(tmp_path: Path, sweep_file: Path) -> None:
    data = yaml.safe_load(sweep_file.read_text())
    write_yaml(sweep_file, {**data, "instances": [1, 3], "seeds": [0, 1]})
    plan = build_plan(load_sweep(sweep_file), sweep_file)
    assert len(plan.points) == 2 * 2 * 2 * 2  # policies x instances x seeds x rates
    assert len({p.key for p in plan.points}) == len(plan.points)
    assert len(plan.configurations) == 2 * 2 * 2
    assert {p.config.gpus for p in plan.points} == {"1xH200", "3xH200"}
    again = build_plan(load_sweep(sweep_file), sweep_file)
    assert [p.key for p in again.points] == [p.key for p in plan.points]

    # The key follows the bytes the point runs: a changed trace gives new keys.
    trace = tmp_path / "trace.csv"
    shutil.copy(TRACE, trace)
    write_yaml(tmp_path / "tiny.yaml", {**SCENARIO, "workload": {**SCENARIO["workload"], "trace": str(trace)}})
    same_bytes = build_plan(load_sweep(sweep_file), sweep_file)
    assert [p.key for p in same_bytes.points] == [p.key for p in plan.points]
    lines = trace.read_text().splitlines()
    trace.write_text("\n".join(lines[:-1]) + "\n")
    edited = build_plan(load_sweep(sweep_file), sweep_file)
    assert not {p.key for p in edited.points} & {p.key for p in plan.points}


def test_mixed_cluster_is_cycled_to_the_instance_count(tmp_path: Path) -> None:
    mixed = {**SCENARIO, "cluster": {"instances": [{"gpu": "H200", "model": "m"}, {"gpu": "A100", "model": "m"}]}}
    write_yaml(tmp_path / "mixed.yaml", mixed)
    path = write_yaml(tmp_path / "s.yaml", {"scenarios": ["mixed.yaml"], "policies": ["fcfs"], "instances": [3, None],
                                            "rates_rps": [5]})
    plan = build_plan(load_sweep(path), path)
    assert [(p.config.instances, p.config.gpus) for p in plan.points] == [(3, "2xH200+1xA100"), (2, "1xH200+1xA100")]
    cluster = plan.points[0].overrides()["cluster"]["instances"]
    assert [line["gpu"] for line in cluster] == ["H200", "A100", "H200"]


def test_a_point_runs_what_simulate_runs(sweep_file: Path) -> None:
    from qlmctl.runner import simulate
    from qlmctl.scenario import load_scenario
    from qlmctl.sweep import run_point
    from qlmctl.sweep.point import SUMMARY_METRICS
    from qlmctl.workload import build_requests

    plan = build_plan(load_sweep(sweep_file), sweep_file)
    point = next(p for p in plan.points if p.config.policy == "edf" and p.rate_rps == 40)
    outcome = run_point(point, plan.bundles[point.config.bundle])
    assert outcome.ok, outcome.traceback
    sc = load_scenario(sweep_file.parent / "tiny.yaml", point.overrides())
    requests, _ = build_requests(sc)
    assert requests[-1].arrival_s < 20 < requests[-1].arrival_s + 1  # 20 s of arrivals: the 200 repeated
    start, end = measured_window(requests, 20, 0.1)
    assert (start, end) == pytest.approx((2.0, 20.0), abs=0.02)
    run = simulate(sc, "edf", requests, stop_if=SteadyWatch(requests, start, end, 0.95))
    summary = run.summary
    window = window_summary(run.result.requests, start, end)
    assert 0 < window["window_slo_attainment"] < 1  # the classes matter at this load
    # Attainment leaves the warm-up out; the run's own summary is kept beside it.
    assert outcome.metrics["slo_attainment"] == window["window_slo_attainment"]
    assert outcome.metrics["attainment_by_class"] == window["window_attainment_by_class"]
    assert outcome.metrics["slo_attainment_run"] == summary["slo_attainment"]
    assert outcome.metrics["steady"] is (window["window_throughput_ratio"] >= 0.95 and not run.stopped_early)
    for name in SUMMARY_METRICS:
        if name not in ("sim_wall_s", "slo_attainment"):
            assert outcome.metrics[name] == summary[name], name


def test_burst_capacity_is_not_sustainable_capacity(tmp_path: Path) -> None:
    """The trap of issue 17: a fixed request count replayed at a high rate is a short burst the deadlines
    absorb; over a fixed span of arrivals the same rate builds a backlog, and the point is not steady."""
    from qlmctl.sweep import run_point

    write_yaml(tmp_path / "tiny.yaml", {**SCENARIO, "slo_classes": {"a": {"ttft_s": 60}},
                                        "workload": {**SCENARIO["workload"], "slo_class": {"constant": "a"}}})
    base = {"scenarios": ["tiny.yaml"], "policies": ["fcfs"], "rates_rps": [60], "max_requests": 200}
    burst = write_yaml(tmp_path / "burst.yaml", {**base, "duration_s": None})
    span = write_yaml(tmp_path / "span.yaml", {**base, "duration_s": 120})
    outcomes = {}
    for path in (burst, span):
        plan = build_plan(load_sweep(path), path)
        (point,) = plan.points
        outcomes[path.stem] = run_point(point, plan.bundles[point.config.bundle]).metrics
    assert outcomes["burst"]["slo_attainment"] >= 0.9  # 200 requests in 3 s: every one within 60 s
    assert not outcomes["burst"]["steady"]  # ... but far from completing 60 req/s
    assert not outcomes["span"]["steady"] and outcomes["span"]["slo_attainment"] < 0.5
    assert outcomes["span"]["window_completed_rps"] < 0.5 * outcomes["span"]["window_offered_rps"]


# --- bisection ------------------------------------------------------------------------------


def search(threshold: float, lo: float, hi: float, tol: float, k: int = 1, iters: int = 40) -> Bisection:
    """Run a bisection against attainment = 1 below `threshold`, 0.5 at and above it."""
    b = Bisection(0.9, lo, hi, tol, iters, k)
    while not b.done:
        rates = b.next_rates()
        for r in rates:
            b.record(r, 1.0 if r < threshold else 0.5)
    return b


@settings(max_examples=60, deadline=None)
@given(threshold=st.floats(2.0, 199.0), k=st.integers(1, 4), tol=st.floats(0.1, 20.0))
def test_bisection_brackets_the_threshold(threshold: float, k: int, tol: float) -> None:
    b = search(threshold, 1.0, 200.0, tol, k)
    assert b.status is CapacityStatus.CONVERGED
    assert b.max_rate is not None and b.misses is not None
    assert b.max_rate < threshold <= b.misses
    assert b.misses - b.max_rate <= max(tol, 1e-3 * b.misses)
    assert all((a >= 0.9) == (r < threshold) for r, a in b.probes.items())


def test_bisection_edges_and_failures() -> None:
    assert search(500, 1, 200, 1).status is CapacityStatus.ABOVE_MAX
    assert search(500, 1, 200, 1).max_rate == 200
    low = search(0.5, 1, 200, 1)
    assert (low.status, low.max_rate) == (CapacityStatus.BELOW_MIN, None)
    capped = search(77.7, 1, 200, 0.001, iters=3)
    assert capped.status is CapacityStatus.MAX_ITERATIONS and capped.rounds == 3
    assert capped.max_rate < 77.7 <= capped.misses

    b = Bisection(0.9, 1, 100, 1, 10)
    first, second = b.next_rates()
    b.record(first, None, "boom")
    b.record(second, 1.0)
    assert (b.status, b.max_rate, b.error) == (CapacityStatus.FAILED, None, "boom")
    # Deterministic: the same answers give the same probes.
    assert list(search(61.3, 1, 200, 0.5).probes) == list(search(61.3, 1, 200, 0.5).probes)


# --- the runner, against an in-process executor ---------------------------------------------


class FakeExecutor(Executor):
    """Runs nothing: attainment 1.0 below 30 req/s, 0.5 above; fails points as told."""

    name = "fake"
    slots = 3

    def __init__(self, fail: dict[float, int]) -> None:
        self.fail = dict(fail)
        """rate -> attempts that fail (a large number: always)."""
        self.submitted: list[float] = []
        self._queue: list = []

    def add_bundle(self, bundle) -> None:
        pass

    def submit(self, point) -> None:
        self.submitted.append(point.rate_rps)
        self._queue.append(point)

    def wait(self, timeout_s=None) -> list[PointOutcome]:
        point = self._queue.pop(0)
        if self.fail.get(point.rate_rps, 0) > 0:
            self.fail[point.rate_rps] -= 1
            return [PointOutcome(point.key, False, None, "RuntimeError: boom", "tb", 0.0, "fake")]
        att = 1.0 if point.rate_rps < 30 else 0.5
        return [PointOutcome(point.key, True, {"slo_attainment": att}, None, None, 0.0, "fake")]

    @property
    def in_flight(self) -> int:
        return len(self._queue)

    def close(self) -> None:
        pass


class Recorder(SweepReporter):
    def __init__(self) -> None:
        self.failures: list[tuple[str, int, int]] = []
        self.capacities = 0

    def point_failed(self, point, outcome, attempt, max_attempts) -> None:
        self.failures.append((point.describe(), attempt, max_attempts))

    def capacity_done(self, config, search) -> None:
        self.capacities += 1


def test_failed_points_are_retried_then_reported_never_missing(tmp_path: Path, sweep_file: Path) -> None:
    data = yaml.safe_load(sweep_file.read_text())
    write_yaml(sweep_file, {**data, "policies": ["fcfs"], "rates_rps": [5, 10, 40], "retries": 2})
    plan = build_plan(load_sweep(sweep_file), sweep_file)
    executor = FakeExecutor({10.0: 1, 40.0: 99})  # 10: fails once; 40: always
    reporter = Recorder()
    result = run_sweep(plan, executor, ResultStore(tmp_path / "out"), reporter)

    assert set(result.keys) == set(result.records)
    records = {r.labels["rate_rps"]: r for r in result.records.values()}
    assert records[5.0].ok and records[5.0].attempts == 1
    assert records[10.0].ok and records[10.0].attempts == 2
    assert not records[40.0].ok and records[40.0].attempts == 3 and "boom" in records[40.0].error
    assert executor.submitted.count(40.0) == 3
    # Every failed attempt is reported with the point's parameters.
    assert [f for f in reporter.failures if "rate=40 " in f[0]] == [
        (f"{plan.points[2].describe()}", a, 3) for a in (1, 2, 3)
    ]
    assert "scenario=tiny policy=fcfs instances=1 seed=0 max_requests=200 duration=20s rate=40 req/s" in reporter.failures[-1][0]
    # The search is not fooled by the failing grid point: it never probes exactly 40.
    ((_, b),) = result.searches
    assert b.status is CapacityStatus.CONVERGED and b.max_rate < 30 <= b.misses
    assert reporter.capacities == 1

    points = results_frame(result)
    assert len(points) == len(result.keys)
    assert points.loc[points["rate_rps"] == 40, "status"].tolist() == ["failed"]


# --- real sweeps ----------------------------------------------------------------------------


class Counting(LocalExecutor):
    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self.submitted = 0

    def submit(self, point) -> None:
        self.submitted += 1
        super().submit(point)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory):
    """The small sweep, run once on a local pool of 2 workers: (plan, out folder, result, submissions)."""
    folder = tmp_path_factory.mktemp("local")
    path = make_sweep(folder)
    plan = build_plan(load_sweep(path), path)
    with Counting(2) as ex:
        result = run_sweep(plan, ex, ResultStore(folder / "out"))
    return plan, folder / "out", result, ex.submitted


def test_local_sweep_writes_tables_and_figures(local_run) -> None:
    from qlmctl.sweep.figures import write_figures

    plan, out, result, submitted = local_run
    assert submitted == len(result.keys) and not result.failed
    points = results_frame(result)
    grid = points[points["phase"] == "grid"]
    assert len(grid) == 4 and (grid["num_requests"] == 20 * grid["rate_rps"]).all()  # 20 s of arrivals
    # More load, no better attainment; the offered rate is the one asked for.
    for _, rows in grid.groupby("policy"):
        assert rows.sort_values("rate_rps")["slo_attainment"].is_monotonic_decreasing
    assert (abs(grid["offered_rate_rps"] / grid["rate_rps"] - 1) < 0.02).all()
    assert (abs(grid["window_offered_rps"] / grid["rate_rps"] - 1) < 0.2).all()  # a bursty trace, 18 s of it
    capacity = capacity_frame(result)
    assert len(capacity) == 2 and capacity["max_rate_rps"].notna().all()
    for row in capacity.itertuples():
        mine = points[points["policy"] == row.policy]
        assert (mine.loc[mine["rate_rps"] <= row.max_rate_rps, "slo_attainment"] >= 0.9).all()
        above = mine[mine["rate_rps"] >= row.upper_rate_rps]
        assert ((above["slo_attainment"] < 0.9) | ~above["steady"].astype(bool)).all()  # missed, or unsteady
        assert mine.loc[mine["rate_rps"] <= row.max_rate_rps, "steady"].all()

    written = write_tables(result, out)
    assert pd.read_parquet(written["results"]).shape == points.shape
    md = written["markdown"].read_text()
    assert "## Highest rate holding 90% SLO attainment" in md and md.count("| grid |") == 4
    figures, _ = write_figures(points, capacity, 0.9, ["fcfs", "edf"], out)
    assert len(figures) == 2 and all(f.stat().st_size > 5000 for f in figures)


def test_interrupted_sweep_resumes_where_it_stopped(local_run, tmp_path: Path) -> None:
    plan, out, result, _ = local_run
    points = comparable(results_frame(result))
    # Interrupted after two results, the third line cut short: the rerun runs only the rest.
    lines = (out / POINTS_FILE).read_text().splitlines(keepends=True)
    (tmp_path / POINTS_FILE).write_text("".join(lines[:2]) + lines[2][:25])
    store = ResultStore(tmp_path)
    assert (len(store), store.bad_lines) == (2, 1)
    with Counting(2) as ex:
        resumed = run_sweep(plan, ex, store)
    assert (ex.submitted, resumed.cached) == (len(result.keys) - 2, 2)
    pd.testing.assert_frame_equal(comparable(results_frame(resumed)), points)
    tail = [json.loads(line) for line in (tmp_path / POINTS_FILE).read_text().splitlines()[3:]]
    assert len(tail) == len(result.keys) - 2  # whole lines after the cut one

    # Done: nothing runs again.
    with Counting(2) as ex:
        again = run_sweep(plan, ex, ResultStore(tmp_path))
    assert ex.submitted == 0 and again.cached == len(result.keys)
    pd.testing.assert_frame_equal(comparable(results_frame(again)), points)


def test_same_sweep_on_ray_gives_the_same_table(local_run, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    from qlmctl.sweep import RayExecutor

    plan, _, result, _ = local_run
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        with RayExecutor() as ex:
            assert ex.cpus == 2
            on_ray = run_sweep(plan, ex, ResultStore(tmp_path))
    finally:
        ray.shutdown()
    assert on_ray.cached == 0 and not on_ray.failed
    assert {r.worker for r in on_ray.records.values()} != {r.worker for r in result.records.values()}
    pd.testing.assert_frame_equal(comparable(results_frame(on_ray)), comparable(results_frame(result)))
    pd.testing.assert_frame_equal(capacity_frame(on_ray), capacity_frame(result))


def test_cli_reports_a_failing_point_with_its_parameters(tmp_path: Path, sweep_file: Path) -> None:
    from qlmctl.cli import app

    broken = {**SCENARIO, "name": "broken", "workload": {**SCENARIO["workload"], "model": {"constant": "gone"}}}
    write_yaml(tmp_path / "broken.yaml", broken)
    write_yaml(sweep_file, {"scenarios": ["tiny.yaml", "broken.yaml"], "policies": ["fcfs"], "rates_rps": [7],
                            "max_requests": 50, "retries": 1})
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["sweep", str(sweep_file), "-o", str(out), "-j", "1"])
    assert res.exit_code == 1, res.output
    assert "scenario=broken policy=fcfs instances=1 seed=0 max_requests=50 duration=600s rate=7 req/s" in res.output
    assert "attempt 2/2, giving up" in res.output and "unknown model 'gone'" in res.output
    assert str(tmp_path / "broken.yaml") in res.output  # the user's file, not the bundled copy
    table = pd.read_parquet(out / "results.parquet")
    assert table.set_index("scenario")["status"].to_dict() == {"tiny": "ok", "broken": "failed"}
    assert "## Failed points" in (out / "results.md").read_text()

    res = CliRunner().invoke(app, ["sweep", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and "file not found" in res.output


def test_a_bundle_carries_every_file_its_scenario_names(tmp_path: Path, monkeypatch) -> None:
    """Per-class lengths traces travel in the bundle like the others: a worker whose folder and working
    directory are elsewhere builds the same requests (the paths were relative to the scenario's folder)."""
    from qlmctl.scenario import load_scenario
    from qlmctl.sweep.bundle import make_bundle, materialise
    from qlmctl.workload import build_requests

    home = tmp_path / "project" / "scenarios"
    home.mkdir(parents=True)
    shutil.copy(TRACE, tmp_path / "project" / "lengths.csv")
    spec = {**SCENARIO, "workload": {
        "synthetic": {"rate_rps": 5, "num_requests": 50},
        "model": {"constant": "m"},
        "slo_class": {"split": {"interactive": 0.5, "batch": 0.5}},
        "lengths_by_class": {"interactive": {"lengths_from": "../lengths.csv"},
                             "batch": {"prompt": {"mean": 100}, "output": {"mean": 10}}}}}
    sc = load_scenario(write_yaml(home / "s.yaml", spec))
    bundle = make_bundle(sc)
    assert len(bundle.files) == 1 and "lengths.csv" in next(iter(bundle.origins.values()))
    elsewhere = tmp_path / "worker"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    shipped = load_scenario(materialise(bundle, elsewhere / "cache"))
    want = [(r.prompt_tokens, r.output_tokens) for r in build_requests(sc)[0]]
    assert [(r.prompt_tokens, r.output_tokens) for r in build_requests(shipped)[0]] == want
