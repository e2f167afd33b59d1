"""Benchmark of the qlm-lp placement program (run by hand; figures go in the closing note / docs).

Two parts:

  solve  Build time and solve time against size (10 groups on 2 instances, 50 on 8, 200 on 16) for each
         solver, on synthetic cluster states: each state is a `qlm-lp` policy with requests queued in
         models x SLO-class groups on busy instances; the warm start and the baseline is QLM's heuristic
         plan. Reports variables, constraints, status, and the estimated on-time requests of the
         heuristic's plan and of the program's.
  slo    SLO attainment of fcfs, edf, qlm and qlm-lp on the bundled scenarios (default, multi_model).

    python bench/bench_milp.py solve [--time-limit 0.5] [--repeats 3]
    python bench/bench_milp.py slo [--solver auto] [--requests N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qlmctl.core.frozen import FrozenCluster, FrozenInstance
from qlmctl.core.request import Request  # noqa: E402
from qlmctl.policies import make_policy  # noqa: E402
from qlmctl.policies.base import PolicyContext  # noqa: E402
from qlmctl.policies.qlm import QLMPolicy  # noqa: E402
from qlmctl.solvers import MilpSolver  # noqa: E402
from qlmctl.solvers.placement import complete_plan, edf_within_stretches, evaluate, single_assignment  # noqa: E402
from qlmctl.solvers.placement_milp import build_milp, candidate_lanes, default_runs, to_runs  # noqa: E402
from simulator.profile import EngineProfile  # noqa: E402

SIZES = [(10, 2), (50, 8), (200, 16)]
"""(groups, instances)."""


def synthetic_state(n_groups: int, n_instances: int, seed: int, solver: str, time_limit_s: float):
    """A qlm-lp policy and a cluster with `n_groups` groups queued (models x SLO classes)."""
    rng = np.random.default_rng(seed)
    n_models = max(2, int(round(np.sqrt(n_groups / 2))))
    n_classes = -(-n_groups // n_models)
    scale = rng.uniform(0.4, 1.8, size=n_models)  # 3B..14B-like shapes
    profiles = {
        f"m{j}": EngineProfile(
            f"m{j}", 0.0045 * scale[j], 1.9e-5 * scale[j], 2.5e-5 * scale[j], 2e-8 * scale[j],
            int(57489 / scale[j]), max_num_seqs=256, load_cold_s=30 + 30 * scale[j], load_warm_s=scale[j],
        )
        for j in range(n_models)
    }
    ctx = PolicyContext(profiles=profiles, solver=solver, solver_time_limit_s=time_limit_s, seed=seed)
    policy = make_policy("qlm-lp", ctx)
    models = list(profiles)
    instances = [
        FrozenInstance(i, models[i % n_models], profiles, warm={models[i % n_models], models[(i + 1) % n_models]})
        for i in range(n_instances)
    ]
    now = 60.0
    rid = 0
    keys = [(m, c) for m in models for c in range(n_classes)][:n_groups]
    for m, c in keys:
        slo = 10.0 * (2 ** c) + 5.0  # one SLO bucket per class
        for _ in range(int(rng.integers(20, 200))):
            arrival = float(rng.uniform(max(0.0, now - slo), now))
            policy.add_request(
                Request(rid, arrival, m, f"c{c}", slo, int(rng.integers(100, 2000)), int(rng.integers(20, 600))),
                arrival,
            )
            rid += 1
    for inst in instances:
        busy = int(rng.integers(0, 256))
        inst.running = [Request(10**7 + inst.instance_id * 1000 + j, 0.0, inst.model, "x", 1e4, 800, 300)
                        for j in range(busy)]
    return policy, FrozenCluster(instances, now)


def bench_solve(time_limit_s: float, repeats: int, solvers: list[str]) -> None:
    print(f"time limit {time_limit_s:g} s; {repeats} states per size; estimated on-time requests "
          f"(heuristic -> program), of the most that could be")
    header = (f"{'size':>10} {'solver':>7} {'vars':>7} {'rows':>7} {'build s':>8} {'solve s':>8} "
              f"{'max s':>7} {'status':>22} {'heuristic':>10} {'program':>10} {'best':>8}")
    print(header)
    for n_groups, n_inst in SIZES:
        for solver_name in solvers:
            rows = []
            for seed in range(repeats):
                policy, cluster = synthetic_state(n_groups, n_inst, seed, solver_name, time_limit_s)
                heuristic = QLMPolicy.plan_queues(policy, cluster, cluster.t)
                snap = policy._snapshot(cluster, cluster.t)
                inp = snap.inputs
                warm_plan = snap.to_plan(heuristic)
                t0 = time.perf_counter()
                warm = single_assignment(warm_plan)
                needed = max((len(r) for r in to_runs(inp, warm)), default=0)
                runs = default_runs(len(inp.groups), inp.num_models, 2, 8, needed)
                allowed = candidate_lanes(inp, warm, policy.params.lanes_per_group)
                milp = build_milp(inp, runs, warm=warm, allowed=allowed)
                build_s = time.perf_counter() - t0
                solver = MilpSolver(solver_name, time_limit_s, environ={}, seed=seed, abs_gap=0.25)
                result = solver.solve(milp.problem)
                h = evaluate(inp, warm_plan)
                p = h
                if result.x is not None:
                    plan = edf_within_stretches(inp, complete_plan(inp, milp.decode(result.x, len(inp.lanes))))
                    p = max(h, evaluate(inp, plan), key=lambda s: s.objective)
                rows.append((milp.problem.num_vars, milp.problem.num_constraints, build_s, result.solve_s,
                             f"{result.solver}:{result.status.value}", h.on_time, p.on_time, inp.max_on_time))
            statuses = ",".join(sorted({r[4] for r in rows}))
            print(f"{n_groups:>4} on {n_inst:<3} {solver_name:>7} {rows[0][0]:>7} {rows[0][1]:>7} "
                  f"{statistics.mean(r[2] for r in rows):>8.3f} {statistics.mean(r[3] for r in rows):>8.3f} "
                  f"{max(r[3] for r in rows):>7.3f} {statuses:>22} {statistics.mean(r[5] for r in rows):>10.0f} "
                  f"{statistics.mean(r[6] for r in rows):>10.0f} {statistics.mean(r[7] for r in rows):>8.0f}")


def bench_slo(solver: str, max_requests: int | None, policies: list[str]) -> None:
    from qlmctl.runner import simulate
    from qlmctl.scenario import REPO_ROOT, load_scenario
    from qlmctl.workload import build_requests

    for path in ("scenarios/default.yaml", "scenarios/multi_model.yaml"):
        over: dict = {"scheduler": {"solver": solver}}
        if max_requests:
            over["workload"] = {"max_requests": max_requests}
        sc = load_scenario(REPO_ROOT / path, over)
        reqs, _ = build_requests(sc)
        print(f"\n{sc.spec.name}: {len(reqs)} requests, {len(sc.instance_specs())} instances")
        for name in policies:
            t0 = time.perf_counter()
            run = simulate(sc, name, reqs)
            s = run.summary
            by_class = " ".join(f"{k} {v:.1%}" for k, v in sorted(s["slo_attainment_by_class"].items()))
            extra = ""
            st = s.get("policy_stats") or {}
            if "solves" in st:
                extra = (f" | solves {st['solves']} (optimal {st['solves_optimal']}, time limit "
                         f"{st['solves_time_limit']}), mean {st['solve_s_mean']:.3f} s, max {st['solve_s_max']:.3f} s, "
                         f"program's plan used {st['milp_plans_chosen']}, solver {st['solver_used']}")
            print(f"  {name:>7}: SLO {s['slo_attainment']:.1%} ({by_class}) swaps {s['num_swaps']} "
                  f"wall {time.perf_counter() - t0:.1f} s{extra}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["solve", "slo", "all"])
    ap.add_argument("--time-limit", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--solvers", default="highs,gurobi")
    ap.add_argument("--solver", default="auto", help="solver for the slo part")
    ap.add_argument("--requests", type=int, default=None, help="cap the requests per scenario (slo part)")
    ap.add_argument("--policies", default="fcfs,edf,qlm,qlm-lp")
    args = ap.parse_args()
    if args.part in ("solve", "all"):
        bench_solve(args.time_limit, args.repeats, args.solvers.split(","))
    if args.part in ("slo", "all"):
        bench_slo(args.solver, args.requests, args.policies.split(","))


if __name__ == "__main__":
    main()
