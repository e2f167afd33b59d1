"""Run a scenario in simulation under one or more policies, and summarise each run."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from qlmctl.backends.sim import SimResult, SimulatedCluster
from qlmctl.core.request import Request
from qlmctl.metrics import summarize
from qlmctl.policies import PolicyContext, make_policy, policy_class
from qlmctl.report import write_results
from qlmctl.scenario import Scenario

TIMELINE_COLUMNS = ["time_s", "kind", "instance_id", "model", "slo_class", "value"]


def policy_context(scenario: Scenario) -> PolicyContext:
    s = scenario.spec.scheduler
    return PolicyContext(
        profiles={m: scenario.profile(m) for m in scenario.models},
        slo_bucket_s=s.slo_bucket_s,
        percentile=s.percentile,
        reschedule_interval_s=s.reschedule_interval_s,
        dispatch_limit=s.dispatch_limit,
        enable_eviction=s.enable_eviction,
        enable_swap=s.enable_swap,
        seed=scenario.spec.seed,
        params=dict(s.params),
        solver=s.solver,
        solver_time_limit_s=s.solver_time_limit_s,
        gurobi=s.gurobi,
    )


@dataclass
class PolicyRun:
    policy: str
    result: SimResult
    summary: dict[str, Any]
    folder: Path | None = None


def fresh_copies(requests: Sequence[Request]) -> list[Request]:
    """Requests with no lifecycle yet, so every policy replays the same input."""
    return [copy.copy(r) for r in requests]


def simulate(
    scenario: Scenario,
    policy: str,
    requests: Sequence[Request],
    progress: Callable[[int, int], None] | None = None,
) -> PolicyRun:
    pol = make_policy(policy, policy_context(scenario))
    cluster = SimulatedCluster(scenario, pol, fresh_copies(requests))
    result = cluster.run(progress)
    busy = {str(i["instance_id"]): i["busy_s"] for i in result.instances}
    summary = summarize(
        result.requests,
        instance_busy_s=busy,
        num_swaps=result.num_swaps,
        extra={
            "policy": policy,
            "scenario": scenario.spec.name,
            "backend": "simulate",
            "sim_wall_s": result.wall_s,
            "sim_events": result.events,
            "policy_stats": result.policy_stats,
        },
    )
    return PolicyRun(policy, result, summary)


def timeline_frame(result: SimResult) -> pd.DataFrame:
    return pd.DataFrame(result.timeline, columns=TIMELINE_COLUMNS)


def save(run: PolicyRun, scenario: Scenario, out_dir: Path) -> Path:
    run.folder = write_results(
        out_dir, run.policy, run.result.requests, run.summary, scenario.dump(), timeline_frame(run.result)
    )
    return run.folder


def parse_policies(text: str | None, scenario: Scenario) -> list[str]:
    names = [p.strip() for p in (text or scenario.spec.scheduler.policy).split(",") if p.strip()]
    for n in names:
        policy_class(n)  # raises a UserError naming the choices
    return names
