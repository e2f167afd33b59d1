"""The SHEPHERD-like and SJF-oracle baselines: their orderings, preemption, planning, and invariants."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qlmctl.core.request import Request
from qlmctl.policies import policy_class, policy_doc, policy_names
from qlmctl.policies.shepherd import ShepherdPolicy
from qlmctl.policies.sjf import SJFOraclePolicy
from qlmctl.runner import simulate
from qlmctl.scenario import Scenario, ScenarioSpec
from tests.conftest import small_profile


def scenario(instances: int = 1, models: tuple[str, ...] = ("m",), max_num_seqs: int = 4, kv_blocks: int = 4000,
             mean_output_tokens: float = 256.0, **scheduler) -> Scenario:
    p = small_profile(max_num_seqs=max_num_seqs, kv_blocks=kv_blocks, mean_output_tokens=mean_output_tokens)
    prof = {f: getattr(p, f) for f in p.__dataclass_fields__ if f != "model"}
    spec = {
        "models": {m: {"profile": prof} for m in models},
        "cluster": {"instances": [{"model": models[i % len(models)]} for i in range(instances)]},
        "slo_classes": {"interactive": {"ttft_s": 5}, "batch": {"ttft_s": 3600}},
        "workload": {"synthetic": {"rate_rps": 1, "num_requests": 2, "prompt_tokens": 10, "output_tokens": 10}},
        "scheduler": scheduler,
    }
    return Scenario(ScenarioSpec.model_validate(spec))


def req(i: int, t: float, out: int, slo: float = 3600.0, model: str = "m", prompt: int = 50) -> Request:
    cls = "interactive" if slo < 100 else "batch"
    return Request(i, t, model, cls, slo, prompt, out, priority=0 if cls == "interactive" else 1)


def dispatch_order(run) -> list[int]:
    done = sorted(run.result.requests, key=lambda r: (r.dispatch_s, r.request_id))
    return [r.request_id for r in done]


def test_both_are_registered_and_the_oracle_says_so():
    names = policy_names()
    assert "shepherd" in names and "sjf-oracle" in names
    assert policy_class("sjf-oracle") is SJFOraclePolicy
    assert "oracle" in policy_doc(SJFOraclePolicy).lower()
    assert "oracle" in SJFOraclePolicy.label


def test_sjf_serves_shortest_known_output_first():
    sc = scenario(max_num_seqs=1)
    outs = [40, 5, 30, 5, 1, 80]
    reqs = [req(i, 0.0, o) for i, o in enumerate(outs)]
    run = simulate(sc, "sjf-oracle", reqs)
    order = dispatch_order(run)
    # Shortest first; equal lengths in arrival (id) order.
    assert order == sorted(range(len(outs)), key=lambda i: (outs[i], i))


def test_shepherd_serves_feasible_requests_earliest_deadline_first():
    sc = scenario(max_num_seqs=1)
    slos = [3000.0, 50.0, 900.0, 20.0]
    reqs = [req(i, 0.0, 3, slo=s) for i, s in enumerate(slos)]
    run = simulate(sc, "shepherd", reqs)
    assert dispatch_order(run) == sorted(range(len(slos)), key=lambda i: slos[i])


def test_shepherd_serves_requests_past_their_deadline_after_feasible_ones():
    # One slot, held by a long request; an interactive request waits past its deadline, then a batch
    # request arrives that can still meet its own: the hopeless one goes after it, not before.
    sc = scenario(max_num_seqs=1, enable_eviction=False)
    reqs = [req(0, 0.0, 1500), req(1, 0.1, 5, slo=5.0), req(2, 6.0, 5, slo=3600.0)]
    run = simulate(sc, "shepherd", reqs)
    r = {x.request_id: x for x in run.result.requests}
    assert r[1].ttft_s > 5.0  # missed: the slot was busy for longer than its SLO
    assert r[2].dispatch_s < r[1].dispatch_s
    assert run.summary["policy_stats"]["deferred"] >= 1


def preemption_workload() -> list[Request]:
    # Four long batch requests fill the batch; four interactive ones arrive and would wait ~12 s.
    batch = [req(i, 0.0, 2000) for i in range(4)]
    inter = [req(4 + i, 1.0 + 0.01 * i, 10, slo=5.0) for i in range(4)]
    return batch + inter


def test_shepherd_preempts_looser_deadlines_for_a_batch_that_would_miss():
    params = {"shepherd_plan_interval_s": 0.5}
    with_preempt = simulate(scenario(mean_output_tokens=2000, params=params), "shepherd", preemption_workload())
    without = simulate(scenario(mean_output_tokens=2000, params=params, enable_eviction=False), "shepherd",
                       preemption_workload())
    by_class = with_preempt.summary["slo_attainment_by_class"]
    assert with_preempt.summary["num_evictions"] > 0
    assert by_class["interactive"] == 1.0
    assert without.summary["num_evictions"] == 0
    assert without.summary["slo_attainment_by_class"]["interactive"] < 1.0
    # Only batch requests (looser deadlines) were preempted, and they still finished all their tokens.
    for r in with_preempt.result.requests:
        if r.num_evictions:
            assert r.slo_class == "batch"
        assert r.finish_s is not None and r.generated_tokens == r.output_tokens


def test_shepherd_does_not_preempt_when_preemption_buys_nothing():
    # Interactive requests that fit in free slots need no victims.
    run = simulate(scenario(max_num_seqs=16, params={"shepherd_plan_interval_s": 0.5}), "shepherd",
                   preemption_workload())
    assert run.summary["num_evictions"] == 0


def test_shepherd_planner_moves_instances_to_the_loaded_model():
    # Two models, one instance holding "a"; all the load is on "b": the planner swaps to it.
    sc = scenario(models=("a", "b"), max_num_seqs=8)
    reqs = [req(i, 0.2 * i, 20, model="b") for i in range(30)]
    run = simulate(sc, "shepherd", reqs)
    assert run.summary["num_swaps"] >= 1
    assert run.summary["completed"] == 30


def test_shepherd_rejects_bad_parameters():
    from qlmctl.policies import PolicyContext

    ctx = PolicyContext.from_scenario(scenario(params={"shepherd_plan_interval_s": 0}))
    with pytest.raises(ValueError):
        ShepherdPolicy(ctx)


@pytest.mark.parametrize("policy", ["shepherd", "sjf-oracle"])
def test_deterministic(policy):
    sc = scenario(instances=2, models=("a", "b"), max_num_seqs=4, kv_blocks=60)
    reqs = [req(i, 0.05 * i, 5 + (i * 7) % 40, slo=5.0 if i % 3 == 0 else 3600.0, model="ab"[i % 2])
            for i in range(80)]
    first = simulate(sc, policy, reqs).summary
    second = simulate(sc, policy, reqs).summary
    for key in ("slo_attainment", "p99_ttft_ms", "num_swaps", "num_evictions", "duration"):
        assert first[key] == second[key]


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 60),
    seed=st.integers(0, 10_000),
    policy=st.sampled_from(["shepherd", "sjf-oracle"]),
    seqs=st.integers(1, 6),
    kv=st.integers(12, 80),  # every request fits alone (<= 11 blocks), as in test_simulate
    two_models=st.booleans(),
)
def test_every_request_finishes_once_with_its_tokens(n, seed, policy, seqs, kv, two_models):
    import random

    rnd = random.Random(seed)
    models = ("a", "b") if two_models else ("a",)
    sc = scenario(instances=2, models=models, max_num_seqs=seqs, kv_blocks=kv,
                  params={"shepherd_plan_interval_s": 0.5})
    t = 0.0
    reqs = []
    for i in range(n):
        t += rnd.expovariate(20.0)
        reqs.append(req(i, t, rnd.randint(1, 60), slo=rnd.choice([1.0, 5.0, 3600.0]), model=rnd.choice(models),
                        prompt=rnd.randint(1, 100)))
    run = simulate(sc, policy, reqs)
    assert run.summary["completed"] == n
    for r in run.result.requests:
        assert r.error is None and r.finish_s is not None
        assert r.generated_tokens == r.output_tokens
        assert r.arrival_s <= r.dispatch_s <= r.first_token_s <= r.finish_s


def test_a_policy_without_a_run_time_docstring_is_described_from_its_source(tmp_path, monkeypatch):
    # As the compiled build leaves its classes: no __doc__, the module's source installed beside it.
    (tmp_path / "plugin_policy.py").write_text('class Plugin:\n    """Serves plugins first."""\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    import plugin_policy

    plugin_policy.Plugin.__doc__ = None
    assert policy_doc(plugin_policy.Plugin) == "Serves plugins first."
    (tmp_path / "plugin_policy.py").unlink()
    assert policy_doc(plugin_policy.Plugin) == ""
