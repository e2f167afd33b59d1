"""`qlmctl plot`: figures from small results folders, grouping of runs, colours, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qlmctl.cli import app
from qlmctl.errors import UserError
from qlmctl.plots import (
    FIGURES,
    group_runs,
    load_runs,
    plot_results,
    policy_color,
)
from qlmctl.runner import save, simulate
from qlmctl.workload import build_requests
from tests.conftest import make_scenario

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_runs(out: Path, policies=("fcfs", "qlm"), rate: float | None = None, models=("m",)) -> Path:
    wl = {
        "synthetic": {"rate_rps": rate or 40, "num_requests": 120, "prompt_tokens": 200, "output_tokens": 30},
        "slo_class": {"split": {"interactive": 1, "batch": 1}},
    }
    if len(models) > 1:
        wl["model"] = {"split": {m: 1 for m in models}}
    sc = make_scenario(instances=2, models=models, kv_blocks=200, max_num_seqs=8, workload=wl)
    reqs, _ = build_requests(sc)
    for p in policies:
        run = simulate(sc, p, reqs)
        if rate is not None:
            run.summary["target_rate_rps"] = rate
        save(run, sc, out)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    return write_runs(tmp_path_factory.mktemp("runs") / "small", policies=("fcfs", "edf", "qlm"))


def test_plot_writes_every_figure_as_png_and_svg(results, tmp_path):
    written = plot_results([results], tmp_path)
    stems = {p.stem for p in written}
    assert {"slo_attainment", "latency_cdf", "queue_depth", "throughput"} <= stems
    assert {"timeline-fcfs", "timeline-edf", "timeline-qlm"} <= stems
    for stem in stems:
        png, svg = tmp_path / f"{stem}.png", tmp_path / f"{stem}.svg"
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert svg.stat().st_size > 1000 and b"<svg" in svg.read_bytes()[:2000]
    # One rate only: no attainment-vs-rate figure.
    assert not any("attainment_vs_rate" in s for s in stems)


def test_plot_command_on_a_policy_folder_and_a_parent(results, tmp_path):
    runner = CliRunner()
    out = tmp_path / "figs"
    res = runner.invoke(app, ["plot", str(results / "qlm"), "-o", str(out), "--format", "png",
                              "--figures", "slo_attainment,timeline"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["slo_attainment.png", "timeline-qlm.png"]
    res = runner.invoke(app, ["plot", str(results), "--format", "svg", "--figures", "throughput"])
    assert res.exit_code == 0, res.output
    assert (results / "figures" / "throughput.svg").exists()


def test_plot_bad_input_is_one_line_exit_2(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["plot", str(tmp_path / "nope")])
    assert res.exit_code == 2
    assert "no such file or folder" in res.output and "Traceback" not in res.output
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["plot", str(tmp_path / "empty")])
    assert res.exit_code == 2 and "no results here" in res.output
    res = runner.invoke(app, ["plot", str(tmp_path / "empty"), "--figures", "pie"])
    assert res.exit_code == 2 and "unknown figure 'pie'" in res.output


def test_unreadable_summary_names_the_file(results, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(results / "qlm", bad)
    (bad / "summary.json").write_text("{not json")
    with pytest.raises(UserError) as e:
        plot_results([bad], tmp_path / "out")
    assert "summary.json" in e.value.one_line()


def test_a_simulated_and_a_live_run_share_figures_with_distinct_labels(results, tmp_path):
    live = tmp_path / "live"
    shutil.copytree(results / "qlm", live / "qlm")
    summary = json.loads((live / "qlm" / "summary.json").read_text())
    summary["backend"] = "live"
    (live / "qlm" / "summary.json").write_text(json.dumps(summary))
    groups = group_runs(load_runs([results, live]))
    assert len(groups) == 1
    labels = sorted(r.label for r in groups[0].runs)
    assert labels == ["edf", "fcfs", "qlm (live)", "qlm (simulate)"]
    styles = {r.label: r.style for r in groups[0].runs}
    assert styles["qlm (live)"] != styles["qlm (simulate)"]
    written = plot_results([results, live], tmp_path / "out", formats=["png"], figures=["latency_cdf"])
    assert [p.name for p in written] == ["latency_cdf.png"]


def test_runs_at_several_rates_get_an_attainment_vs_rate_figure(tmp_path):
    for rate in (20.0, 80.0):
        write_runs(tmp_path / "runs" / f"rate-{rate:g}", policies=("fcfs", "qlm"), rate=rate)
    groups = group_runs(load_runs([tmp_path / "runs"]))
    assert [g.rate for g in groups] == [20.0, 80.0]
    written = plot_results([tmp_path / "runs"], tmp_path / "out", formats=["png"],
                           figures=["attainment_vs_rate", "slo_attainment"])
    names = sorted(p.name for p in written)
    # Several groups: per-group figures carry the scenario and rate; the sweep one the scenario.
    assert names == ["scenario-attainment_vs_rate.png", "scenario-r20-slo_attainment.png",
                     "scenario-r80-slo_attainment.png"]


def test_timeline_of_a_multi_model_run(tmp_path):
    out = write_runs(tmp_path / "mm", policies=("qlm",), models=("a", "b"))
    written = plot_results([out], tmp_path / "figs", formats=["png"], figures=["timeline"])
    assert [p.name for p in written] == ["timeline-qlm.png"]


def test_each_policy_keeps_one_distinct_colour():
    known = ["fcfs", "priority", "edf", "shepherd", "sjf-oracle", "qlm", "qlm-lp"]
    colours = [policy_color(p) for p in known]
    assert len(set(colours)) == len(known)
    assert policy_color("my-policy") == policy_color("my-policy")
    assert set(FIGURES) >= {"slo_attainment", "latency_cdf", "queue_depth", "throughput", "timeline"}
