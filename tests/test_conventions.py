"""vllm bench serve's conventions (run keys, options, result files), safe result folders, and the install's
small commands (issue 17)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from qlmctl.cli import app
from qlmctl.errors import UserError
from qlmctl.plots import _bin_width, _class_colors, group_runs, load_runs, plot_results
from qlmctl.scenario import REPO_ROOT, load_scenario
from qlmctl.vllm_bench import read_result_file
from qlmctl.workload import build_requests

runner = CliRunner()
DEFAULT = REPO_ROOT / "scenarios" / "default.yaml"


def _sim(tmp_path: Path, *args: str) -> dict:
    res = runner.invoke(app, ["simulate", "-p", "fcfs", "-o", str(tmp_path), *args])
    assert res.exit_code == 0, res.output
    return json.loads((tmp_path / "fcfs" / "summary.json").read_text())


def test_summary_has_vllms_run_keys_beside_ours(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["pytest"])  # the command must come from the CLI, not the host's argv
    s = _sim(tmp_path, "-n", "300", "--request-rate", "40", "--metric-percentiles", "25,99.9",
             "--metadata", "gpu=H200 tp=1", "--goodput", "ttft:2000", "--goodput", "tpot:100")
    for key in ("date", "backend", "label", "model_id", "tokenizer_id", "num_prompts", "request_rate", "burstiness",
                "max_concurrency", "duration", "completed", "total_input_tokens", "total_output_tokens",
                "request_throughput", "request_goodput", "output_throughput", "total_token_throughput",
                "mean_ttft_ms", "median_ttft_ms", "std_ttft_ms", "p99_ttft_ms"):
        assert key in s, key
    assert s["num_prompts"] == 300 and s["request_rate"] == 40 and s["model_id"] == "llama-3.1-8b"
    assert s["label"] == "fcfs" and s["burstiness"] is None  # a trace keeps its own arrival pattern
    assert s["p25_ttft_ms"] <= s["p50_ttft_ms"] <= s["p99.9_ttft_ms"] and "p25_e2el_ms" in s
    assert s["gpu"] == "H200" and s["tp"] == "1"  # --metadata: top-level keys, as vLLM writes them
    assert s["goodput_config"] == {"ttft": 2000.0, "tpot": 100.0} and s["slo_goodput"] is not None
    assert s["command"].startswith("qlmctl simulate -p fcfs -o ") and len(s["workload_id"]) == 12 and s["offered_rate_rps"] > 0
    assert len(s["date"]) == 15  # vLLM's %Y%m%d-%H%M%S


def test_request_rate_inf_and_burstiness_map_onto_the_workload():
    sc = load_scenario(DEFAULT, {"workload": {"target_rate_rps": float("inf"), "max_requests": 50}})
    reqs, _ = build_requests(sc)
    assert {r.arrival_s for r in reqs} == {0.0}
    smooth = load_scenario(DEFAULT, {"workload": {"target_rate_rps": 20, "max_requests": 2000, "burstiness": 50}})
    bursty = load_scenario(DEFAULT, {"workload": {"target_rate_rps": 20, "max_requests": 2000, "burstiness": 0.25}})
    cvs = []
    for sc in (smooth, bursty):
        reqs, report = build_requests(sc)
        gaps = np.diff([r.arrival_s for r in reqs])
        assert report.mean_rate_rps == pytest.approx(20, rel=0.1)
        cvs.append(gaps.std() / gaps.mean())
    # Gamma gaps of shape B have a coefficient of variation 1/sqrt(B).
    assert cvs[0] == pytest.approx(1 / np.sqrt(50), rel=0.2) and cvs[1] == pytest.approx(2.0, rel=0.2)


def test_duration_repeats_a_trace_to_fill_it():
    sc = load_scenario(DEFAULT, {"workload": {"target_rate_rps": 50, "duration_s": 300}})
    reqs, report = build_requests(sc)
    assert len(reqs) == pytest.approx(50 * 300, rel=0.02) and reqs[-1].arrival_s < 300
    assert any("repeated" in n for n in report.notes)


@pytest.mark.parametrize("rate", ["0", "-3", "nan", "fast"])
def test_a_bad_rate_is_blamed_on_the_option_not_the_scenario(rate):
    res = runner.invoke(app, ["simulate", "--rate", rate])
    assert res.exit_code == 2 and "--request-rate" in res.output and "default.yaml" not in res.output


def test_runs_get_folders_of_their_own_and_out_refuses_to_overwrite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        res = runner.invoke(app, ["simulate", "-p", "fcfs", "-n", "100"])
        assert res.exit_code == 0, res.output
    runs = sorted(p for p in (tmp_path / "results" / "default").iterdir() if not p.is_symlink())
    assert len(runs) == 2 and all((p / "fcfs" / "summary.json").exists() for p in runs)
    assert (tmp_path / "results" / "default" / "latest").resolve() == runs[-1].resolve()
    out = tmp_path / "mine"
    assert runner.invoke(app, ["simulate", "-p", "fcfs", "-n", "100", "-o", str(out)]).exit_code == 0
    res = runner.invoke(app, ["simulate", "-p", "fcfs,edf", "-n", "100", "-o", str(out)])
    assert res.exit_code == 2 and "already holds results of fcfs" in res.output and "--force" in res.output
    assert not (out / "edf").exists()
    res = runner.invoke(app, ["simulate", "-p", "fcfs,edf", "-n", "120", "-o", str(out), "--force"])
    assert res.exit_code == 0 and json.loads((out / "fcfs" / "summary.json").read_text())["num_requests"] == 120


def test_evaluate_writes_outside_the_repository_by_default(tmp_path, monkeypatch):
    from tests.test_evaluation import TINY
    from tests.conftest import small_profile

    p = small_profile(max_num_seqs=4, kv_blocks=150)
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(yaml.safe_dump(dict(TINY, models={"m": {"profile": {
        f: getattr(p, f) for f in p.__dataclass_fields__ if f != "model"}}})))
    monkeypatch.chdir(tmp_path)
    docs = (REPO_ROOT / "docs" / "evaluation.md").read_text()
    res = runner.invoke(app, ["evaluate", "-s", str(tiny), "-p", "fcfs", "--rates", "5", "-j", "1", "--no-figures"])
    assert res.exit_code == 0, res.output
    (folder,) = (tmp_path / "results").glob("evaluate-*")
    assert (folder / "evaluation.md").exists() and list((folder / "runs").rglob("summary.json"))
    assert (REPO_ROOT / "docs" / "evaluation.md").read_text() == docs


def _vllm_result(n: int = 100, rate: float = 40.0) -> dict:
    """A result as `vllm bench serve --save-result --save-detailed` writes it (its keys, its units)."""
    rng = np.random.default_rng(0)
    ttfts = rng.uniform(0.05, 0.4, n).tolist()
    itls = [[0.02] * 9 for _ in range(n)]
    return {
        "date": "20261201-101010", "endpoint_type": "openai", "backend": "openai", "label": None,
        "model_id": "meta-llama/Llama-3.1-8B-Instruct", "tokenizer_id": "meta-llama/Llama-3.1-8B-Instruct",
        "num_prompts": n, "request_rate": rate, "burstiness": 1.0, "max_concurrency": None,
        "duration": 3.0, "completed": n, "failed": 0, "total_input_tokens": 100 * n, "total_output_tokens": 10 * n,
        "request_throughput": n / 3.0, "request_goodput": None, "output_throughput": 10 * n / 3.0,
        "total_token_throughput": 110 * n / 3.0, "input_lens": [100] * n, "output_lens": [10] * n, "ttfts": ttfts,
        "itls": itls, "latencies": [t + 0.18 for t in ttfts], "start_times": [i / rate for i in range(n)],
        "generated_texts": [""] * n, "errors": [""] * n,
        "mean_ttft_ms": 200.0, "median_ttft_ms": 200.0, "std_ttft_ms": 50.0, "p99_ttft_ms": 390.0,
        "mean_tpot_ms": 20.0, "median_tpot_ms": 20.0, "std_tpot_ms": 0.0, "p99_tpot_ms": 20.0,
        "mean_itl_ms": 20.0, "median_itl_ms": 20.0, "std_itl_ms": 0.0, "p99_itl_ms": 20.0,
    }


def test_plot_and_compare_lay_a_vllm_result_beside_a_simulation(tmp_path):
    sim = tmp_path / "sim"
    _sim(sim, "-n", "100", "--request-rate", "40")
    vfile = tmp_path / "openai-40.0qps-Llama-3.1-8B-Instruct-20261201-101010.json"
    vfile.write_text(json.dumps(_vllm_result()))
    (result,) = read_result_file(vfile)
    assert result["num_prompts"] == 100
    groups = group_runs(load_runs([sim, vfile]))
    assert len(groups) == 1 and len(groups[0].runs) == 2  # same rate and request count: one workload
    written = plot_results([sim, vfile], tmp_path / "figs", formats=["png"],
                           figures=["latency_cdf", "throughput", "slo_attainment"])
    assert sorted(p.name for p in written) == ["latency_cdf.png", "slo_attainment.png", "throughput.png"]
    res = runner.invoke(app, ["compare", str(sim), str(vfile)])
    assert res.exit_code == 0, res.output
    assert "vllm:openai" in res.output and "fcfs" in res.output and "TTFT p99" in res.output
    # --append-result files hold one result per line.
    appended = tmp_path / "appended.json"
    appended.write_text(json.dumps(_vllm_result()) + "\n" + json.dumps(_vllm_result(rate=80)))
    assert [r["request_rate"] for r in read_result_file(appended)] == [40, 80]
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(UserError, match="not a vllm bench serve result"):
        read_result_file(bad)


def test_save_result_writes_a_file_vllm_tools_and_plot_read(tmp_path):
    _sim(tmp_path / "run", "-n", "80", "--request-rate", "40", "--save-result", "--save-detailed", "--result-dir",
         str(tmp_path / "vr"))
    (path,) = list((tmp_path / "vr").iterdir())
    assert path.name.startswith("fcfs-40.0qps-llama-3.1-8b-")
    data = json.loads(path.read_text())
    assert len(data["ttfts"]) == len(data["itls"]) == len(data["input_lens"]) == 80 and data["errors"][0] == ""
    assert data["endpoint_type"] == "simulate" and data["num_prompts"] == 80
    (run,) = load_runs([path])
    assert run.policy == "fcfs" and len(run.requests) == 80


def test_plot_draws_runs_of_different_rates_apart_unless_mixed(tmp_path):
    for rate in ("40", "80"):
        _sim(tmp_path / rate, "-n", "100", "--request-rate", rate)
    notes: list[str] = []
    written = plot_results([tmp_path / "40", tmp_path / "80"], tmp_path / "apart", formats=["png"],
                           figures=["slo_attainment"], notes=notes)
    assert len(written) == 2 and any("drawn apart" in n for n in notes)
    notes = []
    written = plot_results([tmp_path / "40", tmp_path / "80"], tmp_path / "mixed", formats=["png"],
                           figures=["slo_attainment"], mixed=True, notes=notes)
    assert len(written) == 1 and any("--mixed" in n for n in notes)
    # Same scenario and rate but other requests (another seed): apart too, told by their workload digests.
    _sim(tmp_path / "seed", "-n", "100", "--request-rate", "40", "--seed", "7")
    groups = group_runs(load_runs([tmp_path / "40", tmp_path / "seed"]))
    assert len(groups) == 2 and groups[0].tag and groups[0].tag != groups[1].tag


def test_class_colours_follow_the_name_and_throughput_bins_hold_enough():
    assert _class_colors(["batch"])["batch"] == _class_colors(["interactive", "batch"])["batch"]
    assert len(set(_class_colors(["a", "b", "c", "d"]).values())) == 4
    # 100 s with 300 completions: 1 s bins would hold 3 each; bins hold about 30 at least.
    assert _bin_width(100.0, 300) >= 10
    assert _bin_width(3600.0, 10**6) == 60  # plenty of events: about 60 bins


def test_version_schema_and_completion():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.startswith("qlmctl ")
    assert res.output.rstrip().endswith(("(pure build)", "(compiled build)"))
    res = runner.invoke(app, ["schema"])
    schema = json.loads(res.output)
    assert schema["title"] == "qlmctl scenario file" and "cluster" in schema["properties"]
    assert "EngineFlagsSpec" in schema["$defs"] and "max_num_seqs" in schema["$defs"]["EngineFlagsSpec"]["properties"]
    assert "duration_s" in json.loads(runner.invoke(app, ["schema", "sweep"]).output)["properties"]
    assert runner.invoke(app, ["schema", "nope"]).exit_code == 2
    assert "--install-completion" in runner.invoke(app, ["--help"]).output


def test_split_fractions_must_sum_to_one():
    with pytest.raises(UserError, match="split fractions sum to 1.2"):
        load_scenario(DEFAULT, {"workload": {"slo_class": {"split": {"interactive": 0.5, "batch-1": 0.3,
                                                                     "batch-2": 0.4}}}})
    load_scenario(DEFAULT, {"workload": {"slo_class": {"split": {"interactive": 1, "batch-1": 3, "batch-2": 2}}}})
