"""Group placement: the plan model shared by the MILP and the scorer of any plan.

A plan puts request groups, in order, on the lanes (virtual queues) of the serving instances. Its value is
estimated with the RWT estimator's figures, frozen into `PlacementInputs`:

- A lane starts at `ready_s` (the rest of a model load under way) with work already on it that has all
  completed `drain_s` later.
- Groups run in lane order. `E` is the time the lane's work, up to and including a group, has all completed:
  each group adds its duration (its requests' completions at the estimator's percentile), and a model swap
  adds the model's load time. A swap happens at a group whose model differs from the one before it (or,
  for the first group, from the model loaded now); it needs the lane drained first.
- A group's head starts at `h`: right after the swap when there is one; else once the work ahead has freed
  a batch slot, `E_prev - lag` (lag: the time the last batch of the work ahead overlaps the next request),
  and never before the group ahead's head.
- Request j of a group starts `completions(j)` after the head; it is on time when that is before its
  deadline. Requests are taken in `chunks` contiguous chunks per group (a chunk counts when all of it is
  on time); requests of the late group count for nothing.

Objective (maximised): requests on time, minus `eps` times the sum over lanes of the time their work has
all completed (plus `horizon_s` per group left out). `eps` keeps the second term under half a request, so
it only breaks ties: it prefers earlier completion.

`evaluate` scores any plan (a group may sit on several lanes, as replicas sharing its queue: lane l of k
takes its requests l, l+k, ...); `qlmctl.solvers.placement_milp.build_milp` writes the same model as a
mixed-integer program. Everything here is plain numbers: safe to use from a worker thread.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


Plan = list[list[int]]
"""Group indices per lane, in lane order."""


@dataclass(frozen=True, slots=True)
class LaneRate:
    """How fast one lane serves one model (the RWT estimator's `completions_time`, vectorised)."""

    slot_s: float
    """Time per request completion at full concurrency (request time / concurrency)."""
    spread: float
    """Percentile term: z * std / mean of the output length."""
    concurrency: int

    @property
    def lag_s(self) -> float:
        """How long the last batch of the work ahead overlaps the next request of the same model."""
        return (self.concurrency - 1) * self.slot_s

    def completions(self, n: np.ndarray | float) -> np.ndarray:
        """Time for `n` request completions (0 for n <= 0)."""
        n = np.maximum(np.asarray(n, dtype=np.float64), 0.0)
        return np.maximum(n + self.spread * np.sqrt(n), 0.0) * self.slot_s


@dataclass(frozen=True, slots=True)
class LaneState:
    instance_id: int
    model: int | None
    """Index of the model loaded (or loading) now; None when nothing is."""
    ready_s: float
    """Seconds until the lane serves (the rest of a model load under way)."""
    drain_s: float
    """Seconds, after `ready_s`, until the work already on the lane has all completed."""


@dataclass(frozen=True, slots=True)
class GroupState:
    model: int
    deadlines_s: np.ndarray
    """TTFT deadlines of the queued requests in queue order, relative to now."""
    late: bool = False
    """The late group: its requests are misses whatever happens, they count for nothing."""

    @property
    def size(self) -> int:
        return int(self.deadlines_s.shape[0])


@dataclass(frozen=True, slots=True, eq=False)
class PlacementInputs:
    """A frozen snapshot of what the estimator says about the lanes and the groups."""

    lanes: list[LaneState]
    groups: list[GroupState]
    rates: list[list[LaneRate | None]]
    """rates[lane][model]; None where the lane cannot host the model."""
    load_s: np.ndarray
    """load_s[lane, model]: seconds to swap to the model (inf where it cannot be hosted)."""
    chunks: int = 4
    coef: "_Coefficients" = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "coef", _coefficients(self))

    @property
    def num_models(self) -> int:
        return int(self.load_s.shape[1])

    @property
    def horizon_s(self) -> float:
        return self.coef.horizon_s

    @property
    def eps(self) -> float:
        """Weight of the completion term: keeps it under half a request."""
        return 0.5 / ((len(self.groups) + len(self.lanes) + 1) * self.coef.horizon_s)

    @property
    def max_on_time(self) -> float:
        """Requests that could be on time at best (all but the late ones)."""
        return float(self.coef.weight.sum())

    def hosts(self, lane: int, group: int) -> bool:
        return self.rates[lane][self.groups[group].model] is not None


@dataclass(frozen=True, slots=True, eq=False)
class _Coefficients:
    duration: np.ndarray
    """duration[g, i]: seconds lane i needs for all of group g (inf where it cannot host it)."""
    threshold: np.ndarray
    """threshold[g, i, k]: latest head start on lane i at which chunk k of group g is on time."""
    weight: np.ndarray
    """weight[g, k]: requests in chunk k of group g (0 for the late group)."""
    lag: np.ndarray
    """lag[i, m]: LaneRate.lag_s (0 where not hosted)."""
    horizon_s: float
    """An upper bound on any `E` of a plan without split groups."""


def _chunk_bounds(n: int, chunks: int) -> np.ndarray:
    """Start index of each of `chunks` contiguous, nearly equal chunks of n items (empty ones at the end)."""
    k = min(chunks, n)
    starts = np.array([(j * n) // k for j in range(k)], dtype=np.int64) if k else np.zeros(0, np.int64)
    return starts


def _portion_coefficients(
    g: GroupState, rate: LaneRate, chunks: int, portion: slice = slice(None)
) -> tuple[float, np.ndarray, np.ndarray]:
    """(duration, thresholds[chunks], weights[chunks]) of `g`'s requests in `portion` on a lane at `rate`."""
    dl = g.deadlines_s[portion]
    n = int(dl.shape[0])
    thresholds = np.full(chunks, np.inf)
    weights = np.zeros(chunks)
    duration = float(rate.completions(n))
    if n == 0 or g.late:
        return duration, thresholds, weights
    slack = dl - rate.completions(np.arange(n, dtype=np.float64))
    starts = _chunk_bounds(n, chunks)
    k = starts.shape[0]
    thresholds[:k] = np.minimum.reduceat(slack, starts)
    weights[:k] = np.diff(np.append(starts, n))
    return duration, thresholds, weights


def _coefficients(inp: PlacementInputs) -> _Coefficients:
    n_groups, n_lanes, k = len(inp.groups), len(inp.lanes), inp.chunks
    duration = np.full((n_groups, n_lanes), np.inf)
    threshold = np.full((n_groups, n_lanes, k), np.inf)
    weight = np.zeros((n_groups, k))
    lag = np.zeros((n_lanes, inp.num_models))
    for i, row in enumerate(inp.rates):
        for m, rate in enumerate(row):
            if rate is not None:
                lag[i, m] = rate.lag_s
    cache: dict[tuple[int, int], tuple[float, np.ndarray, np.ndarray]] = {}
    for g, grp in enumerate(inp.groups):
        for i in range(n_lanes):
            rate = inp.rates[i][grp.model]
            if rate is None:
                continue
            key = (g, id(rate))
            if key not in cache:
                cache[key] = _portion_coefficients(grp, rate, k)
            duration[g, i], threshold[g, i], w = cache[key]
            weight[g] = w
    finite_load = inp.load_s[np.isfinite(inp.load_s)]
    max_load = float(finite_load.max(initial=0.0))
    start = max((ln.ready_s + ln.drain_s for ln in inp.lanes), default=0.0)
    d = np.where(np.isfinite(duration), duration, 0.0).max(axis=1, initial=0.0)
    horizon = start + float(d.sum()) + (n_groups + 1) * (max_load + float(lag.max(initial=0.0))) + 1.0
    return _Coefficients(duration, threshold, weight, lag, horizon)


# ------------------------------------------------------------------ scoring


@dataclass(frozen=True, slots=True)
class PlanScore:
    on_time: float
    """Requests estimated to meet their deadline."""
    completion_s: float
    """Sum over lanes of the time their work has all completed, plus horizon_s per group left out."""
    unplaced: int
    objective: float
    """on_time - eps * completion_s: the value both the MILP and the choice between plans maximise."""


class LaneCursor:
    """Walks one lane's groups in order, keeping the recurrence's state (E, h, model)."""

    __slots__ = ("inp", "lane", "end_s", "head_s", "model")

    def __init__(self, inp: PlacementInputs, lane: int) -> None:
        st = inp.lanes[lane]
        self.inp = inp
        self.lane = lane
        self.end_s = st.ready_s + st.drain_s
        self.head_s = st.ready_s
        self.model = st.model

    def peek(self, group: int, duration: float | None = None) -> tuple[float, float, bool]:
        """(head start, end, swap) if `group` (or a portion of it lasting `duration`) came next."""
        m = self.inp.groups[group].model
        d = self.inp.coef.duration[group, self.lane] if duration is None else duration
        if m != self.model:
            load = float(self.inp.load_s[self.lane, m])
            return max(self.head_s, self.end_s + load), self.end_s + load + d, True
        return max(self.head_s, self.end_s - self.inp.coef.lag[self.lane, m]), self.end_s + d, False

    def push(self, group: int, duration: float | None = None) -> tuple[float, float, bool]:
        head, end, swap = self.peek(group, duration)
        self.head_s, self.end_s, self.model = head, end, self.inp.groups[group].model
        return head, end, swap


def on_time_weight(thresholds: np.ndarray, weights: np.ndarray, head_s: float) -> float:
    return float(weights[head_s <= thresholds].sum())


def evaluate(inp: PlacementInputs, plan: Sequence[Sequence[int]]) -> PlanScore:
    """Score `plan` (group indices per lane, in order) under the placement model.

    A group listed on several lanes is split over them (replicas sharing its queue); a repeat on the same
    lane is ignored; a group on no lane is left out (no on-time credit, completion at the horizon).
    """
    coef = inp.coef
    lanes_of: dict[int, list[int]] = {}
    for i, entries in enumerate(plan):
        for g in dict.fromkeys(entries):
            lanes_of.setdefault(g, []).append(i)
    on_time = 0.0
    total = 0.0
    for i in range(len(inp.lanes)):
        entries = plan[i] if i < len(plan) else ()
        cur = LaneCursor(inp, i)
        for g in dict.fromkeys(entries):
            where = lanes_of[g]
            if len(where) == 1:
                head, end, _ = cur.push(g)
                th, w = coef.threshold[g, i], coef.weight[g]
            else:
                rate = inp.rates[i][inp.groups[g].model]
                assert rate is not None
                share = slice(where.index(i), None, len(where))
                d, th, w = _portion_coefficients(inp.groups[g], rate, inp.chunks, share)
                head, end, _ = cur.push(g, d)
            on_time += on_time_weight(th, w, head)
        total += cur.end_s
    unplaced = sum(1 for g in range(len(inp.groups)) if g not in lanes_of)
    total += unplaced * inp.horizon_s
    return PlanScore(on_time, total, unplaced, on_time - inp.eps * total)


def complete_plan(inp: PlacementInputs, plan: Sequence[Sequence[int]]) -> Plan:
    """`plan` with every group it leaves out inserted, one by one, where it scores best (the earliest such
    place on ties, as a fresh plan would put an urgent newcomer first)."""
    out = [list(dict.fromkeys(lane)) for lane in plan]
    out += [[] for _ in range(len(inp.lanes) - len(out))]
    placed = {g for lane in out for g in lane}
    for g in range(len(inp.groups)):
        if g in placed:
            continue
        best: tuple[float, int, int] | None = None
        for i, lane in enumerate(out):
            if not inp.hosts(i, g):
                continue
            base = _lane_value(inp, i, lane)
            for p in range(len(lane) + 1):
                gain = _lane_value(inp, i, lane[:p] + [g] + lane[p:]) - base
                if best is None or gain > best[0] + 1e-12:
                    best = (gain, i, p)
        if best is not None:
            out[best[1]].insert(best[2], g)
    return out


def _lane_value(inp: PlacementInputs, lane: int, groups: Sequence[int]) -> float:
    """On-time requests minus eps times the end, for one lane run alone (no split groups)."""
    cur = LaneCursor(inp, lane)
    on_time = 0.0
    for g in groups:
        head, _, _ = cur.push(g)
        on_time += on_time_weight(inp.coef.threshold[g, lane], inp.coef.weight[g], head)
    return on_time - inp.eps * cur.end_s


def edf_within_stretches(inp: PlacementInputs, plan: Sequence[Sequence[int]]) -> Plan:
    """`plan` with each lane's stretches of one model reordered earliest head deadline first (the late
    group last), where that scores no worse.

    The model sees a lane as `concurrency` parallel slots, so groups that fit in the batch together score
    the same in any order; the engine admits them in queue order, though, and requests arriving later
    wait behind whatever was queued first. Earliest deadline first is the robust choice among equals.
    """
    out: Plan = []
    for lane in plan:
        sorted_lane: list[int] = []
        stretch: list[int] = []
        for g in list(lane) + [-1]:
            if stretch and (g < 0 or inp.groups[g].model != inp.groups[stretch[-1]].model):
                stretch.sort(key=lambda j: (inp.groups[j].late, _head_deadline(inp.groups[j]), j))
                sorted_lane += stretch
                stretch = []
            if g >= 0:
                stretch.append(g)
        out.append(sorted_lane)
    if evaluate(inp, out).objective >= evaluate(inp, plan).objective:
        return out
    return [list(lane) for lane in plan]


def _head_deadline(g: GroupState) -> float:
    return float(g.deadlines_s[0]) if g.size else math.inf


def single_assignment(plan: Sequence[Sequence[int]]) -> Plan:
    """`plan` with each group kept only on the first lane listing it (once)."""
    seen: set[int] = set()
    out: Plan = []
    for lane in plan:
        kept = []
        for g in lane:
            if g not in seen:
                kept.append(g)
                seen.add(g)
        out.append(kept)
    return out


__all__ = [
    "GroupState", "LaneCursor", "LaneRate", "LaneState", "Plan", "PlacementInputs", "PlanScore", "complete_plan",
    "edf_within_stretches", "evaluate", "on_time_weight", "single_assignment",
]
