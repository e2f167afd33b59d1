"""The placement model (`qlmctl.solvers.placement`) as a mixed-integer program, in sparse matrix form.

A lane's plan is a sequence of runs; a run serves one model and keeps its groups in canonical order. See
`build_milp` for the variables, the rows, and when the program's optimum is the best plan's `evaluate`
objective.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from qlmctl.solvers.milp import MilpProblem
from qlmctl.solvers.placement import LaneCursor, PlacementInputs, Plan

if TYPE_CHECKING:
    import scipy.sparse as sp


def canonical_order(inp: PlacementInputs, lane: int) -> list[int]:
    """Groups `lane` can host, in the order the program keeps inside a run: by due date (latest head
    start for the whole group on time, plus its duration: earliest-due-date order meets every start
    deadline a run can meet), the late group last."""
    coef = inp.coef
    keys = []
    for g in range(len(inp.groups)):
        d = coef.duration[g, lane]
        if not np.isfinite(d):
            continue
        has = coef.weight[g] > 0
        due = float(coef.threshold[g, lane][has].min()) + d if has.any() else math.inf
        keys.append((due, g))
    return [g for _, g in sorted(keys)]


def to_runs(inp: PlacementInputs, plan: Sequence[Sequence[int]]) -> list[list[list[int]]]:
    """Each lane of a plan (no split groups) cut into runs: maximal stretches of one model, in canonical
    order."""
    out = []
    for i, lane in enumerate(plan):
        rank = {g: j for j, g in enumerate(canonical_order(inp, i))}
        runs: list[list[int]] = []
        for g in lane:
            if runs and inp.groups[runs[-1][-1]].model == inp.groups[g].model and rank[runs[-1][-1]] < rank[g]:
                runs[-1].append(g)
            else:
                runs.append([g])
        out.append(runs)
    return out


def default_runs(num_groups: int, num_models: int, pad: int, cap: int, needed: int = 0) -> int:
    """Runs per lane: one per model plus `pad`, at most `cap`; at least `needed` (what the warm start takes);
    never more than the groups."""
    return max(1, min(num_groups, max(needed, min(cap, num_models + pad))))


@dataclass(frozen=True, slots=True, eq=False)
class PlacementMilp:
    """The program, and where its variables sit (to read a solution back or write a start)."""

    problem: MilpProblem
    runs: int
    pair_group: np.ndarray
    """Group of each pair a = (group, lane that can host it), lane-major, canonical order inside a lane."""
    pair_lane: np.ndarray
    model_pair: np.ndarray
    """model_pair[lane, model]: index b of the (lane, model) pair, -1 where not hosted."""
    credit: np.ndarray
    """(pair, run, chunk) of each on-time variable y, as rows."""
    offsets: dict[str, int]

    def decode(self, x: np.ndarray, num_lanes: int) -> Plan:
        """The plan a solution encodes: each lane's runs in order, each run in canonical order."""
        n_r = self.runs
        o = self.offsets["x"]
        xs = x[o : o + self.pair_group.shape[0] * n_r].reshape(-1, n_r) > 0.5
        plan: Plan = [[] for _ in range(num_lanes)]
        for r in range(n_r):
            for a in np.nonzero(xs[:, r])[0].tolist():  # pairs are in canonical order per lane
                plan[int(self.pair_lane[a])].append(int(self.pair_group[a]))
        return plan


class _Rows:
    """Accumulates sparse rows block by block (COO triplets and row bounds)."""

    def __init__(self) -> None:
        self.rows: list[np.ndarray] = []
        self.cols: list[np.ndarray] = []
        self.vals: list[np.ndarray] = []
        self.lo: list[np.ndarray] = []
        self.hi: list[np.ndarray] = []
        self.count = 0

    def block(self, n: int, lower: np.ndarray | float, upper: np.ndarray | float) -> np.ndarray:
        """Open a block of `n` rows with these bounds; returns their indices."""
        base = self.count
        self.count += n
        self.lo.append(np.broadcast_to(np.asarray(lower, dtype=np.float64), (n,)))
        self.hi.append(np.broadcast_to(np.asarray(upper, dtype=np.float64), (n,)))
        return base + np.arange(n)

    def add(self, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray | float) -> None:
        self.rows.append(np.asarray(rows, dtype=np.int64))
        self.cols.append(np.asarray(cols, dtype=np.int64))
        self.vals.append(np.broadcast_to(np.asarray(vals, dtype=np.float64), np.shape(rows)))

    def matrix(self, n_col: int) -> tuple["sp.csr_matrix", np.ndarray, np.ndarray]:
        import scipy.sparse as sp

        m = sp.csr_matrix(
            (np.concatenate(self.vals), (np.concatenate(self.rows), np.concatenate(self.cols))),
            shape=(self.count, n_col),
        )
        m.sum_duplicates()
        return m, np.concatenate(self.lo), np.concatenate(self.hi)


def candidate_lanes(inp: PlacementInputs, plan: Sequence[Sequence[int]], per_group: int) -> np.ndarray:
    """allowed[g, i]: the lanes the program may put group g on: the `per_group` lanes where it could start
    soonest if it came next (no swap first, then readiness), and any lane `plan` has it on."""
    n_g, n_i = len(inp.groups), len(inp.lanes)
    hosted = np.isfinite(inp.coef.duration)
    if per_group >= n_i:
        return hosted
    soon = np.array([ln.ready_s + ln.drain_s for ln in inp.lanes])
    lane_model = np.array([-1 if ln.model is None else ln.model for ln in inp.lanes])
    allowed = np.zeros((n_g, n_i), dtype=bool)
    for g, grp in enumerate(inp.groups):
        swap = np.where(lane_model == grp.model, 0.0, inp.load_s[:, grp.model])
        order = np.lexsort((np.arange(n_i), soon + swap))
        allowed[g, [i for i in order if hosted[g, i]][:per_group]] = True
    for i, lane in enumerate(plan):
        allowed[list(lane), i] = True
    return allowed & hosted


def build_milp(
    inp: PlacementInputs,
    runs: int,
    warm: Sequence[Sequence[int]] | None = None,
    allowed: np.ndarray | None = None,
) -> PlacementMilp:
    """The placement program with `runs` runs per lane, as one sparse matrix.

    A lane's plan is a sequence of runs; a run serves one model, its groups in canonical order. Two runs
    in a row may serve the same model (no swap between them), so with twice as many runs as model
    stretches every plan is matched or beaten, on-time requests and completion alike, when a group is
    one chunk (exchange argument: move a stretch's late groups to a run after it, sort the rest by due
    date); with more chunks the program covers the plans whose stretches are in canonical order.

    Variables (i lane, r run, k chunk; a = (group, lane) pair that can host it; b = (lane, model) pair):

    - x[a, r] binary: the group is in run r of the lane; w[g]: the group is left out.
    - z[b, r] binary: run r serves the model; sigma[b, r] in [0, 1]: the lane swaps to the model at r.
    - RE[i, r]: all work up to the end of run r completed; RH[i, r]: head start of the run's first group.
    - W[a, r]: durations of the run's groups before this one (canonical order).
    - y[a, r, k] binary: chunk k is on time (only where in doubt; elsewhere x earns the credit).

    Minimises -(credited requests) + eps * (sum of each lane's final RE + horizon per group left out).
    `allowed[g, i]` (default: every lane that can host g) limits the lanes a group may go to.
    """
    coef = inp.coef
    n_g, n_i, n_r, n_m = len(inp.groups), len(inp.lanes), runs, inp.num_models
    group_model = np.array([g.model for g in inp.groups], dtype=np.int64)
    hosted = np.isfinite(coef.duration) if allowed is None else np.isfinite(coef.duration) & allowed
    orders = [[g for g in canonical_order(inp, i) if hosted[g, i]] for i in range(n_i)]
    pair_group = np.array([g for order in orders for g in order], dtype=np.int64)
    pair_lane = np.array([i for i, order in enumerate(orders) for _ in order], dtype=np.int64)
    n_a = pair_group.shape[0]
    host_lane, host_model = np.nonzero(_hostable(inp))
    n_b = host_lane.shape[0]
    model_pair = np.full((n_i, n_m), -1, dtype=np.int64)
    model_pair[host_lane, host_model] = np.arange(n_b)
    horizon = coef.horizon_s
    ready = np.array([ln.ready_s for ln in inp.lanes])
    start_e = ready + np.array([ln.drain_s for ln in inp.lanes])
    lane_model = np.array([-1 if ln.model is None else ln.model for ln in inp.lanes], dtype=np.int64)
    # Latest possible end of run r: everything the lane can host, and r + 1 loads.
    dur = np.where(hosted, coef.duration, 0.0)
    max_load = np.where(np.isfinite(inp.load_s), inp.load_s, 0.0).max(axis=1, initial=0.0)
    e_max = (start_e + dur.sum(axis=0))[:, None] + (np.arange(n_r)[None, :] + 1) * max_load[:, None]

    # x (and W) columns: (a, r), pair-major.
    xa = np.repeat(np.arange(n_a), n_r)
    xr = np.tile(np.arange(n_r), n_a)
    xg, xi = pair_group[xa], pair_lane[xa]
    xm = group_model[xg]
    xb = model_pair[xi, xm]
    x_run = xi * n_r + xr
    tau = coef.threshold[xg, xi]
    weight = coef.weight[xg]
    x_emax = e_max[xi, xr]
    doubt = (weight > 0) & (tau < x_emax[:, None])
    certain_credit = np.where((weight > 0) & ~doubt, weight, 0.0).sum(axis=1)
    cx, ck = np.nonzero(doubt)
    n_y = cx.shape[0]

    off = {"x": 0}
    off["w"] = off["x"] + n_a * n_r
    off["z"] = off["w"] + n_g
    off["sigma"] = off["z"] + n_b * n_r
    off["RE"] = off["sigma"] + n_b * n_r
    off["RH"] = off["RE"] + n_i * n_r
    off["W"] = off["RH"] + n_i * n_r
    off["y"] = off["W"] + n_a * n_r
    n_col = off["y"] + n_y
    xcol = off["x"] + np.arange(n_a * n_r)
    wcol = off["W"] + np.arange(n_a * n_r)
    ycol = off["y"] + np.arange(n_y)
    zb = np.repeat(np.arange(n_b), n_r)
    zr = np.tile(np.arange(n_r), n_b)
    zcol = off["z"] + np.arange(n_b * n_r)
    scol = off["sigma"] + np.arange(n_b * n_r)
    z_lane, z_model = host_lane[zb], host_model[zb]
    z_run = z_lane * n_r + zr
    z_load = inp.load_s[z_lane, z_model]
    z_lag = coef.lag[z_lane, z_model]
    run = np.arange(n_i * n_r)
    run_lane, run_pos = run // n_r, run % n_r
    has_prev = run_pos > 0
    re_col, rh_col = off["RE"] + run, off["RH"] + run
    z_next = zr + 1 < n_r

    rb = _Rows()
    # Each group once, or left out.
    rows = rb.block(n_g, 1.0, 1.0)
    rb.add(rows[xg], xcol, 1.0)
    rb.add(rows, off["w"] + np.arange(n_g), 1.0)
    # A group only in a run of its model.
    rows = rb.block(n_a * n_r, -np.inf, 0.0)
    rb.add(rows, xcol, 1.0)
    rb.add(rows, off["z"] + xb * n_r + xr, -1.0)
    # One model per run; runs used in order.
    rows = rb.block(n_i * n_r, -np.inf, np.where(has_prev, 0.0, 1.0))
    rb.add(rows[z_run], zcol, 1.0)
    rb.add(rows[z_run[z_next] + 1], zcol[z_next], -1.0)
    # A swap to the model at r when r serves it and r - 1 (or the loaded model, at r = 0) does not.
    first_rhs = (z_model == lane_model[z_lane]).astype(np.float64)
    rows = rb.block(n_b * n_r, -np.inf, np.where(zr == 0, first_rhs, 0.0))
    rb.add(rows, zcol, 1.0)
    rb.add(rows[z_next] + 1, zcol[z_next], -1.0)
    rb.add(rows, scol, -1.0)
    # RE[i,r] = RE[i,r-1] + durations + loads, RE[i,-1] = ready + drain.
    re_rhs = np.where(has_prev, 0.0, start_e[run_lane])
    rows = rb.block(n_i * n_r, re_rhs, re_rhs)
    rb.add(rows, re_col, 1.0)
    rb.add(rows[has_prev], re_col[has_prev] - 1, -1.0)
    rb.add(rows[x_run], xcol, -coef.duration[xg, xi])
    rb.add(rows[z_run], scol, -z_load)
    # RH[i,r] >= RE[i,r-1] + load after a swap, RE[i,r-1] - lag otherwise; RH in run order.
    rows = rb.block(n_i * n_r, -np.inf, np.where(has_prev, 0.0, -start_e[run_lane]))
    rb.add(rows, rh_col, -1.0)
    rb.add(rows[has_prev], re_col[has_prev] - 1, 1.0)
    rb.add(rows[z_run], scol, z_load + z_lag)
    rb.add(rows[z_run], zcol, -z_lag)
    prev = run[has_prev]
    rows = rb.block(prev.shape[0], 0.0, np.inf)
    rb.add(rows, off["RH"] + prev, 1.0)
    rb.add(rows, off["RH"] + prev - 1, -1.0)
    # W[a,r] = W[a-1,r] + d[a-1] x[a-1,r] along the lane's canonical order (W = 0 for its first pair).
    first_of_lane = np.r_[True, pair_lane[1:] != pair_lane[:-1]] if n_a else np.zeros(0, dtype=bool)
    rows = rb.block(n_a * n_r, 0.0, 0.0)
    rb.add(rows, wcol, 1.0)
    later = ~first_of_lane[xa]
    rb.add(rows[later], wcol[later] - n_r, -1.0)
    prev_pair = xa[later] - 1
    rb.add(rows[later], xcol[later] - n_r, -coef.duration[pair_group[prev_pair], pair_lane[prev_pair]])
    if n_y:
        # y <= x; y = 1 only if the group's head starts by the chunk's threshold. The head is the later of
        # RH (the run's first head) and RE[r-1] + load + W - lag (its own turn); big-M = latest - threshold.
        t = tau[cx, ck]
        latest = x_emax[cx]
        big_m = latest - t
        yi, yr = xi[cx], xr[cx]
        rows = rb.block(n_y, -np.inf, 0.0)
        rb.add(rows, ycol, 1.0)
        rb.add(rows, xcol[cx], -1.0)
        rows = rb.block(n_y, -np.inf, latest)
        rb.add(rows, rh_col[yi * n_r + yr], 1.0)
        rb.add(rows, ycol, big_m)
        lag = coef.lag[yi, xm[cx]]
        later_run = yr > 0
        rows = rb.block(n_y, -np.inf, latest + lag - np.where(later_run, 0.0, start_e[yi]))
        rb.add(rows[later_run], re_col[yi * n_r + yr][later_run] - 1, 1.0)
        rb.add(rows, off["sigma"] + xb[cx] * n_r + yr, inp.load_s[yi, xm[cx]])
        rb.add(rows, wcol[cx], 1.0)
        rb.add(rows, ycol, big_m)
    matrix, row_lo, row_hi = rb.matrix(n_col)

    eps = inp.eps
    cost = np.zeros(n_col)
    cost[xcol] = -certain_credit
    cost[ycol] = -weight[cx, ck]
    cost[off["RE"] + np.arange(n_i) * n_r + n_r - 1] = eps  # each lane's final RE
    cost[off["w"] : off["z"]] = eps * horizon
    col_lower = np.zeros(n_col)
    col_lower[off["RH"] : off["W"]] = np.repeat(ready, n_r)
    col_upper = np.full(n_col, np.inf)
    col_upper[: off["RE"]] = 1.0
    col_upper[off["RE"] : off["RH"]] = e_max.reshape(-1)
    col_upper[off["RH"] : off["W"]] = e_max.reshape(-1)
    col_upper[off["y"] :] = 1.0
    integral = np.zeros(n_col, dtype=bool)
    integral[xcol] = True
    integral[zcol] = True
    integral[ycol] = True
    credit = np.stack([xa[cx], xr[cx], ck], axis=1) if n_y else np.zeros((0, 3), dtype=np.int64)
    problem = MilpProblem(cost, matrix, row_lo, row_hi, col_lower, col_upper, integral)
    milp = PlacementMilp(problem, n_r, pair_group, pair_lane, model_pair, credit, off)
    if warm is not None:
        start = _start_vector(inp, milp, warm)
        milp = PlacementMilp(
            MilpProblem(cost, matrix, row_lo, row_hi, col_lower, col_upper, integral, start),
            n_r, pair_group, pair_lane, model_pair, credit, off,
        )
    return milp


def _hostable(inp: PlacementInputs) -> np.ndarray:
    return np.array([[r is not None for r in row] for row in inp.rates], dtype=bool).reshape(
        len(inp.lanes), inp.num_models)


def _start_vector(inp: PlacementInputs, milp: PlacementMilp, plan: Sequence[Sequence[int]]) -> np.ndarray:
    """The program's variables for a plan without split groups, cut into at most `runs` runs per lane.

    Raises:
        ValueError: a lane needs more runs than the program has, or a group is listed twice.
    """
    off = milp.offsets
    coef = inp.coef
    n_r = milp.runs
    x = np.zeros(milp.problem.num_vars)
    pair_of = {(int(g), int(i)): a for a, (g, i) in enumerate(zip(milp.pair_group, milp.pair_lane))}
    y_of = {(int(a), int(r), int(k)): j for j, (a, r, k) in enumerate(milp.credit)}
    placed: set[int] = set()
    for i, runs in enumerate(to_runs(inp, plan)):
        if len(runs) > n_r:
            raise ValueError(f"warm start needs {len(runs)} runs on lane {i}, the program has {n_r}")
        cur = LaneCursor(inp, i)
        for r in range(n_r):
            ri = i * n_r + r
            groups = runs[r] if r < len(runs) else []
            if not groups:
                cur.head_s = max(cur.head_s, cur.end_s)
                x[off["RH"] + ri] = cur.head_s
                x[off["RE"] + ri] = cur.end_s
                continue
            m = inp.groups[groups[0]].model
            b = milp.model_pair[i, m]
            x[off["z"] + b * n_r + r] = 1.0
            if m != cur.model:
                x[off["sigma"] + b * n_r + r] = 1.0
            for j, g in enumerate(groups):
                if g in placed:
                    raise ValueError("warm start lists a group twice")
                placed.add(g)
                a = pair_of.get((g, i))
                if a is None:
                    raise ValueError(f"warm start puts group {g} on lane {i}, which it may not use")
                head, _, _ = cur.push(g)
                if j == 0:
                    x[off["RH"] + ri] = head
                x[off["x"] + a * n_r + r] = 1.0
                for k in range(inp.chunks):
                    jy = y_of.get((a, r, k))
                    if jy is not None:
                        x[off["y"] + jy] = float(head <= coef.threshold[g, i, k])
            x[off["RE"] + ri] = cur.end_s
        # W: durations of the run's groups before each pair, in canonical order (the rows fix it).
        lane_pairs = np.nonzero(milp.pair_lane == i)[0]
        for r in range(n_r):
            acc = 0.0
            for a in lane_pairs.tolist():
                x[off["W"] + a * n_r + r] = acc
                acc += coef.duration[milp.pair_group[a], i] * x[off["x"] + a * n_r + r]
    for g in range(len(inp.groups)):
        if g not in placed:
            x[off["w"] + g] = 1.0
    return x


__all__ = ["PlacementMilp", "build_milp", "candidate_lanes", "canonical_order", "default_runs", "to_runs"]
