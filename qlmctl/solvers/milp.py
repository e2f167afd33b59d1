"""A mixed-integer linear program in matrix form, and what a solver returns for it.

The form both back ends take (HiGHS and Gurobi):

    minimise  cost . x
    s.t.      row_lower <= A x <= row_upper
              col_lower <= x <= col_upper,   x[j] integer where integral[j]

`A` is a SciPy sparse matrix; infinite bounds are +-numpy.inf.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import scipy.sparse as sp


@dataclass(frozen=True, slots=True, eq=False)
class MilpProblem:
    cost: np.ndarray
    matrix: "sp.csr_matrix"
    row_lower: np.ndarray
    row_upper: np.ndarray
    col_lower: np.ndarray
    col_upper: np.ndarray
    integral: np.ndarray
    """Boolean mask of the integer columns."""
    start: np.ndarray | None = None
    """A feasible point to start from (warm start), or None."""

    @property
    def num_vars(self) -> int:
        return int(self.cost.shape[0])

    @property
    def num_constraints(self) -> int:
        return int(self.matrix.shape[0])

    def objective(self, x: np.ndarray) -> float:
        return float(self.cost @ x)

    def violation(self, x: np.ndarray) -> float:
        """Largest bound or row violation of `x` (0.0 when feasible), integrality included."""
        ax = self.matrix @ x
        worst = max(
            float(np.max(self.row_lower - ax, initial=0.0)),
            float(np.max(ax - self.row_upper, initial=0.0)),
            float(np.max(self.col_lower - x, initial=0.0)),
            float(np.max(x - self.col_upper, initial=0.0)),
        )
        frac = np.abs(x[self.integral] - np.round(x[self.integral]))
        return max(worst, float(np.max(frac, initial=0.0)))


class MilpStatus(enum.Enum):
    OPTIMAL = "optimal"
    FEASIBLE = "feasible"
    """Stopped (time limit) with a feasible solution, optimality not proven."""
    NO_SOLUTION = "no_solution"
    """Stopped (time limit) before finding any solution."""
    INFEASIBLE = "infeasible"
    ERROR = "error"

    @property
    def has_solution(self) -> bool:
        return self in (MilpStatus.OPTIMAL, MilpStatus.FEASIBLE)


@dataclass(slots=True)
class MilpResult:
    status: MilpStatus
    solver: str
    """The back end that produced it: "highs" or "gurobi"."""
    solve_s: float
    """Wall time of the solve, model hand-over included."""
    x: np.ndarray | None = None
    objective: float | None = None
    message: str = ""
