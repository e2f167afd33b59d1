"""Run a scenario in simulation under one or more policies, and summarise each run."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from operator import attrgetter
from pathlib import Path
from typing import Any

from qlmctl.backends.sim import SimResult, SimulatedCluster
from qlmctl.core.request import Request
from qlmctl.metrics import INSTANCE_STATS, summarize
from qlmctl.policies import PolicyContext, make_policy
from qlmctl.report import timeline_frame, write_results
from qlmctl.scenario import Scenario


@dataclass
class PolicyRun:
    policy: str
    result: SimResult
    summary: dict[str, Any]
    folder: Path | None = None


_FIELDS = tuple(f.name for f in fields(Request))
_BY_CONSTRUCTOR = all(f.init for f in fields(Request))


def fresh_copies(requests: Sequence[Request]) -> list[Request]:
    """Requests with no lifecycle yet, so every policy replays the same input (shallow copies, made through the
    constructor: three times faster than `copy.copy` for a million requests)."""
    if not _BY_CONSTRUCTOR:
        return [copy.copy(r) for r in requests]
    get = attrgetter(*_FIELDS)
    return [Request(*get(r)) for r in requests]


def simulate(
    scenario: Scenario,
    policy: str,
    requests: Sequence[Request],
    progress: Callable[[int, int], None] | None = None,
) -> PolicyRun:
    pol = make_policy(policy, PolicyContext.from_scenario(scenario))
    cluster = SimulatedCluster(scenario, pol, fresh_copies(requests))
    result = cluster.run(progress)
    busy = {str(i["instance_id"]): i["busy_s"] for i in result.instances}
    summary = summarize(
        result.requests,
        instance_busy_s=busy,
        num_swaps=result.num_swaps,
        instance_stats={str(i["instance_id"]): {k: i[k] for k in INSTANCE_STATS} for i in result.instances},
        extra={
            "policy": policy,
            "scenario": scenario.spec.name,
            "backend": "simulate",
            "sim_wall_s": result.wall_s,
            "sim_events": result.events,
            "policy_stats": result.policy_stats,
            "policy_errors": result.policy_errors,
        },
    )
    return PolicyRun(policy, result, summary)


def save(run: PolicyRun, scenario: Scenario, out_dir: Path) -> Path:
    run.folder = write_results(
        out_dir, run.policy, run.result.requests, run.summary, scenario.dump(), timeline_frame(run.result.timeline)
    )
    return run.folder
