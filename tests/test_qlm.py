"""qlm against the schedulers users already have: pulling by the prefill budget, the objectives, Moore-Hodgson
deferral, engine priority, the TPOT cap, admission control, and the estimator's predictions."""

from __future__ import annotations

import numpy as np
import pytest

from qlmctl.core.cluster import Dispatch, SwapModel
from qlmctl.core.frozen import FrozenCluster, FrozenInstance
from qlmctl.core.request import Request
from qlmctl.metrics import requests_frame
from qlmctl.policies import PolicyContext, make_policy
from qlmctl.runner import simulate
from qlmctl.scenario import REPO_ROOT, load_scenario
from qlmctl.workload import build_requests

SCEN = REPO_ROOT / "scenarios"
SHARED = REPO_ROOT.parent / "shared" / "traces" / "azure_llm_2023_conv.csv"
needs_trace = pytest.mark.skipif(not SHARED.exists(), reason="the Azure trace in ../shared/traces is not here")


def run(name: str, policies: list[str], rate: float, n: int, **scheduler) -> dict[str, dict]:
    over = {"workload": {"synthetic": {"rate_rps": rate, "num_requests": n}}}
    if scheduler:
        over["scheduler"] = scheduler
    sc = load_scenario(SCEN / f"{name}.yaml", over)
    reqs, _ = build_requests(sc)
    return {p: simulate(sc, p, reqs) for p in policies}


def by_class(run) -> dict[str, float]:
    return run.summary["slo_attainment_by_class"]


def test_prefill_bound_instance_keeps_the_queue_where_it_can_be_reordered():
    """One H200 under long prompts: fcfs and edf hand the engine everything (the queue forms inside it, first
    come first served); qlm pulls by the prefill budget and meets at least vLLM priority's interactive
    attainment, with far more requests on time overall."""
    runs = run("prefill_bound", ["fcfs", "edf", "priority", "qlm-basic", "qlm"], rate=35, n=1500)
    att = {p: r.summary["slo_attainment"] for p, r in runs.items()}
    assert by_class(runs["fcfs"])["interactive"] < 0.3 and by_class(runs["qlm-basic"])["interactive"] < 0.3
    assert by_class(runs["qlm"])["interactive"] >= by_class(runs["priority"])["interactive"] - 0.05
    assert att["qlm"] >= max(att["fcfs"], att["edf"], att["priority"]) + 0.10
    # The wait is in qlm's queue, not inside the engine: interactive requests reach their first token soon
    # after dispatch.
    frame = requests_frame(runs["qlm"].result.requests)
    inter = frame[(frame.slo_class == "interactive") & frame.slo_met]
    assert ((inter.first_token_s - inter.dispatch_s) < 1.0).mean() > 0.95


def test_strict_objective_never_gives_up_a_tighter_class():
    runs = run("prefill_bound", ["priority", "qlm"], rate=35, n=1500, objective="strict")
    pri, qlm = by_class(runs["priority"]), by_class(runs["qlm"])
    assert qlm["interactive"] >= pri["interactive"] - 0.005
    assert qlm["batch"] >= pri["batch"] - 0.005


def test_moore_hodgson_defers_the_costliest_requests_first():
    """Under overload, the requests qlm gives up (served late) have longer prompts than those it keeps."""
    qlm = run("prefill_bound", ["qlm"], rate=35, n=1500)["qlm"]
    f = requests_frame(qlm.result.requests)
    assert qlm.summary["policy_stats"]["deferred"] > 0
    met, missed = f[f.slo_met], f[~f.slo_met]
    assert missed.prompt_tokens.median() > 1.5 * met.prompt_tokens.median()


def test_weighted_objective_favours_the_heavier_class():
    plain = run("prefill_bound", ["qlm"], rate=35, n=1500)["qlm"]
    sc_over = {"workload": {"synthetic": {"rate_rps": 35, "num_requests": 1500}},
               "scheduler": {"objective": "weighted"}, "slo_classes": {"batch": {"ttft_s": 30, "weight": 10}}}
    sc = load_scenario(SCEN / "prefill_bound.yaml", sc_over)
    reqs, _ = build_requests(sc)
    weighted = simulate(sc, "qlm", reqs)
    assert by_class(weighted)["batch"] > by_class(plain)["batch"]


def test_dispatches_carry_the_plan_as_engine_priority_on_priority_engines():
    prof = load_scenario(SCEN / "prefill_bound.yaml").profile("llama-3.1-8b")
    ctx = PolicyContext(profiles={"llama-3.1-8b": prof})
    pol = make_policy("qlm", ctx)
    inst = FrozenInstance(0, "llama-3.1-8b", {"llama-3.1-8b": prof}, free_kv_blocks=prof.kv_blocks,
                          scheduling_policy="priority")
    cluster = FrozenCluster([inst], t=1.0)
    for i, slo in enumerate((30.0, 2.0, 10.0)):
        pol.add_request(Request(i, 1.0, "llama-3.1-8b", "c", slo, 100, 10), 1.0)
    out = [d for d in pol.schedule(cluster) if isinstance(d, Dispatch)]
    assert [d.request.ttft_slo_s for d in out] == [2.0, 10.0, 30.0]  # most urgent first
    assert [d.priority for d in out] == [round(d.request.deadline_s * 1000) for d in out]
    inst.scheduling_policy = "fcfs"
    pol.add_request(Request(9, 1.0, "llama-3.1-8b", "c", 5.0, 100, 10), 1.0)
    assert [d.priority for d in pol.schedule(cluster) if isinstance(d, Dispatch)] == [None]


def test_engine_priority_reaches_the_simulated_engine():
    """qlm on engines with vLLM's priority scheduling holds at least what it holds on fcfs engines."""
    fcfs = run("prefill_bound", ["qlm"], rate=35, n=1500)["qlm"]
    sc = load_scenario(SCEN / "prefill_bound.yaml", {
        "workload": {"synthetic": {"rate_rps": 35, "num_requests": 1500}},
        "cluster": {"instances": [{"count": 1, "gpu": "H200", "model": "llama-3.1-8b",
                                   "profile_overrides": {"max_num_seqs": 1024},
                                   "engine": {"scheduling_policy": "priority"}}]}})
    reqs, _ = build_requests(sc)
    prio = simulate(sc, "qlm", reqs)
    assert prio.summary["slo_attainment"] >= fcfs.summary["slo_attainment"] - 0.01


@needs_trace
def test_tpot_slo_is_kept_by_a_smaller_batch():
    sc = load_scenario(SCEN / "tpot.yaml", {"workload": {"synthetic": {"rate_rps": 70, "num_requests": 3000}}})
    reqs, _ = build_requests(sc)
    got = {p: by_class(simulate(sc, p, reqs))["interactive"] for p in ("fcfs", "priority", "qlm")}
    assert got["fcfs"] < 0.2 and got["priority"] < 0.2
    assert got["qlm"] > 0.8


def test_admission_control_rejects_predicted_misses_and_counts_them():
    runs = run("prefill_bound", ["qlm"], rate=35, n=1500, admission="reject")
    s = runs["qlm"].summary
    f = requests_frame(runs["qlm"].result.requests)
    assert s["rejected"] > 0 and s["rejected"] == int(f.rejected.sum())
    assert (f[f.rejected].error.str.startswith("rejected")).all()
    admitted = f[~f.rejected]
    assert admitted.slo_met.mean() > 0.95  # what it takes, it serves on time
    off = run("prefill_bound", ["qlm"], rate=35, n=1500)["qlm"].summary
    assert off["rejected"] == 0


def test_predictions_are_recorded_and_cover_about_their_percentile():
    # Overloaded: a queue forms (near saturation, at 22 req/s, the queue grows for the whole short run and
    # the calibration trails it: 0.78)
    qlm = run("prefill_bound", ["qlm"], rate=26, n=1500)["qlm"]
    f = requests_frame(qlm.result.requests)
    assert f.predicted_ttft_s.notna().mean() > 0.95
    s = qlm.summary
    assert s["estimator_samples"] > 1000
    assert 0.8 <= s["estimator_coverage"] <= 0.98
    # baselines make no predictions
    fcfs = run("prefill_bound", ["fcfs"], rate=22, n=300)["fcfs"].summary
    assert fcfs["estimator_coverage"] is None and fcfs["estimator_samples"] == 0


def test_predictions_cover_requests_that_wait_on_swaps():
    """W_B (four models on two instances, batch SLOs of 5 and 30 min) at 45 req/s: requests of a model that is
    not loaded, or that waits long while swaps come, start when their slack runs low, far beyond the plan's
    start; predicted between it and the deadline they are covered (as a factor on the plan's start: 0.70).
    Lengths from the bundled slice of the Azure trace, so that it runs without ../shared."""
    over = {"workload": {"synthetic": {"rate_rps": 45, "num_requests": 40_500,
                                       "lengths_from": str(REPO_ROOT / "traces" / "azure_conv_2023_first3000.csv")}}}
    sc = load_scenario(SCEN / "w_b.yaml", over)
    reqs, _ = build_requests(sc)
    qlm = simulate(sc, "qlm", reqs, copy_requests=False)
    assert 0.85 <= qlm.summary["estimator_coverage"] <= 0.95


def test_lag_is_measured_not_assumed():
    """The admission lag comes from what requests saw (dispatch to first token), so a saturated API-server
    model does not make every tight request look hopeless."""
    qlm = run("prefill_bound", ["qlm"], rate=16, n=600)["qlm"]
    pol_stats = qlm.summary["policy_stats"]
    assert pol_stats["demoted"] == 0
    assert np.isclose(qlm.summary["slo_attainment"], 1.0)


def _two_model_instance():
    sc = load_scenario(SCEN / "multi_model.yaml")
    profs = {m: sc.profile(m) for m in ("llama-3.1-8b", "llama-3.2-3b")}
    pol = make_policy("qlm", PolicyContext(profiles=profs))
    inst = FrozenInstance(0, "llama-3.1-8b", profs, free_kv_blocks=profs["llama-3.1-8b"].kv_blocks,
                          warm=set(profs))
    return pol, FrozenCluster([inst], t=1.0)


def _queue(pol, model: str, n: int, slo_s: float, first_id: int) -> None:
    for i in range(n):
        pol.add_request(Request(first_id + i, 1.0, model, "c", slo_s, 500, 100), 1.0)


def test_no_swap_that_saves_nothing_the_queue_could_not_wait_for():
    """A request of another model that can still be served after this model's queue does not take the
    instance away from it (the sleep and the wake are dead time)."""
    pol, cluster = _two_model_instance()
    _queue(pol, "llama-3.1-8b", 50, 60.0, 0)
    _queue(pol, "llama-3.2-3b", 1, 30.0, 100)
    out = pol.schedule(cluster)
    assert not any(isinstance(d, SwapModel) for d in out)
    assert {d.request.model for d in out if isinstance(d, Dispatch)} == {"llama-3.1-8b"}


def test_swap_when_the_other_model_cannot_wait_and_this_one_can():
    """Many tight requests of another model, a long queue of loose ones here: drain and swap."""
    pol, cluster = _two_model_instance()
    _queue(pol, "llama-3.1-8b", 400, 1800.0, 0)
    _queue(pol, "llama-3.2-3b", 50, 3.0, 1000)
    out = pol.schedule(cluster)
    assert [d.model for d in out if isinstance(d, SwapModel)] == ["llama-3.2-3b"]
    assert not any(isinstance(d, Dispatch) and d.request.model == "llama-3.1-8b" for d in out)


@needs_trace  # code_chat_batch resamples chat lengths from the Azure trace
def test_strict_late_requests_keep_their_class_precedence():
    """Under strict precedence a deferred code request (1 s SLO) goes after the on-time code requests but
    before chat's (10 s): behind them, as before, code fell below vLLM priority's attainment (96.4 % vs
    98.9 % here) while chat lost nothing."""
    runs = run("code_chat_batch", ["priority", "qlm-strict"], rate=60, n=3000)
    pri, strict = by_class(runs["priority"]), by_class(runs["qlm-strict"])
    assert all(strict[c] >= pri[c] - 0.005 for c in pri), (strict, pri)


def test_a_prediction_counts_the_queue_ahead_when_the_walk_reached_none_of_it():
    """Every queued request is due beyond the walk's horizon (a batch SLO of 30 min), so the walk predicts
    none of them; a new arrival of the same class still waits for all of them. (It was predicted the
    engine's own prefill, a few ms, behind 2000 queued requests.)"""
    prof = load_scenario(SCEN / "prefill_bound.yaml").profile("llama-3.1-8b")
    pol = make_policy("qlm", PolicyContext(profiles={"llama-3.1-8b": prof}))
    inst = FrozenInstance(0, "llama-3.1-8b", {"llama-3.1-8b": prof}, free_kv_blocks=0)
    for i in range(2000):
        pol.add_request(Request(i, 1.0, "llama-3.1-8b", "c", 1800.0, 500, 100), 1.0)
    pol.schedule(FrozenCluster([inst], t=1.0))  # the walk: nothing fits (no free KV), nothing within its horizon
    late = Request(5000, 1.5, "llama-3.1-8b", "c", 1800.0, 500, 100)
    pol.add_request(late, 1.5)
    rate = pol.est.rate(prof, "llama-3.1-8b")
    # At least the queue's decode work at full concurrency (its prefill comes on top).
    assert late.predicted_ttft_s > 2000 * 100 * rate.token_time_s / rate.concurrency


def test_multi_model_swaps_count_their_dead_time():
    """The bundled multi_model scenario as shipped (four models on two GPUs, 20 s interactive SLOs, swaps of
    4-22 s): a swap away from a model whose tight requests wait costs them the requests the sleep and the wake
    do not serve. Counting that, qlm is at or above vLLM priority's attainment; counting only the queued
    requests a swap makes late, it swapped 26 times where priority swapped 10 and fell a point behind (86.9 %
    against 87.9 %)."""
    sc = load_scenario(SCEN / "multi_model.yaml")
    reqs, _ = build_requests(sc)
    pri, qlm = (simulate(sc, p, reqs).summary for p in ("priority", "qlm"))
    assert qlm["slo_attainment"] >= pri["slo_attainment"], (qlm["slo_attainment"], pri["slo_attainment"])
    assert qlm["num_swaps"] < 20
