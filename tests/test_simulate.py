"""The simulated cluster under every policy: invariants, determinism, and QLM against FCFS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qlmctl.core.groups import group_key
from qlmctl.core.request import Request
from qlmctl.policies import policy_names
from qlmctl.runner import simulate
from qlmctl.scenario import load_scenario
from qlmctl.workload import build_requests
from tests.conftest import make_scenario

CORE_POLICIES = ["fcfs", "priority", "edf", "qlm"]


def mixed_requests(n: int, seed: int = 0, models=("m",), rate: float = 20.0) -> list[Request]:
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1 / rate, n))
    out = []
    for i in range(n):
        cls = "interactive" if rng.random() < 0.4 else "batch"
        out.append(Request(i, float(t[i]), str(rng.choice(models)), cls, 5.0 if cls == "interactive" else 120.0,
                           int(rng.integers(10, 400)), int(rng.integers(1, 120)),
                           priority=0 if cls == "interactive" else 1))
    return out


def check_invariants(scenario, run, requests):
    reqs = run.result.requests
    assert len(reqs) == len(requests)
    assert sorted(r.request_id for r in reqs) == [r.request_id for r in requests]
    for r in reqs:
        assert r.error is None, r.error
        assert r.finish_s is not None  # finished exactly once: the engine emits FINISHED once (engine tests)
        assert r.generated_tokens == r.output_tokens  # tokens conserved
        assert r.arrival_s <= r.dispatch_s <= r.first_token_s <= r.finish_s  # time never goes back
    for inst in run.result.instances:
        assert inst["peak_kv_blocks"] <= scenario.profile("m").kv_blocks
    assert run.summary["completed"] == len(requests)


@pytest.mark.parametrize("policy", CORE_POLICIES)
def test_every_request_finishes_once_with_its_tokens(policy):
    sc = make_scenario(instances=2, kv_blocks=120, max_num_seqs=8)
    reqs = mixed_requests(300)
    run = simulate(sc, policy, reqs)
    check_invariants(sc, run, reqs)
    assert reqs[0].finish_s is None  # the caller's requests are untouched (fresh copies per policy)


def test_a_run_without_copies_fills_in_the_callers_requests_and_refuses_them_twice():
    sc = make_scenario(instances=2, kv_blocks=120, max_num_seqs=8)
    copied = simulate(sc, "qlm", mixed_requests(200, seed=4))
    reqs = mixed_requests(200, seed=4)
    run = simulate(sc, "qlm", reqs, copy_requests=False)
    rec = lambda rs: sorted((r.request_id, r.dispatch_s, r.first_token_s, r.finish_s, r.instance_id) for r in rs)
    assert rec(run.result.requests) == rec(copied.result.requests)  # the same run, copies or not
    assert rec(reqs) == rec(copied.result.requests)  # on the caller's own objects
    with pytest.raises(ValueError, match="not been run"):
        simulate(sc, "fcfs", reqs, copy_requests=False)


@pytest.mark.parametrize("policy", CORE_POLICIES)
def test_same_seed_same_results(policy):
    sc = make_scenario(instances=2, kv_blocks=120, max_num_seqs=8)
    a = simulate(sc, policy, mixed_requests(200, seed=3))
    b = simulate(sc, policy, mixed_requests(200, seed=3))
    rec = lambda run: [(r.request_id, r.dispatch_s, r.first_token_s, r.finish_s, r.instance_id) for r in run.result.requests]
    assert rec(a) == rec(b)
    strip = lambda s: {k: v for k, v in s.items() if k not in ("sim_wall_s",)}
    assert strip(a.summary) == strip(b.summary)


def test_fcfs_dispatches_in_arrival_order():
    sc = make_scenario(instances=2, kv_blocks=400, max_num_seqs=4)
    run = simulate(sc, "fcfs", mixed_requests(200))
    by_dispatch = sorted(run.result.requests, key=lambda r: (r.dispatch_s, r.request_id))
    assert [r.request_id for r in by_dispatch] == sorted(r.request_id for r in by_dispatch)


def test_qlm_keeps_fcfs_inside_a_group():
    sc = make_scenario(instances=2, kv_blocks=400, max_num_seqs=4)
    run = simulate(sc, "qlm", mixed_requests(300, rate=40))
    groups: dict = {}
    for r in run.result.requests:
        if r.num_evictions == 0 and (r.first_token_s - r.arrival_s) <= r.ttft_slo_s + 60:
            groups.setdefault(group_key(r, sc.spec.scheduler.slo_bucket_s), []).append(r)
    for members in groups.values():
        on_time = [r for r in members if r.dispatch_s <= r.deadline_s]  # demoted requests leave the group
        order = sorted(on_time, key=lambda r: (r.dispatch_s, r.request_id))
        assert [r.arrival_s for r in order] == sorted(r.arrival_s for r in order)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 120), seed=st.integers(0, 10_000), policy=st.sampled_from(CORE_POLICIES),
       kv=st.integers(60, 300), seqs=st.integers(1, 12), instances=st.integers(1, 3))
def test_invariants_hold_for_random_workloads(n, seed, policy, kv, seqs, instances):
    sc = make_scenario(instances=instances, kv_blocks=kv, max_num_seqs=seqs)
    reqs = [r for r in mixed_requests(n, seed=seed, rate=30.0)
            if sc.profile("m").blocks_for(r.prompt_tokens + r.output_tokens + 1) <= kv]
    run = simulate(sc, policy, reqs)
    check_invariants(sc, run, reqs)


def test_multi_model_swaps_serve_every_model():
    sc = make_scenario(instances=1, models=("a", "b"), kv_blocks=400)
    reqs = mixed_requests(120, models=("a", "b"), rate=5)
    for policy in CORE_POLICIES:
        run = simulate(sc, policy, reqs)
        assert all(r.finish_s is not None for r in run.result.requests), policy
        assert run.result.num_swaps >= 1


def test_overlong_request_fails_with_a_reason_not_dropped():
    sc = make_scenario(instances=1)
    reqs = mixed_requests(5)
    reqs[2].prompt_tokens = 5000  # max_model_len is 4096
    run = simulate(sc, "qlm", reqs)
    bad = run.result.requests[2]
    assert bad.error and "max_model_len" in bad.error
    assert run.summary["failed"] == 1 and run.summary["completed"] == 4


def test_qlm_beats_fcfs_on_the_bundled_default():
    sc = load_scenario()
    requests, _ = build_requests(sc)
    att = {p: simulate(sc, p, requests).summary for p in ("fcfs", "qlm")}
    assert att["qlm"]["slo_attainment"] > att["fcfs"]["slo_attainment"] + 0.03
    assert att["qlm"]["slo_attainment_by_class"]["interactive"] > att["fcfs"]["slo_attainment_by_class"]["interactive"]


def test_all_registered_policies_run():
    sc = make_scenario(instances=2, kv_blocks=200, max_num_seqs=8)
    reqs = mixed_requests(80)
    for p in policy_names():
        run = simulate(sc, p, reqs)
        assert run.summary["completed"] == 80, p
        json.dumps(run.summary)


@pytest.mark.parametrize("policy", ["qlm", "qlm-lp"])
def test_a_group_that_empties_and_refills_is_still_served(policy):
    """The public prototype lost requests that arrived at a group after it had emptied."""
    if policy not in policy_names():
        pytest.skip(f"{policy} not available")
    sc = make_scenario(instances=2, kv_blocks=400, max_num_seqs=8)
    bursts = [(0.0, 10), (50.0, 10), (200.0, 10)]  # the group drains between bursts
    reqs, i = [], 0
    for start, n in bursts:
        for k in range(n):
            reqs.append(Request(i, start + 0.01 * k, "m", "interactive", 5.0, 50, 20))
            i += 1
    run = simulate(sc, policy, reqs)
    assert all(r.finish_s is not None for r in run.result.requests)
    assert run.summary["slo_attainment"] == 1.0


def test_api_server_queue_delays_first_tokens_under_load_only():
    """With the frontend queue model on, TTFT grows with load (streams and arrivals); TPOT does not."""
    def run(rate: float, factor: float):
        over = {"frontend_cpu_per_request_s": 0.004, "frontend_cpu_per_token_s": 1e-4, "frontend_queue_factor": factor}
        sc = make_scenario(instances=1, max_num_seqs=64, kv_blocks=4000,
                           workload={"synthetic": {"rate_rps": rate, "num_requests": 200, "prompt_tokens": 200,
                                                   "output_tokens": 100},
                                     "slo_class": {"constant": "batch"}},
                           cluster={"instances": [{"model": "m", "profile_overrides": over}]})
        reqs, _ = build_requests(sc)
        return simulate(sc, "fcfs", reqs).summary

    light_off, light_on = run(2.0, 0.0), run(2.0, 2.0)
    busy_off, busy_on = run(20.0, 0.0), run(20.0, 2.0)
    light_gap = light_on["mean_ttft_ms"] - light_off["mean_ttft_ms"]
    busy_gap = busy_on["mean_ttft_ms"] - busy_off["mean_ttft_ms"]
    assert 0 < light_gap < busy_gap
    assert busy_on["completed"] == 200
    assert busy_on["mean_tpot_ms"] == pytest.approx(busy_off["mean_tpot_ms"], rel=0.1)


def test_qlm_demoting_while_the_queue_runs_dry_in_overload():
    """Overload on one instance (the fidelity scenario at 32 req/s, a step model fitted on an H200): qlm's
    work-conserving pass demotes hopeless heads into a new late group while it scans the groups, which
    once broke the scan. Every request must still be served exactly once."""
    fitted = dict(base_s=0.0048565, per_prefill_token_s=2.189e-05, per_decode_seq_s=1.443e-05,
                  per_context_token_s=3.017e-08, per_prefill_pair_s=1.248e-09, per_prefill_step_s=0.001587,
                  knee_tokens=176)
    over = {"workload": {"target_rate_rps": 32, "max_requests": 960}}
    path = Path(__file__).resolve().parents[1] / "scenarios" / "fidelity_h200.yaml"
    base = load_scenario(path, over)
    insts = [dict(i.model_dump(), profile_overrides={**i.profile_overrides, **fitted}) for i in base.spec.cluster.instances]
    sc = load_scenario(path, {**over, "cluster": {"instances": insts}})
    reqs, _ = build_requests(sc)
    run = simulate(sc, "qlm", reqs)
    assert run.result.policy_stats["demoted"] > 0
    assert all(r.finish_s is not None and r.error is None for r in run.result.requests)
    assert len({r.request_id for r in run.result.requests}) == 960


def test_summary_reports_each_instances_peaks_and_preemptions():
    sc = make_scenario(instances=2, kv_blocks=120, max_num_seqs=8)
    run = simulate(sc, "fcfs", mixed_requests(300))
    s = run.summary
    assert set(s["instances"]) == {"0", "1"}
    for inst in run.result.instances:
        mine = s["instances"][str(inst["instance_id"])]
        assert mine == {"peak_running": inst["peak_running"], "peak_kv_usage": inst["peak_kv_blocks"] / 120,
                        "preemptions": inst["preemptions"], "prefix_cache_hit_rate": 0.0}
        assert 0 < mine["peak_running"] <= 8 and 0 < mine["peak_kv_usage"] <= 1.0
    assert s["peak_running"] == max(v["peak_running"] for v in s["instances"].values())
    assert s["peak_kv_usage"] == max(v["peak_kv_usage"] for v in s["instances"].values())
    assert sum(v["preemptions"] for v in s["instances"].values()) == s["num_preemptions"]


@pytest.mark.parametrize("discipline", ["fcfs", "priority"])
def test_direct_sends_every_request_to_an_engine_on_arrival(discipline):
    sc = make_scenario(instances=2, kv_blocks=120, max_num_seqs=8)
    sc = load_scenario_like(sc, discipline)
    reqs = mixed_requests(300, rate=40.0)
    run = simulate(sc, "direct", reqs)
    check_invariants(sc, run, reqs)
    assert all(r.dispatch_s == r.arrival_s for r in run.result.requests)
    assert max(i["peak_running"] for i in run.result.instances) == 8  # the engines' queues did the waiting


def load_scenario_like(sc, discipline: str):
    """`sc` with its engines' --scheduling-policy set to `discipline`."""
    from qlmctl.scenario import Scenario, ScenarioSpec

    data = sc.spec.model_dump()
    for inst in data["cluster"]["instances"]:
        inst["engine"] = {**(inst.get("engine") or {}), "scheduling_policy": discipline}
    return Scenario(ScenarioSpec.model_validate(data), sc.path)


@pytest.mark.parametrize("first_load", ["warm", "cold"])
def test_a_swap_puts_the_loaded_model_to_sleep_then_wakes_the_next(first_load):
    """As vLLM's sleep mode does it (and `serve --launch` starts every engine asleep): a swap costs the
    outgoing model's sleep_s plus the incoming one's load_warm_s; with first_load cold, its first load is
    load_cold_s instead."""
    sc = make_scenario(instances=1, models=("a", "b"), kv_blocks=400)
    data = sc.spec.model_dump()
    for m, sleep in (("a", 3.0), ("b", 2.0)):
        data["models"][m]["profile"]["sleep_s"] = sleep
    data["cluster"]["first_load"] = first_load
    from qlmctl.scenario import Scenario, ScenarioSpec

    sc = Scenario(ScenarioSpec.model_validate(data), sc.path)
    reqs = [Request(0, 0.0, "a", "interactive", 30.0, 50, 5), Request(1, 1.0, "b", "interactive", 60.0, 50, 5),
            Request(2, 30.0, "a", "interactive", 60.0, 50, 5)]
    run = simulate(sc, "fcfs", reqs)
    swaps = [(model, dur) for _, kind, _, model, _, dur in run.result.timeline if kind == "swap"]
    p = sc.profile("b")
    first_b = p.load_warm_s if first_load == "warm" else p.load_cold_s
    assert swaps == [("b", 3.0 + first_b), ("a", 2.0 + sc.profile("a").load_warm_s)]
    assert all(r.finish_s is not None for r in run.result.requests)


def test_shared_system_prompts_hit_the_prefix_cache_unless_it_is_off():
    workload = {"synthetic": {"rate_rps": 20, "num_requests": 400, "prompt_tokens": 1500, "output_tokens": 20},
                "shared_prefix": {"tokens": 1024, "fraction": 0.8, "variants": 2}, "slo_class": {"constant": "batch"}}
    runs = {}
    for caching in (True, False):
        sc = make_scenario(instances=1, kv_blocks=4000, max_num_seqs=16, workload=workload)
        data = sc.spec.model_dump()
        data["models"]["m"]["profile"]["max_num_batched_tokens"] = 2048
        data["cluster"]["instances"][0]["engine"] = {"enable_prefix_caching": caching}
        from qlmctl.scenario import Scenario, ScenarioSpec

        sc = Scenario(ScenarioSpec.model_validate(data), sc.path)
        reqs, report = build_requests(sc)
        assert 0.7 * 400 < sum(r.prefix is not None for r in reqs) < 0.9 * 400
        runs[caching] = simulate(sc, "fcfs", reqs).summary
    hit = runs[True]["instances"]["0"]["prefix_cache_hit_rate"]
    assert 0.4 < hit < 1024 / 1500 and runs[False]["instances"]["0"]["prefix_cache_hit_rate"] is None
    assert runs[True]["p50_ttft_ms"] < runs[False]["p50_ttft_ms"]


def test_the_gateways_usage_in_every_chunk_loads_the_api_server_behind_a_gateway_policy_only():
    """`frontend_usage_cpu_per_token_s` (what vLLM's continuous usage stats cost its API server a token) is
    charged when the simulated requests come through the gateway and it counts tokens by usage: a gateway
    policy's TTFT under load rises with it; `direct` (a client straight to vLLM) and a gateway that counts
    chunks (`live.token_count: chunks`) run as without it."""
    def run(policy: str, usage_s: float, token_count: str | None = None):
        over = {"frontend_cpu_per_request_s": 0.004, "frontend_cpu_per_token_s": 1e-4, "frontend_queue_factor": 2.0,
                "frontend_usage_cpu_per_token_s": usage_s}
        kw: dict = dict(instances=1, max_num_seqs=64, kv_blocks=4000,
                        workload={"synthetic": {"rate_rps": 20.0, "num_requests": 200, "prompt_tokens": 200,
                                                "output_tokens": 100},
                                  "slo_class": {"constant": "batch"}},
                        cluster={"instances": [{"model": "m", "profile_overrides": over}]})
        if token_count is not None:
            name = make_scenario(**kw).instance_specs()[0][0]
            kw["live"] = {"engines": [{"instance": name, "model": "m", "url": "http://127.0.0.1:9"}],
                          "token_count": token_count}
        sc = make_scenario(**kw)
        reqs, _ = build_requests(sc)
        return simulate(sc, policy, reqs).summary

    assert run("fcfs", 2e-4)["mean_ttft_ms"] > run("fcfs", 0.0)["mean_ttft_ms"] * 1.1
    assert run("fcfs", 5e-5, "usage")["mean_ttft_ms"] == run("fcfs", 5e-5)["mean_ttft_ms"]
    assert run("fcfs", 5e-5, "chunks")["mean_ttft_ms"] == run("fcfs", 0.0, "chunks")["mean_ttft_ms"]
    assert run("direct", 5e-5)["mean_ttft_ms"] == run("direct", 0.0)["mean_ttft_ms"]
    assert run("direct", 0.0)["mean_ttft_ms"] == run("fcfs", 0.0)["mean_ttft_ms"]
