"""`qlmctl evaluate`: points, the runner, and a markdown table whose rows match the run summaries."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

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
    ev = Evaluation(scs, ["fcfs", "qlm", "sjf-oracle"], results=run_points(points, jobs=1))
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


def test_pool_and_inline_runs_agree(tiny, tmp_path):
    scs = resolve_scenarios([str(tiny)])
    a = run_points(plan_points(scs, ["edf", "shepherd"], tmp_path / "a", rates=[30.0]), jobs=1)
    b = run_points(plan_points(scs, ["edf", "shepherd"], tmp_path / "b", rates=[30.0]), jobs=2)
    assert [r.summary["slo_attainment"] for r in a] == [r.summary["slo_attainment"] for r in b]
    assert [r.summary["p99_ttft_ms"] for r in a] == [r.summary["p99_ttft_ms"] for r in b]


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
    res = run_points([replace(points[0], path=str(tmp_path / "missing.yaml"))], jobs=1)
    assert res[0].summary is None and "file not found" in res[0].error
    md = markdown_report(Evaluation(scs, ["fcfs"], results=res), "x")
    assert "1 point(s) failed" in md


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
