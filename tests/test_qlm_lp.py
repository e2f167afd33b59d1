"""qlm-lp: the placement program against brute force, the solvers, licence handling, and the policy."""

from __future__ import annotations

import importlib.util
import itertools
from dataclasses import fields

import numpy as np
import pytest

from qlmctl.core.frozen import FrozenCluster, FrozenInstance
from qlmctl.core.estimator import RWTEstimator
from qlmctl.core.request import Request
from qlmctl.errors import UserError
from qlmctl.policies import make_policy
from qlmctl.policies.base import PolicyContext
from qlmctl.policies.qlm import PlanStats
from qlmctl.solvers import MilpSolver, MilpStatus
from qlmctl.solvers.gurobi import GurobiLicence, GurobiSizeLimit, GurobiSolver
from qlmctl.solvers.highs import solve_highs
from qlmctl.solvers.placement import (
    GroupState,
    LaneRate,
    LaneState,
    PlacementInputs,
    complete_plan,
    edf_within_stretches,
    evaluate,
)
from qlmctl.solvers.placement_milp import build_milp, to_runs
from simulator.profile import EngineProfile

HAS_GUROBI = importlib.util.find_spec("gurobipy") is not None
EXACT = {"rel_gap": 0.0, "abs_gap": 1e-9}


# ----------------------------------------------------------------- helpers


def random_inputs(rng: np.random.Generator, n_groups: int, n_lanes: int = 2, n_models: int = 2,
                  chunks: int = 1) -> PlacementInputs:
    """A small random instance: lanes with different rates, loads, running work; tight and loose deadlines."""
    rates = [
        [LaneRate(float(rng.uniform(0.02, 0.2)), float(rng.uniform(0, 1.5)), int(rng.integers(1, 8)))
         for _ in range(n_models)]
        for _ in range(n_lanes)
    ]
    load = rng.uniform(0.5, 20, size=(n_lanes, n_models))
    lanes = []
    for i in range(n_lanes):
        m = int(rng.integers(-1, n_models))
        lanes.append(LaneState(i, None if m < 0 else m, float(rng.choice([0.0, rng.uniform(0, 5)])),
                               float(rng.uniform(0, 10)) if m >= 0 else 0.0))
    groups = []
    for _ in range(n_groups):
        n = int(rng.integers(1, 60))
        deadlines = np.sort(rng.uniform(0, 40, size=n)) + rng.uniform(-2, 10)
        groups.append(GroupState(int(rng.integers(0, n_models)), deadlines, late=bool(rng.random() < 0.1)))
    return PlacementInputs(lanes, groups, rates, load, chunks)


def all_plans(n_groups: int, n_lanes: int):
    """Every placement: each permutation of the groups cut into `n_lanes` ordered lanes."""
    for perm in itertools.permutations(range(n_groups)):
        for cuts in itertools.combinations_with_replacement(range(n_groups + 1), n_lanes - 1):
            b = (0, *cuts, n_groups)
            yield [list(perm[b[j]:b[j + 1]]) for j in range(n_lanes)]


SOLVE_CAP_S = 120.0
"""A cap on a solve, not what is tested: the largest case (6 groups, 3 models) is one deterministic single-thread
HiGHS solve of ~7 s on an idle 2-core machine, 13.6 s with its cores busy, and it ran into the former 30 s cap
(FEASIBLE, 'Time limit reached') with both cores busy and two test workers beside it."""


def solve(problem, solver: str):
    if solver == "highs":
        return solve_highs(problem, SOLVE_CAP_S, **EXACT)
    return GurobiSolver(GurobiLicence("default")).solve(problem, SOLVE_CAP_S, **EXACT)


SOLVERS = ["highs", pytest.param("gurobi", marks=pytest.mark.skipif(not HAS_GUROBI, reason="no gurobipy"))]


# ----------------------------------------------------------------- the program


def test_lane_rate_is_the_estimators_completions_time():
    prof = EngineProfile("m", 0.0045, 1.9e-5, 2.5e-5, 2e-8, 57489)
    est = RWTEstimator({"m": prof}, 0.9)
    for out in (10, 500, 80, 300, 1200):
        est.observe("m", 700, out)
    rate = est.rate(prof, "m")
    st = est.stats["m"]
    assert rate.spread == est.z * st.std / st.mean
    lr = LaneRate(rate.request_time_s / rate.concurrency, rate.spread, rate.concurrency)
    ns = np.array([0.0, 1.0, 7.0, 100.0, 2500.5])
    expect = [est.completions_time(n, rate, "m") for n in ns]
    assert np.allclose(lr.completions(ns), expect)
    # The rate's own form (qlm's planner calls it), at the same percentile.
    assert np.allclose([rate.completions_time(n) for n in ns], expect, rtol=1e-12)
    assert rate.completions_time(-1.0) == 0.0
    # A model nothing was learnt of yet: the prior (mean = std), so the spread is z itself.
    assert est.rate(prof, "unseen").spread == est.z


# (seed, groups, models) chosen to cover one to three models, swaps at the first slot, late groups.
CASES = [(1, 3, 2), (2, 4, 1), (3, 4, 3), (4, 5, 2), (5, 6, 2), (6, 6, 3)]


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("seed,n_groups,n_models", CASES)
def test_program_finds_the_enumerated_optimum(solver, seed, n_groups, n_models):
    """One chunk per group, two runs per group: the optimum over every placement on 2 instances."""
    inp = random_inputs(np.random.default_rng(seed), n_groups, n_models=n_models, chunks=1)
    best = max(evaluate(inp, plan).objective for plan in all_plans(n_groups, 2))
    milp = build_milp(inp, runs=2 * n_groups)
    result = solve(milp.problem, solver)
    assert result.status is MilpStatus.OPTIMAL
    assert -result.objective == pytest.approx(best, abs=1e-6)
    # Read back in slot order, the plan scores what the program says.
    assert evaluate(inp, milp.decode(result.x, 2)).objective == pytest.approx(best, abs=1e-6)


@pytest.mark.parametrize("solver", SOLVERS)
def test_program_with_chunks_finds_the_best_plan_in_run_form(solver):
    """Several chunks per group: the optimum over the plans the program covers (runs in canonical order)."""
    inp = random_inputs(np.random.default_rng(11), 5, n_models=2, chunks=3)
    runs = 3
    covered = [p for p in all_plans(5, 2) if max(len(r) for r in to_runs(inp, p)) <= runs]
    best = max(evaluate(inp, plan).objective for plan in covered)
    result = solve(build_milp(inp, runs).problem, solver)
    assert -result.objective == pytest.approx(best, abs=1e-6)


def test_warm_start_is_feasible_and_worth_its_score():
    rng = np.random.default_rng(3)
    inp = random_inputs(rng, 6, n_models=3, chunks=2)
    for plan in itertools.islice(all_plans(6, 2), 0, 5000, 397):
        milp = build_milp(inp, runs=max(len(r) for r in to_runs(inp, plan)), warm=plan)
        start = milp.problem.start
        assert milp.problem.violation(start) < 1e-7
        assert -milp.problem.objective(start) == pytest.approx(evaluate(inp, plan).objective, abs=1e-9)


def test_overload_still_gets_a_schedule():
    """Every deadline out of reach: the program is feasible, places every group, credits nobody."""
    rng = np.random.default_rng(5)
    base = random_inputs(rng, 5, n_models=2, chunks=2)
    hopeless = [GroupState(g.model, g.deadlines_s - 1e4) for g in base.groups]
    inp = PlacementInputs(base.lanes, hopeless, base.rates, base.load_s, 2)
    result = solve_highs(build_milp(inp, 4).problem, 10.0)
    assert result.status.has_solution
    plan = build_milp(inp, 4).decode(result.x, 2)
    assert sorted(g for lane in plan for g in lane) == list(range(5))
    assert evaluate(inp, plan).on_time == 0


def test_split_groups_and_completion():
    rng = np.random.default_rng(8)
    inp = random_inputs(rng, 4, n_models=1, chunks=2)
    split = evaluate(inp, [[0, 1, 2, 3], [0, 3]])  # groups 0 and 3 shared by both lanes
    assert split.unplaced == 0 and 0 <= split.on_time <= inp.max_on_time
    partial = evaluate(inp, [[1], []])
    assert partial.unplaced == 3
    full = complete_plan(inp, [[1], []])
    assert sorted(g for lane in full for g in lane) == [0, 1, 2, 3]
    assert evaluate(inp, full).objective > partial.objective
    # Reordering stretches by deadline never lowers the score.
    polished = edf_within_stretches(inp, full)
    assert sorted(map(sorted, polished)) == sorted(map(sorted, full))
    assert evaluate(inp, polished).objective >= evaluate(inp, full).objective


# ----------------------------------------------------------------- solvers and licences


def test_bad_solver_name_is_a_user_error():
    with pytest.raises(UserError, match="unknown solver 'cplex'"):
        MilpSolver("cplex", 0.5)
    with pytest.raises(UserError, match="unknown solver"):
        make_policy("qlm-lp", PolicyContext(profiles={}, solver="cplex"))


SECRET = "s3cr3t-value-XYZ"


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"WLSACCESSID": SECRET}, "missing scheduler.gurobi.WLSSECRET, scheduler.gurobi.LICENSEID"),
        ({"WLSACCESSID": SECRET, "WLSSECRET": SECRET, "LICENSEID": "12x"}, "whole number"),
        ({"WLSSECRET": ""}, "empty"),
        ({"TOKEN": SECRET}, "unknown Gurobi licence setting 'TOKEN'"),
        ({"license_file": "/nonexistent/gurobi.lic"}, "licence file not found"),
        ({"license_file": "/tmp", "WLSSECRET": SECRET}, "either license_file or licence parameters"),
    ],
)
def test_broken_licence_settings_are_clear_errors_without_secrets(settings, message):
    for solver in ("gurobi", "auto"):
        with pytest.raises(UserError) as err:
            MilpSolver(solver, 0.5, gurobi=settings, environ={})
        assert message in err.value.one_line()
        assert SECRET not in err.value.one_line()


def test_licence_from_environment(tmp_path):
    with pytest.raises(UserError, match="GRB_LICENSE_FILE"):
        GurobiLicence.from_settings(None, {"GRB_LICENSE_FILE": str(tmp_path / "missing.lic")})
    with pytest.raises(UserError, match="missing GRB_WLSSECRET"):
        GurobiLicence.from_settings(None, {"GRB_WLSACCESSID": SECRET, "GRB_LICENSEID": "1"})
    lic = tmp_path / "gurobi.lic"
    lic.write_text(f"# WLS\nWLSACCESSID={SECRET}\nWLSSECRET={SECRET}\nLICENSEID=42\n")
    got = GurobiLicence.from_settings(None, {"GRB_LICENSE_FILE": str(lic)})
    assert got.params["LICENSEID"] == 42 and SECRET not in repr(got)
    assert GurobiLicence.from_settings(None, {}).source == "default"


@pytest.mark.skipif(not HAS_GUROBI, reason="no gurobipy")
def test_licence_gurobi_rejects_is_a_clear_error(tmp_path):
    """A node-locked licence for another host: Gurobi refuses it at start (no network involved)."""
    lic = tmp_path / "gurobi.lic"
    lic.write_text("TYPE=NODE\nHOSTID=deadbeef\nKEY=ABCD-1234\n")
    with pytest.raises(UserError, match="could not be used"):
        MilpSolver("gurobi", 0.5, gurobi={"license_file": str(lic)}, environ={})


def test_no_licence_for_the_size_falls_back_to_highs_once(monkeypatch):
    def refuse(self, problem, *a, **k):
        raise GurobiSizeLimit("Model too large for size-limited license")

    monkeypatch.setattr(GurobiSolver, "solve", refuse)
    monkeypatch.setattr(GurobiSolver, "start", lambda self: None)
    notices: list[str] = []
    solver = MilpSolver("auto", 5.0, environ={}, notify=notices.append)
    if not HAS_GUROBI:
        assert solver._gurobi is None
    problem = build_milp(random_inputs(np.random.default_rng(2), 4), 2).problem
    for _ in range(3):
        result = solver.solve(problem)
        assert result.solver == "highs" and result.status.has_solution
    assert len(notices) == 1 and "highs" in notices[0]
    assert solver.notices == notices


@pytest.mark.skipif(not HAS_GUROBI, reason="no gurobipy")
def test_auto_over_the_pip_licence_size():
    """With gurobipy's own (size-limited) licence, a model over ~2,000 rows goes to HiGHS, said once."""
    rng = np.random.default_rng(9)
    inp = random_inputs(rng, 40, n_lanes=4, n_models=3, chunks=4)
    problem = build_milp(inp, 8).problem
    assert max(problem.num_vars, problem.num_constraints) > 2000
    notices: list[str] = []
    solver = MilpSolver("auto", 0.2, environ={}, notify=notices.append)
    result = solver.solve(problem)
    if result.solver == "highs":  # the pip licence; a full one would have solved it
        assert any("size-limited" in n for n in notices)
    assert len(notices) == len(set(notices)) <= 2


# ----------------------------------------------------------------- the policy


def _profiles() -> dict[str, EngineProfile]:
    base = EngineProfile("a", 0.0045, 1.9e-5, 2.5e-5, 2e-8, 57489, max_num_seqs=64, load_cold_s=30, load_warm_s=1)
    return {m: EngineProfile(m, *[getattr(base, f.name) for f in fields(EngineProfile)][1:]) for m in "abc"}


def _loaded_policy(rng: np.random.Generator, **params):
    profiles = _profiles()
    ctx = PolicyContext(profiles=profiles, solver="highs", solver_time_limit_s=0.5, params=params)
    policy = make_policy("qlm-lp", ctx)
    cluster = FrozenCluster([FrozenInstance(0, "a", profiles, warm={"a", "b"}),
                             FrozenInstance(1, "b", profiles, warm={"b"})])
    rid = 0
    for t in np.sort(rng.uniform(0, 30, size=400)):
        slo = float(rng.choice([20.0, 60.0, 600.0]))
        r = Request(rid, float(t), str(rng.choice(list("abc"), p=[0.5, 0.3, 0.2])), f"c{slo:g}", slo,
                    int(rng.integers(50, 2000)), int(rng.integers(10, 600)))
        policy.add_request(r, float(t))
        rid += 1
    for inst in cluster.instances:  # busy instances
        inst.running = [Request(10_000 + j, 0.0, inst.model, "x", 600, 500, 300) for j in range(64)]
    cluster.t = 30.0
    return policy, cluster


def test_policy_plan_is_never_worse_than_the_heuristics():
    from qlmctl.policies.qlm import QLMPolicy

    policy, cluster = _loaded_policy(np.random.default_rng(4), forecast_s=0)
    heuristic = QLMPolicy.plan_queues(policy, cluster, cluster.t)
    chosen = policy.plan_queues(cluster, cluster.t)
    snap = policy._snapshot(cluster, cluster.t)
    assert snap is not None
    h = evaluate(snap.inputs, snap.to_plan(heuristic))
    c = evaluate(snap.inputs, complete_plan(snap.inputs, snap.to_plan(chosen)))
    assert c.objective >= h.objective - 1e-9
    assert policy.stats.solves == 1
    queued = {k for k, g in policy.groups.items() if g.queue}
    assert {k for vq in chosen.values() for k in vq} == queued  # every waiting group is planned


def test_policy_keeps_the_heuristic_when_the_solver_fails(monkeypatch):
    from qlmctl.policies.qlm import QLMPolicy
    from qlmctl.solvers.milp import MilpResult

    policy, cluster = _loaded_policy(np.random.default_rng(4), forecast_s=0)
    monkeypatch.setattr(policy.solver, "solve", lambda problem: MilpResult(MilpStatus.NO_SOLUTION, "highs", 0.5))
    heuristic = QLMPolicy.plan_queues(policy, cluster, cluster.t)
    assert policy.plan_queues(cluster, cluster.t) == heuristic
    assert policy.stats.solve_failures == 1 and policy.stats.milp_plans_chosen == 0


def test_async_plan_is_adopted_by_a_later_schedule():
    policy, cluster = _loaded_policy(np.random.default_rng(4), forecast_s=0, async_plan=True)
    policy.plan_queues(cluster, cluster.t)  # submits the solve, returns the heuristic's plan
    assert policy._pending is not None
    policy._pending.result(timeout=30)
    policy.schedule(cluster)
    assert policy._pending is None and policy.stats.solves == 1
    policy.close()


def test_bad_params_are_user_errors():
    for params, name in (({"chunks": 0}, "chunks"), ({"async_plan": "yes"}, "async_plan"),
                         ({"solve_interval_s": -1}, "solve_interval_s"), ({"max_runs": 2.5}, "max_runs")):
        with pytest.raises(UserError) as err:
            make_policy("qlm-lp", PolicyContext(profiles=_profiles(), solver="highs", params=params))
        assert err.value.field == f"scheduler.params.{name}"


def test_stats_carry_the_heuristics_counters():
    from qlmctl.policies.qlm_lp import QLMLPStats

    assert {f.name for f in fields(PlanStats)} <= {f.name for f in fields(QLMLPStats)}


def test_simulate_default_scenario_with_qlm_lp():
    from qlmctl.runner import simulate
    from qlmctl.scenario import load_scenario
    from qlmctl.workload import build_requests

    sc = load_scenario(None, {"workload": {"max_requests": 300}, "scheduler": {"solver": "highs"}})
    reqs, _ = build_requests(sc)
    run = simulate(sc, "qlm-lp", reqs)
    assert run.summary["completed"] == 300
    stats = run.summary["policy_stats"]
    assert stats["plans"] >= 1 and stats["solves"] >= 0 and "solve_s_mean" in stats


# ----------------------------------------------------------------- live


@pytest.mark.asyncio
async def test_live_gateway_solves_off_the_event_loop(tmp_path):
    """qlm-lp behind the live gateway (two emulated engines): the gateway asks for background solves, every
    request is served, and the program ran."""
    import pandas as pd
    import yaml

    from qlmctl.emulator.testing import live_scenario_spec, local_emulators
    from qlmctl.gateway.run import run_live
    from qlmctl.scenario import load_scenario
    from qlmctl.traces import write_native_csv
    from qlmctl.workload import build_requests

    profile = dict(base_s=0.01, per_prefill_token_s=5e-5, per_decode_seq_s=1e-3, per_context_token_s=0.0,
                   kv_blocks=2000, block_size=16, max_num_seqs=8, max_num_batched_tokens=1024, max_model_len=2048,
                   load_cold_s=5.0, load_warm_s=0.5, mean_output_tokens=120, std_output_tokens=100)
    rng = np.random.default_rng(0)
    rows = [(t, "m", "batch", int(rng.integers(100, 200)), int(rng.integers(150, 250)))
            for t in np.sort(rng.uniform(0.0, 1.0, 40))]
    rows += [(t, "m", "interactive", int(rng.integers(20, 60)), int(rng.integers(10, 30)))
             for t in np.sort(rng.uniform(1.5, 4.0, 40))]
    trace = tmp_path / "mixed.csv"
    write_native_csv(pd.DataFrame(sorted(rows), columns=["arrival_s", "model", "slo_class", "prompt_tokens",
                                                         "output_tokens"]), trace)
    prof = EngineProfile(model="m", **profile)
    with local_emulators([(prof, "m"), (prof, "m")], speedup=5.0) as engines:
        spec = live_scenario_spec(
            profile, [("g0", "m", engines[0].url), ("g1", "m", engines[1].url)], speedup=5.0,
            slo_classes={"interactive": {"ttft_s": 1.0}, "batch": {"ttft_s": 30.0}},
            workload={"trace": str(trace), "model": {"column": "model"}, "slo_class": {"column": "slo_class"}},
            scheduler={"slo_bucket_s": 1.0, "reschedule_interval_s": 0.5, "solver": "highs",
                       "params": {"solve_interval_s": 1.0}},
        )
        path = tmp_path / "live.yaml"
        path.write_text(yaml.safe_dump(spec))
        sc = load_scenario(path)
        requests, _ = build_requests(sc)
        run = await run_live(sc, "qlm-lp", requests)
    assert run.summary["completed"] == len(requests) == 80
    stats = run.summary["policy_stats"]
    assert stats["solves"] >= 1 and stats["solve_failures"] == 0
