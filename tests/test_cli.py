"""The CLI as a user runs it: the bundled default, outputs, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from qlmctl.cli import app

runner = CliRunner()


def test_simulate_default_writes_results(tmp_path: Path):
    res = runner.invoke(app, ["simulate", "-n", "400", "--policy", "fcfs,qlm", "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "SLO attainment" in res.output and "fcfs" in res.output and "qlm" in res.output
    for pol in ("fcfs", "qlm"):
        folder = tmp_path / pol
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["num_requests"] == 400 and summary["policy"] == pol
        assert 0.0 <= summary["slo_attainment"] <= 1.0
        assert (folder / "scenario.yaml").exists()
        assert (folder / "requests.parquet").exists() or (folder / "requests.csv").exists()


def test_simulate_says_which_build_ran_and_when_a_compiled_one_would_help(tmp_path: Path, monkeypatch):
    import qlmctl.commands.simulate as cmd

    monkeypatch.setattr(cmd, "PURE_NOTE_REQUESTS", 300)  # (100,000 in earnest: a long run)
    res = runner.invoke(app, ["simulate", "-n", "300", "--policy", "fcfs", "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    build = json.loads((tmp_path / "fcfs" / "summary.json").read_text())["sim_build"]
    said = " ".join(res.output.split())  # as printed, less where the console wrapped it (long tmp paths)
    assert build in ("pure", "compiled") and f"{build} build)" in said
    assert ("a regular install, pip install ., compiles it" in said) == (build == "pure")
    res = runner.invoke(app, ["simulate", "-n", "299", "--policy", "fcfs", "-o", str(tmp_path), "--force"])
    assert res.exit_code == 0 and "compiles it" not in res.output


def test_simulate_a_trace_argument(tmp_path: Path):
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,model,slo_class,prompt_tokens,output_tokens\n"
                     + "".join(f"{i * 0.1},llama-3.1-8b,interactive,100,20\n" for i in range(30)))
    res = runner.invoke(app, ["simulate", str(trace), "--policy", "edf", "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    s = json.loads((tmp_path / "out" / "edf" / "summary.json").read_text())
    assert s["completed"] == 30


def test_bad_trace_row_names_file_line_and_field(tmp_path: Path):
    trace = tmp_path / "bad.csv"
    trace.write_text("arrival_s,model,slo_class,prompt_tokens,output_tokens\n0.0,llama-3.1-8b,interactive,10,5\n"
                     "0.5,llama-3.1-8b,interactive,ten,5\n")
    res = runner.invoke(app, ["simulate", str(trace)])
    assert res.exit_code == 2
    assert "bad.csv:3" in res.output and "prompt_tokens" in res.output
    assert "Traceback" not in res.output


def test_bad_scenario_field_names_file_and_field(tmp_path: Path):
    sc = tmp_path / "s.yaml"
    sc.write_text((Path(__file__).parents[1] / "scenarios" / "default.yaml").read_text()
                  .replace("ttft_s: 20", "ttft_s: -3"))
    res = runner.invoke(app, ["simulate", "-s", str(sc)])
    assert res.exit_code == 2
    assert "s.yaml" in res.output and "slo_classes.interactive.ttft_s" in res.output
    assert "Traceback" not in res.output


def test_unknown_policy_lists_the_choices():
    res = runner.invoke(app, ["simulate", "--policy", "fcfs,nope"])
    assert res.exit_code == 2 and "nope" in res.output and "qlm" in res.output


def test_missing_trace_file():
    res = runner.invoke(app, ["simulate", "/nonexistent/trace.csv"])
    assert res.exit_code == 2 and "trace.csv" in res.output
