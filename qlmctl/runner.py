"""Run a scenario in simulation under one or more policies, and summarise each run."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from operator import attrgetter
from pathlib import Path
from typing import Any

import simulator
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
    stopped_early: bool = False
    """`stop_if` ended the run before every request was served (the rest count as unfinished)."""


class _Stop(Exception):
    """Raised out of the simulation loop to end a run early."""


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
    stop_if: Callable[[float, int, Sequence[Request]], bool] | None = None,
    copy_requests: bool = True,
) -> PolicyRun:
    """Simulate `requests` under `policy`.

    `stop_if(now, done, requests)` is asked every few thousand finished requests (simulated time, requests
    finished, the run's requests); True ends the run there (`PolicyRun.stopped_early`): a sweep stops a
    point that can no longer be in a steady state.

    `copy_requests`: the run works on copies, so `requests` can be replayed again (under another policy).
    False lets it fill in `requests` themselves, for a caller that replays them once (a copy costs about
    2 s per million requests); they must not have been run before.
    """
    pol = make_policy(policy, PolicyContext.from_scenario(scenario))
    if copy_requests:
        requests = fresh_copies(requests)
    elif any(r.dispatch_s is not None or r.finish_s is not None or r.rejected for r in requests):
        raise ValueError("simulate(copy_requests=False) needs requests that have not been run yet")
    cluster = SimulatedCluster(scenario, pol, requests)  # (it sorts them into a list of its own)
    def watch(done: int, total: int) -> None:
        if progress is not None:
            progress(done, total)
        if stop_if is not None and done < total and stop_if(cluster.now(), done, cluster.requests):
            raise _Stop

    wall0 = time.perf_counter()
    stopped = False
    try:
        result = cluster.run(watch if stop_if is not None else progress)
    except _Stop:
        stopped = True
        result = _partial_result(cluster, time.perf_counter() - wall0)
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
            "sim_build": simulator.build(),  # what sim_wall_s was measured with: "pure" or "compiled" (setup.py)
            "sim_events": result.events,
            "policy_stats": result.policy_stats,
            "policy_errors": result.policy_errors,
            **({"stopped_early": True} if stopped else {}),
        },
    )
    return PolicyRun(policy, result, summary, stopped_early=stopped)


def late_arrival_range(scenario: Scenario, policy: str, requests: Sequence[Request], late_s: float = 0.5,
                       draws: int = 12, as_they_are: float | None = None) -> tuple[float, float]:
    """The lowest and highest SLO attainment of `requests` simulated as they are and `draws` times with each
    arriving up to `late_s` later (uniform, seeds 0 .. draws - 1; its deadline moves with it). `as_they_are`:
    the first of those, from a run the caller has already made.

    How much a result hangs on sub-second timing: a live run is one draw of such timing (its client and gateway
    are late by tens to hundreds of milliseconds), so it is compared with this range rather than with one run."""
    import numpy as np

    if as_they_are is None:
        as_they_are = simulate(scenario, policy, requests).summary["slo_attainment"]
    got = [as_they_are]
    for seed in range(draws):
        late = np.random.default_rng(seed).uniform(0.0, late_s, len(requests))
        reqs = fresh_copies(requests)
        for r, d in zip(reqs, late):
            r.arrival_s += float(d)
        got.append(simulate(scenario, policy, reqs, copy_requests=False).summary["slo_attainment"])
    return min(got), max(got)


def _partial_result(cluster: SimulatedCluster, wall_s: float) -> SimResult:
    """What a run stopped by `stop_if` did so far."""
    reqs = list(cluster.requests)
    end = max((r.finish_s for r in reqs if r.finish_s is not None), default=0.0)
    start = reqs[0].arrival_s if reqs else 0.0
    insts = cluster.instance_records(end - start)
    return SimResult(policy=cluster.policy.name, requests=reqs, instances=insts,
                     num_swaps=sum(inst.swaps for inst in cluster.instances),
                     num_evictions=sum(r.num_evictions for r in reqs), sim_duration_s=end - start, wall_s=wall_s,
                     events=0, timeline=list(cluster.timeline))


def save(run: PolicyRun, scenario: Scenario, out_dir: Path) -> Path:
    run.folder = write_results(
        out_dir, run.policy, run.result.requests, run.summary, scenario.dump(), timeline_frame(run.result.timeline)
    )
    return run.folder
