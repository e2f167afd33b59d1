"""Time qlm's plan against the number of groups: the global placement (plan_queues) and the per-request walk
that predicts each queued request's TTFT and defers what Moore-Hodgson's rule gives up (_walk).

    python bench/bench_qlm_plan.py

Target: under 1 ms for 100 groups on 8 instances (5 requests a group).
"""

from __future__ import annotations

import time

from qlmctl.backends.sim import SimulatedCluster
from qlmctl.core.request import Request
from qlmctl.policies import make_policy
from qlmctl.policies import PolicyContext
from qlmctl.scenario import Scenario, ScenarioSpec


def cluster(groups: int, instances: int, models: int = 4):
    prof = {"base_s": 0.0045, "per_prefill_token_s": 1.9e-5, "per_decode_seq_s": 2.5e-5,
            "per_context_token_s": 2e-8, "kv_blocks": 57489}
    spec = ScenarioSpec.model_validate({
        "models": {f"m{i}": {"profile": prof} for i in range(models)},
        "cluster": {"instances": [{"model": f"m{i % models}"} for i in range(instances)]},
        "slo_classes": {"c": {"ttft_s": 20}},
        "workload": {"synthetic": {"rate_rps": 1, "num_requests": 1, "prompt_tokens": 1, "output_tokens": 1}},
    })
    sc = Scenario(spec)
    pol = make_policy("qlm", PolicyContext.from_scenario(sc))
    sim = SimulatedCluster(sc, pol, [])
    rid = 0
    for g in range(groups):
        for _ in range(5):  # 5 requests a group; group = (model, SLO bucket)
            slo = 10.0 * (g // models + 1)
            pol.add_request(Request(rid, 0.0, f"m{g % models}", "c", slo, 500, 200), 0.0)
            rid += 1
    return sim, pol


def main() -> None:
    print("| groups | instances | plan_queues (ms) | walk (ms) | both (ms, median of 50) |")
    print("|---:|---:|---:|---:|---:|")
    for groups, inst in ((10, 2), (50, 8), (100, 4), (100, 8), (100, 16), (200, 16)):
        sim, pol = cluster(groups, inst)
        assert len(pol.groups) == groups
        plan, walk, both = [], [], []
        for _ in range(50):
            t0 = time.perf_counter()
            pol.plan_queues(sim, 0.0)
            t1 = time.perf_counter()
            pol._walk(sim, 0.0)
            t2 = time.perf_counter()
            plan.append(t1 - t0)
            walk.append(t2 - t1)
            both.append(t2 - t0)

        def med(xs: list[float]) -> float:
            return sorted(xs)[len(xs) // 2] * 1e3

        print(f"| {groups} | {inst} | {med(plan):.3f} | {med(walk):.3f} | {med(both):.3f} |")


if __name__ == "__main__":
    main()
