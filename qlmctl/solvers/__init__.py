"""MILP solvers behind one interface: `MilpSolver` picks HiGHS or Gurobi per model.

- "highs": HiGHS (highspy), always available.
- "gurobi": Gurobi; where its licence is size-limited and refuses a model, HiGHS solves that model
  (said once).
- "auto": Gurobi when it is installed and licensed for the model's size, else HiGHS (said once, each way).

Heavy imports (highspy, gurobipy) happen inside the calls.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping

from qlmctl.errors import UserError
from qlmctl.solvers.gurobi import GurobiLicence, GurobiSizeLimit, GurobiSolver
from qlmctl.solvers.milp import MilpProblem, MilpResult, MilpStatus

SOLVER_NAMES = ("auto", "gurobi", "highs")


class MilpSolver:
    """A configured solver: back-end choice, time limit, gaps, seed, and the notices it has given.

    Args:
        name: "auto", "gurobi" or "highs".
        time_limit_s: Wall-clock limit of one solve.
        gurobi: Licence settings (see `qlmctl.solvers.gurobi`); the environment is read when None.
        environ: Environment variables to read (default: os.environ).
        notify: Called with each one-line notice (back-end choice, fallback), once per kind.

    Raises:
        UserError: an unknown name, broken licence settings, or "gurobi" with gurobipy missing or its
            licence failing to start.
    """

    def __init__(
        self,
        name: str,
        time_limit_s: float,
        *,
        gurobi: Mapping[str, object] | None = None,
        environ: Mapping[str, str] | None = None,
        seed: int = 0,
        rel_gap: float = 1e-4,
        abs_gap: float = 1e-6,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        if name not in SOLVER_NAMES:
            raise UserError(f"unknown solver '{name}'; choose from {', '.join(SOLVER_NAMES)}", field="scheduler.solver")
        if not time_limit_s > 0:
            raise UserError("solver time limit must be positive", field="scheduler.solver_time_limit_s")
        self.name = name
        self.time_limit_s = float(time_limit_s)
        self.seed = seed
        self.rel_gap = rel_gap
        self.abs_gap = abs_gap
        self.notices: list[str] = []
        self._notify = notify
        self._said: set[str] = set()
        self._gurobi: GurobiSolver | None = None
        self._gurobi_refused_size: int | None = None
        """Smallest max(variables, constraints) the size-limited licence refused."""
        if name == "highs":
            return
        licence = GurobiLicence.from_settings(gurobi, os.environ if environ is None else environ)
        if importlib.util.find_spec("gurobipy") is None:
            if name == "gurobi" or licence.configured:
                raise UserError("solver gurobi needs the gurobipy package (pip install gurobipy)",
                                field="scheduler.solver")
            return
        self._gurobi = GurobiSolver(licence)
        if name == "gurobi" or licence.configured:
            self._gurobi.start()  # a broken licence is an error now, not mid-run

    def solve(self, problem: MilpProblem) -> MilpResult:
        """Solve with the chosen back end; HiGHS where Gurobi is absent or not licensed for this size."""
        size = max(problem.num_vars, problem.num_constraints)
        if self._gurobi is not None and (self._gurobi_refused_size is None or size < self._gurobi_refused_size):
            try:
                if self._gurobi._env is None:
                    self._gurobi.start()
                result = self._gurobi.solve(problem, self.time_limit_s, seed=self.seed, rel_gap=self.rel_gap,
                                            abs_gap=self.abs_gap)
                self._say("gurobi", f"solver {self.name}: using gurobi")
                return result
            except GurobiSizeLimit:
                self._gurobi_refused_size = size if self._gurobi_refused_size is None else min(
                    size, self._gurobi_refused_size)
            except UserError as e:
                # Only reached under "auto" with Gurobi's default licence search: fall back for good.
                self._gurobi = None
                self._say("no-gurobi", f"solver auto: Gurobi is not usable ({e.message}); using highs")
        if self._gurobi is not None:
            self._say(
                "size-limit",
                f"solver {self.name}: Gurobi's licence is size-limited (it refused a model of "
                f"{problem.num_vars:,} variables and {problem.num_constraints:,} constraints); "
                f"using highs for models of that size",
            )
        elif self.name == "auto":
            self._say("highs", "solver auto: gurobipy is not installed; using highs"
                      if importlib.util.find_spec("gurobipy") is None else "solver auto: using highs")
        from qlmctl.solvers.highs import solve_highs

        return solve_highs(problem, self.time_limit_s, seed=self.seed, rel_gap=self.rel_gap, abs_gap=self.abs_gap)

    def _say(self, kind: str, message: str) -> None:
        if kind in self._said:
            return
        self._said.add(kind)
        self.notices.append(message)
        if self._notify is not None:
            self._notify(message)

    def close(self) -> None:
        if self._gurobi is not None:
            self._gurobi.close()


__all__ = ["MilpProblem", "MilpResult", "MilpSolver", "MilpStatus", "SOLVER_NAMES", "GurobiLicence"]
