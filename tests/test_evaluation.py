"""`qlmctl evaluate`: points, the runner, and a markdown table whose rows match the run summaries."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from qlmctl.cli import app
from qlmctl.errors import UserError
from qlmctl.evaluation import (
    BEGIN_MARK,
    END_MARK,
    SUITE,
    EvalScenario,
    Evaluation,
    markdown_report,
    plan_points,
    resolve_scenarios,
    run_points,
    write_report,
)
from qlmctl.plots import policy_label
from qlmctl.scenario import load_scenario
from qlmctl.sweep import Executor, LocalExecutor
from qlmctl.sweep.bundle import materialise
from qlmctl.sweep.point import LocalBundle
from tests.conftest import small_profile

TINY = {
    "name": "tiny",
    "description": "tiny test scenario",
    "seed": 3,
    "cluster": {"instances": [{"count": 2, "model": "m"}]},
    "slo_classes": {"interactive": {"ttft_s": 2}, "batch": {"ttft_s": 60}},
    "workload": {
        "synthetic": {"rate_rps": 10, "num_requests": 60, "prompt_tokens": 300, "output_tokens": 40},
        "slo_class": {"split": {"interactive": 1, "batch": 1}},
    },
}


@pytest.fixture
def tiny(tmp_path) -> Path:
    p = small_profile(max_num_seqs=4, kv_blocks=150)
    data = dict(TINY, models={"m": {"profile": {f: getattr(p, f) for f in p.__dataclass_fields__ if f != "model"}}})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def parse_rows(md: str, scenario: str) -> list[dict[str, str]]:
    """The rows of the scenario's first table in the generated markdown, as {header: cell}."""
    section = md.split(f"### {scenario}\n", 1)[1]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if len(cells) != len(head) or cells[0] == head[0]:
            break  # the next table
        rows.append(dict(zip(head, cells)))
    return rows


def test_table_rows_match_the_summaries(tiny, tmp_path):
    scs = resolve_scenarios([str(tiny)])
    points = plan_points(scs, ["fcfs", "qlm", "sjf-oracle"], tmp_path / "runs", rates=[5.0, 40.0])
    assert len(points) == 6
    with LocalExecutor(2) as ex:
        ev = Evaluation(scs, ["fcfs", "qlm", "sjf-oracle"], results=run_points(points, ex))
    assert not ev.failed
    md = markdown_report(ev, "qlmctl evaluate (test)")
    rows = parse_rows(md, "tiny")
    assert len(rows) == 6
    for row in rows:
        rate = float(row["offered rate (req/s)"])
        policy = next(p for p in ev.policies if policy_label(p) == row["policy"])
        folder = tmp_path / "runs" / "tiny" / f"rate-{rate:g}" / policy
        s = json.loads((folder / "summary.json").read_text())
        assert s["target_rate_rps"] == rate and s["policy"] == policy and s["eval_scenario"] == "tiny"
        assert row["SLO att. (%)"].strip("*") == f"{100 * s['slo_attainment']:.1f}"
        for cls, v in s["slo_attainment_by_class"].items():
            assert row[f"{cls} (%)"] == f"{100 * v:.1f}"
        assert row["goodput (req/s)"] == f"{s['request_goodput']:,.2f}"
        assert row["throughput (req/s)"] == f"{s['request_throughput']:,.2f}"
        assert row["swaps"] == str(s["num_swaps"]) and row["evictions"] == str(s["num_evictions"])
        assert row["completed"] == f"{s['completed']}/{s['num_requests']}"
    # The offered rate was applied (the workload's measured rate is near it).
    s = json.loads((tmp_path / "runs" / "tiny" / "rate-40" / "qlm" / "summary.json").read_text())
    assert 20 < s["offered_rate_rps"] < 80
    # The oracle is labelled as such.
    assert "sjf-oracle (oracle)" in md


def test_executor_runs_write_what_simulate_writes(tiny, tmp_path):
    """A point run on the local executor (its scenario shipped as a bundle) writes the folder that
    simulating the user's file here and saving it writes, byte for byte but the wall-clock fields."""
    from qlmctl.runner import save, simulate
    from qlmctl.workload import build_requests

    scs = resolve_scenarios([str(tiny)])
    points = plan_points(scs, ["edf", "shepherd"], tmp_path / "pool", rates=[30.0])
    with LocalExecutor(2) as ex:
        res = run_points(points, ex)
    for r in res:
        assert r.error is None, r.error
        sc = load_scenario(r.point.path, r.point.overrides)
        requests, report = build_requests(sc)
        run = simulate(sc, r.point.policy, requests)
        run.summary.update(eval_scenario="tiny", target_rate_rps=30.0, offered_rate_rps=report.mean_rate_rps)
        here = save(run, sc, tmp_path / "here")
        pool = Path(r.folder)
        assert pool == tmp_path / "pool" / "tiny" / "rate-30" / r.point.policy
        assert sorted(f.name for f in pool.iterdir()) == sorted(f.name for f in here.iterdir())
        assert (pool / "scenario.yaml").read_text() == (here / "scenario.yaml").read_text()
        for name in ("requests.parquet", "timeline.parquet"):
            pd.testing.assert_frame_equal(pd.read_parquet(pool / name), pd.read_parquet(here / name))
        a, b = (json.loads((f / "summary.json").read_text()) for f in (pool, here))
        a.pop("sim_wall_s"), b.pop("sim_wall_s")
        # The evaluation records the run as simulate does (vLLM's run keys, the command, the workload).
        header = {k: a.pop(k) for k in list(a) if k not in b}
        assert {"date", "model_id", "num_prompts", "request_rate", "burstiness", "workload_id",
                "command"} <= set(header)
        assert header["num_prompts"] == len(requests) and header["model_id"] == "m"
        assert a == b


def test_a_synthetic_suite_scenario_keeps_its_time_span_at_every_rate(tmp_path):
    sc = EvalScenario("t", "scenarios/w_a.yaml", (10.0, 40.0), duration_s=50)
    points = plan_points([sc], ["fcfs"], tmp_path, rates=None)
    counts = {p.rate: p.overrides["workload"]["synthetic"]["num_requests"] for p in points}
    assert counts == {10.0: 500, 40.0: 2000}
    assert points[0].rate == 40.0  # the most expensive first


def test_every_suite_scenario_loads_and_quick_is_smaller():
    for sc in SUITE:
        loaded = load_scenario(sc.path)
        assert loaded.spec.name == sc.key
        q = sc.quick()
        assert len(q.rates_rps) <= 2 and set(q.rates_rps) <= set(sc.rates_rps)
        if sc.duration_s:
            assert q.duration_s < sc.duration_s


def test_unknown_scenario_is_a_user_error():
    with pytest.raises(UserError, match="unknown scenario 'w_z'"):
        resolve_scenarios(["w_z"])


def test_failed_point_is_reported_not_fatal(tiny, tmp_path):
    scs = resolve_scenarios([str(tiny)])
    points = plan_points(scs, ["fcfs"], tmp_path, rates=[5.0])
    missing = replace(points[0], path=str(tmp_path / "missing.yaml"))  # fails before any worker runs it
    broken = replace(points[0], overrides={"workload": {"model": {"constant": "gone"}}})  # fails in the worker
    seen = []
    with LocalExecutor(2) as ex:
        res = run_points([missing, points[0], broken], ex, seen.append)
    assert len(seen) == 3 and [r.point for r in res] == [missing, points[0], broken]
    assert res[0].summary is None and "file not found" in res[0].error
    assert res[1].error is None and res[1].summary["completed"] > 0
    # The error names the user's scenario file, not the bundle's copy the worker loaded.
    assert res[2].summary is None and "unknown model 'gone'" in res[2].error and str(tiny) in res[2].error
    md = markdown_report(Evaluation(scs, ["fcfs"], results=res), "x")
    assert "2 point(s) failed" in md


def test_cli_writes_the_report_and_keeps_hand_written_text(tiny, tmp_path):
    md = tmp_path / "docs" / "evaluation.md"
    md.parent.mkdir()
    md.write_text(f"# Mine\n\nintro text\n\n{BEGIN_MARK}\nold\n{END_MARK}\n\nclosing text\n")
    runner = CliRunner()
    res = runner.invoke(app, ["evaluate", "-s", str(tiny), "-p", "fcfs,qlm", "--rates", "5,20", "-j", "1",
                              "-o", str(md), "--runs-dir", str(tmp_path / "runs"), "--no-figures"])
    assert res.exit_code == 0, res.output
    text = md.read_text()
    assert text.startswith("# Mine\n\nintro text\n\n" + BEGIN_MARK)
    assert text.rstrip().endswith("closing text") and "\nold\n" not in text
    assert len(parse_rows(text, "tiny")) == 4
    res = runner.invoke(app, ["evaluate", "-s", "w_z", "--no-figures"])
    assert res.exit_code == 2 and "unknown scenario" in res.output


def test_write_report_creates_a_file(tmp_path):
    write_report(tmp_path / "e.md", f"{BEGIN_MARK}\nx\n{END_MARK}\n")
    assert (tmp_path / "e.md").read_text().startswith("# Evaluation\n")


def test_evaluate_on_ray_without_ray_installed_is_a_user_error(tiny, tmp_path):
    try:
        import ray  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        pytest.skip("Ray is installed")
    res = CliRunner().invoke(app, ["evaluate", "-s", str(tiny), "-p", "fcfs", "--ray-address", "local", "-o",
                                   str(tmp_path / "e.md"), "--runs-dir", str(tmp_path / "runs"), "--no-figures"])
    assert res.exit_code == 2 and "Ray is not installed" in res.output
    assert not (tmp_path / "runs").exists()


class InProcess(Executor):
    """Runs each task as it is submitted, in this process; tasks of `lose` come back lost."""

    name = "in-process"
    slots = 1

    def __init__(self, root: Path, lose: str) -> None:
        self.root, self.lose = root, lose
        self.bundles: dict[str, LocalBundle] = {}
        self.done: list = []

    def add_bundle(self, bundle) -> None:
        self.bundles[bundle.digest] = LocalBundle(materialise(bundle, self.root), bundle.origins)

    def submit(self, task) -> None:
        if task.point.policy == self.lose:
            self.done.append(task.lost(RuntimeError("killed"), "a worker process died"))
        else:
            self.done.append(task.run(self.bundles[task.bundle]))

    def wait(self, timeout_s=None) -> list:
        out, self.done = self.done, []
        return out

    @property
    def in_flight(self) -> int:
        return len(self.done)

    def close(self) -> None:
        pass


def test_a_lost_worker_fails_its_point_only(tiny, tmp_path):
    scs = resolve_scenarios([str(tiny)])
    points = plan_points(scs, ["fcfs", "edf"], tmp_path / "runs", rates=[5.0])
    res = run_points(points, InProcess(tmp_path / "bundles", lose="edf"))
    by = {r.point.policy: r for r in res}
    assert by["edf"].summary is None and by["edf"].error == "RuntimeError: a worker process died: killed"
    assert by["fcfs"].error is None and Path(by["fcfs"].folder, "summary.json").is_file()
    assert not (tmp_path / "runs" / "tiny" / "rate-5" / "edf").exists()
