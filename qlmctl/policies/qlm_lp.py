"""qlm-lp: QLM with its global scheduler as a mixed-integer program.

Everything but the plan is QLM's (`QLMPolicy`): groups, virtual queues, pulling, eviction, swaps, demotion
of expired requests, and when a replan happens. `plan_queues` adds the program:

1. The heuristic's plan is built as before, and scored under the placement model
   (`qlmctl.solvers.placement.evaluate`: estimated on-time requests, then earlier completion).
2. When that plan loses requests (the estimator predicts a violation) and the last solve is at least
   `solve_interval_s` old, the program is solved (warm start: the heuristic's plan; time limit:
   `solver_time_limit_s`). Its plan, groups the program left out inserted and each stretch of one model
   put in deadline order where that scores no worse, is scored the same way.
3. The program's plan is used only if it puts strictly more requests on time (and scores better). A
   failed or timed-out solve therefore leaves the heuristic's plan, and the plan used is never worse than the heuristic's under that score.

When the clock is real (`PolicyContext.realtime`, the live gateway; `params.async_plan` overrides) the solve runs in a worker thread on a frozen snapshot, and its
plan is adopted by the first `schedule` after it is ready if it scores better, on the state then, than the
plan in use. Simulation keeps it synchronous (deterministic, up to the solver's time limit).

Parameters (`scheduler.params`): chunks, runs_pad, max_runs, lanes_per_group, solve_interval_s, async_plan,
mip_rel_gap, mip_abs_gap (see docs/qlm-lp.md).
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from qlmctl.core.cluster import ClusterView, Decision
from qlmctl.core.groups import GroupKey, RequestGroup
from qlmctl.errors import UserError
from qlmctl.policies.base import PolicyContext
from qlmctl.policies.qlm import PlanStats, QLMPolicy
from qlmctl.solvers import MilpSolver, MilpStatus
from simulator.profile import EngineProfile
from qlmctl.solvers.placement import (
    GroupState,
    LaneRate,
    LaneState,
    Plan,
    PlacementInputs,
    complete_plan,
    edf_within_stretches,
    evaluate,
    single_assignment,
)
from qlmctl.solvers.placement_milp import build_milp, candidate_lanes, default_runs, to_runs

logger = logging.getLogger("qlmctl.qlm_lp")


@dataclass
class QLMLPStats(PlanStats):
    """QLM's planning counters plus the program's."""

    solves: int = 0
    solves_optimal: int = 0
    solves_time_limit: int = 0
    """Stopped at the time limit (with or without a solution)."""
    solve_failures: int = 0
    """No usable solution (error, infeasible, none found in time): the heuristic's plan was kept."""
    solver_used: dict[str, int] = field(default_factory=dict)
    milp_plans_chosen: int = 0
    """Plans where the program's plan beat the heuristic's (and was used)."""
    on_time_gain: float = 0.0
    """Sum over those plans of the estimated requests on time beyond the heuristic's plan."""
    solve_s_total: float = 0.0
    solve_s_max: float = 0.0
    solve_s_mean: float = 0.0
    max_vars: int = 0
    max_constraints: int = 0
    notices: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class LPParams:
    chunks: int = 4
    runs_pad: int = 2
    max_runs: int = 8
    lanes_per_group: int = 4
    solve_interval_s: float = 5.0
    async_plan: bool = False
    mip_rel_gap: float = 1e-4
    mip_abs_gap: float = 0.25

    @classmethod
    def from_context(cls, ctx: PolicyContext) -> "LPParams":
        p = ctx.params
        default = cls()

        def num(name: str, kind: type, low: float, default_value: Any) -> Any:
            if name not in p:
                return default_value
            v: Any = p[name]
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or float(v).is_integer())
            if not ok or not v >= low or (kind is float and not math.isfinite(v)):
                kind_word = "a whole number" if kind is int else "a number"
                raise UserError(f"must be {kind_word} >= {low:g}", field=f"scheduler.params.{name}")
            return kind(v)

        async_plan = p.get("async_plan", ctx.realtime)  # off the loop when the clock is real
        if not isinstance(async_plan, bool):
            raise UserError("must be true or false", field="scheduler.params.async_plan")
        return cls(
            chunks=num("chunks", int, 1, default.chunks),
            runs_pad=num("runs_pad", int, 0, default.runs_pad),
            max_runs=num("max_runs", int, 1, default.max_runs),
            lanes_per_group=num("lanes_per_group", int, 1, default.lanes_per_group),
            solve_interval_s=num("solve_interval_s", float, 0.0, default.solve_interval_s),
            async_plan=async_plan,
            mip_rel_gap=num("mip_rel_gap", float, 0.0, default.mip_rel_gap),
            mip_abs_gap=num("mip_abs_gap", float, 0.0, default.mip_abs_gap),
        )


@dataclass(frozen=True, slots=True, eq=False)
class _Snapshot:
    """Placement inputs at one instant, with the group keys and instance ids they stand for."""

    inputs: PlacementInputs
    keys: list[GroupKey]
    instance_ids: list[int]

    def to_plan(self, vqs: dict[int, list[GroupKey]]) -> Plan:
        index = {k: g for g, k in enumerate(self.keys)}
        return [[index[k] for k in vqs.get(iid, []) if k in index] for iid in self.instance_ids]

    def to_vqs(self, plan: Plan) -> dict[int, list[GroupKey]]:
        return {iid: [self.keys[g] for g in lane] for iid, lane in zip(self.instance_ids, plan)}


@dataclass(frozen=True, slots=True)
class _Solved:
    """A finished solve: the plan it found (keyed, so it can outlive its snapshot) and its figures."""

    vqs: dict[int, list[GroupKey]] | None
    status: MilpStatus
    solver: str
    solve_s: float
    num_vars: int
    num_constraints: int


class QLMLPPolicy(QLMPolicy):
    """QLM with the global scheduler as a MILP (HiGHS or Gurobi), never worse than the heuristic's plan."""

    name: ClassVar[str] = "qlm-lp"

    def __init__(self, ctx: PolicyContext) -> None:
        super().__init__(ctx)
        self.params = LPParams.from_context(ctx)
        self.stats = QLMLPStats()  # type: ignore[assignment]
        self.solver = MilpSolver(
            ctx.solver,
            ctx.solver_time_limit_s,
            gurobi=ctx.gurobi,
            seed=ctx.seed,
            rel_gap=self.params.mip_rel_gap,
            abs_gap=self.params.mip_abs_gap,
            notify=self._notice,
        )
        self._next_solve = -math.inf
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[_Solved] | None = None

    def _notice(self, message: str) -> None:
        line = f"{self.name}: {message}"
        self.stats.notices.append(line)
        logger.warning(line)

    # ---------------------------------------------------------- schedule
    def schedule(self, cluster: ClusterView) -> list[Decision]:
        if self._pending is not None and self._pending.done():
            self._adopt(cluster, self._pending)
            self._pending = None
        return super().schedule(cluster)

    def plan_queues(self, cluster: ClusterView, now: float) -> dict[int, list[GroupKey]]:
        heuristic = super().plan_queues(cluster, now)
        snap = self._snapshot(cluster, now)
        if snap is None:
            return heuristic
        inp = snap.inputs
        heuristic_plan = snap.to_plan(heuristic)
        heuristic_score = evaluate(inp, heuristic_plan)
        if heuristic_score.on_time >= inp.max_on_time or now < self._next_solve or self._pending is not None:
            return heuristic
        self._next_solve = now + self.params.solve_interval_s
        if self.params.async_plan:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qlm-lp")
            self._pending = self._executor.submit(self._solve, snap, heuristic_plan)
            return heuristic
        solved = self._solve(snap, heuristic_plan)
        self._record(solved)
        if solved.vqs is None:
            return heuristic
        plan = edf_within_stretches(inp, complete_plan(inp, snap.to_plan(solved.vqs)))
        score = evaluate(inp, plan)
        # Adopt only for more requests on time: plans that win on the completion tie-break alone were
        # measured to hurt (W_B at 10 req/s: 91.7 % against the heuristic's 99.9 %).
        if score.on_time <= heuristic_score.on_time or score.objective <= heuristic_score.objective:
            return heuristic
        self.stats.milp_plans_chosen += 1
        self.stats.on_time_gain += score.on_time - heuristic_score.on_time
        return snap.to_vqs(plan)

    def _adopt(self, cluster: ClusterView, future: Future[_Solved]) -> None:
        """Take a background solve's plan if it beats the plan in use, scored on the state now."""
        try:
            solved = future.result()
        except Exception:  # noqa: BLE001 - a failed solve leaves the plan in use
            logger.exception("%s: background solve failed", self.name)
            self.stats.solve_failures += 1
            return
        self._record(solved)
        if solved.vqs is None:
            return
        now = cluster.now()
        snap = self._snapshot(cluster, now)
        if snap is None:
            return
        current = snap.to_plan(self.vqs)
        current_score = evaluate(snap.inputs, current)
        plan = edf_within_stretches(snap.inputs, complete_plan(snap.inputs, snap.to_plan(solved.vqs)))
        score = evaluate(snap.inputs, plan)
        if score.on_time > current_score.on_time and score.objective > current_score.objective:
            self.stats.milp_plans_chosen += 1
            self.stats.on_time_gain += score.on_time - current_score.on_time
            self.vqs = snap.to_vqs(plan)

    # ---------------------------------------------------------- the program
    def _solve(self, snap: _Snapshot, warm_plan: Plan) -> _Solved:
        """Build and solve the program from `snap` (thread-safe: reads only the snapshot)."""
        inp = snap.inputs
        p = self.params
        warm = single_assignment(warm_plan)
        needed = max((len(runs) for runs in to_runs(inp, warm)), default=0)
        runs = default_runs(len(inp.groups), inp.num_models, p.runs_pad, p.max_runs, needed)
        allowed = candidate_lanes(inp, warm, p.lanes_per_group)
        milp = build_milp(inp, runs, warm=warm, allowed=allowed)
        result = self.solver.solve(milp.problem)
        vqs = None
        if result.status.has_solution and result.x is not None:
            vqs = snap.to_vqs(milp.decode(result.x, len(inp.lanes)))
        return _Solved(vqs, result.status, result.solver, result.solve_s, milp.problem.num_vars,
                       milp.problem.num_constraints)

    def _record(self, solved: _Solved) -> None:
        st = self.stats
        st.solves += 1
        st.solver_used[solved.solver] = st.solver_used.get(solved.solver, 0) + 1
        st.solve_s_total += solved.solve_s
        st.solve_s_max = max(st.solve_s_max, solved.solve_s)
        st.solve_s_mean = st.solve_s_total / st.solves
        st.max_vars = max(st.max_vars, solved.num_vars)
        st.max_constraints = max(st.max_constraints, solved.num_constraints)
        if solved.status is MilpStatus.OPTIMAL:
            st.solves_optimal += 1
        elif solved.status in (MilpStatus.FEASIBLE, MilpStatus.NO_SOLUTION):
            st.solves_time_limit += 1
        if solved.vqs is None:
            st.solve_failures += 1

    # ---------------------------------------------------------- inputs
    def _snapshot(self, cluster: ClusterView, now: float) -> _Snapshot | None:
        """The estimator's view of lanes and groups, frozen; None when no group waits."""
        groups: list[RequestGroup] = [g for g in self.groups.values() if g.queue]
        if not groups:
            return None
        groups.sort(key=lambda g: (g.late, g.head_deadline(), g.key))
        lanes = self._lanes(cluster)
        models = sorted({g.model for g in groups} | {ln.model for ln in lanes if ln.model is not None})
        model_index = {m: j for j, m in enumerate(models)}
        rate_cache: dict[tuple[int, str], LaneRate] = {}
        rates: list[list[LaneRate | None]] = []
        load_s = np.full((len(lanes), len(models)), np.inf)
        for i, lane in enumerate(lanes):
            row: list[LaneRate | None] = []
            for j, m in enumerate(models):
                prof = lane.inst.profile_for(m)
                if prof is None:
                    row.append(None)
                    continue
                key = (id(prof), m)
                if key not in rate_cache:
                    rate_cache[key] = self._lane_rate(prof, m)
                row.append(rate_cache[key])
                load_s[i, j] = lane.inst.load_time(m)
            rates.append(row)
        lane_states = []
        for i, lane in enumerate(lanes):
            mi = model_index.get(lane.model) if lane.model is not None else None
            rate = rates[i][mi] if mi is not None else None
            drain = float(rate.completions(lane.ahead)) if rate is not None else 0.0
            lane_states.append(LaneState(lane.inst.instance_id, mi, lane.offset_s, drain))
        keys: list[GroupKey] = []
        states: list[GroupState] = []
        for g in groups:
            j = model_index[g.model]
            if not any(row[j] is not None for row in rates):
                continue  # no instance can host it: the heuristic leaves it out too
            deadlines = np.fromiter((r.deadline_s for r in g.queue), dtype=np.float64, count=len(g.queue)) - now
            keys.append(g.key)
            states.append(GroupState(j, deadlines, late=g.late))
        if not states:
            return None
        inputs = PlacementInputs(lane_states, states, rates, load_s, self.params.chunks)
        return _Snapshot(inputs, keys, [ln.inst.instance_id for ln in lanes])

    def _lane_rate(self, profile: EngineProfile, model: str) -> LaneRate:
        """The estimator's service rate of `model` on `profile`, as the placement model takes it."""
        rate = self.est.rate(profile, model)
        return LaneRate(rate.request_time_s / rate.concurrency, rate.spread, rate.concurrency)

    def close(self) -> None:
        """Stop the worker thread (live mode) and release the solver."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self.solver.close()
