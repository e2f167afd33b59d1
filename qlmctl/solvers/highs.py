"""HiGHS back end (highspy): the open solver, always available."""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time

import numpy as np

from qlmctl.solvers.milp import MilpProblem, MilpResult, MilpStatus

_banner_lock = threading.Lock()
_banner_done = False


def _new_highs():  # -> highspy.Highs
    """A silent Highs object. HiGHS prints a banner to stdout on the first construction in a process,
    before any option can be set, so that one construction runs with fd 1 pointed at /dev/null."""
    import highspy

    global _banner_done
    with _banner_lock:
        if _banner_done:
            h = highspy.Highs()
        else:
            sys.stdout.flush()
            saved = os.dup(1)
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, 1)
                h = highspy.Highs()
                try:
                    ctypes.CDLL(None).fflush(None)
                except (OSError, AttributeError):
                    pass
            finally:
                os.dup2(saved, 1)
                os.close(saved)
                os.close(devnull)
            _banner_done = True
    h.setOptionValue("output_flag", False)
    return h


def solve_highs(
    problem: MilpProblem,
    time_limit_s: float,
    *,
    seed: int = 0,
    rel_gap: float = 1e-4,
    abs_gap: float = 1e-6,
    presolve: bool = False,
) -> MilpResult:
    """Solve `problem` with HiGHS within `time_limit_s`, starting from `problem.start` when given.

    Presolve is off by default: on the placement programs it costs more than it saves, and with it HiGHS
    reaches its improving sub-MIP heuristics later (measured in bench/bench_milp.py).
    """
    import highspy

    t0 = time.perf_counter()
    h = _new_highs()
    for name, value in (
        ("time_limit", float(time_limit_s)),
        ("mip_rel_gap", float(rel_gap)),
        ("mip_abs_gap", float(abs_gap)),
        ("random_seed", int(seed) % (2**31 - 1)),
        ("threads", 1),
        ("presolve", "on" if presolve else "off"),
    ):
        h.setOptionValue(name, value)
    a = problem.matrix.tocsr()
    lp = highspy.HighsLp()
    lp.num_col_ = problem.num_vars
    lp.num_row_ = problem.num_constraints
    inf = highspy.kHighsInf
    lp.col_cost_ = problem.cost.astype(np.float64)
    lp.col_lower_ = np.where(np.isinf(problem.col_lower), -inf, problem.col_lower)
    lp.col_upper_ = np.where(np.isinf(problem.col_upper), inf, problem.col_upper)
    lp.row_lower_ = np.where(np.isinf(problem.row_lower), -inf, problem.row_lower)
    lp.row_upper_ = np.where(np.isinf(problem.row_upper), inf, problem.row_upper)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    lp.a_matrix_.num_col_ = problem.num_vars
    lp.a_matrix_.num_row_ = problem.num_constraints
    lp.a_matrix_.start_ = a.indptr.astype(np.int32)
    lp.a_matrix_.index_ = a.indices.astype(np.int32)
    lp.a_matrix_.value_ = a.data.astype(np.float64)
    lp.integrality_ = [
        highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous for i in problem.integral
    ]
    if h.passModel(lp) == highspy.HighsStatus.kError:
        return MilpResult(MilpStatus.ERROR, "highs", time.perf_counter() - t0, message="model rejected")
    if problem.start is not None:
        sol = highspy.HighsSolution()
        sol.col_value = problem.start.astype(np.float64)
        sol.value_valid = True
        h.setSolution(sol)
    h.run()
    model_status = h.getModelStatus()
    info = h.getInfo()
    elapsed = time.perf_counter() - t0
    has_x = info.primal_solution_status == highspy.kSolutionStatusFeasible
    x = np.asarray(h.getSolution().col_value, dtype=np.float64) if has_x else None
    obj = problem.objective(x) if x is not None else None  # recomputed: HiGHS's own figure can be off
    ms = highspy.HighsModelStatus
    if model_status == ms.kOptimal:
        status = MilpStatus.OPTIMAL
    elif model_status == ms.kInfeasible:
        status = MilpStatus.INFEASIBLE
    elif model_status in (ms.kTimeLimit, ms.kIterationLimit, ms.kSolutionLimit, ms.kInterrupt):
        status = MilpStatus.FEASIBLE if has_x else MilpStatus.NO_SOLUTION
    else:
        status = MilpStatus.ERROR
    if status is MilpStatus.OPTIMAL and x is None:
        status = MilpStatus.ERROR
    return MilpResult(status, "highs", elapsed, x, obj, message=h.modelStatusToString(model_status))
