"""Gurobi back end (gurobipy) and its licence settings.

gurobipy's pip package carries a size-limited licence (about 2,000 variables and 2,000 constraints);
a full licence comes from a licence file (`GRB_LICENSE_FILE`, or `license_file` in the settings) or from
Web License Service keys (`WLSACCESSID`, `WLSSECRET`, `LICENSEID` in the settings, or the environment
variables `GRB_WLSACCESSID`, `GRB_WLSSECRET`, `GRB_LICENSEID`). Licence values are never printed: errors
name the setting, not its value.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qlmctl.errors import UserError
from qlmctl.solvers.milp import MilpProblem, MilpResult, MilpStatus

SETTINGS_FIELD = "scheduler.gurobi"

LICENCE_PARAMS = (
    "WLSACCESSID", "WLSSECRET", "LICENSEID", "WLSTOKEN",
    "TOKENSERVER", "TSPORT", "SERVERPASSWORD",
    "CSMANAGER", "CSAPIACCESSID", "CSAPISECRET",
    "CLOUDACCESSID", "CLOUDSECRETKEY", "CLOUDPOOL",
)
"""Gurobi parameters that carry a licence (set on the environment before it starts)."""
_INT_PARAMS = frozenset({"LICENSEID", "TSPORT"})
_FILE_KEYS = frozenset({"LICENSE_FILE", "LICENCE_FILE", "GRB_LICENSE_FILE"})
_ENV_PARAMS = {"GRB_WLSACCESSID": "WLSACCESSID", "GRB_WLSSECRET": "WLSSECRET", "GRB_LICENSEID": "LICENSEID"}
_WLS_KEYS = ("WLSACCESSID", "WLSSECRET", "LICENSEID")
_SIZE_LIMIT_ERRNO = 10010
"""GurobiError code: model too large for a size-limited licence."""

_env_var_lock = threading.Lock()


class GurobiSizeLimit(Exception):
    """The licence is size-limited and refused a model of this size."""


@dataclass(frozen=True, slots=True)
class GurobiLicence:
    """Where Gurobi's licence comes from. `params` hold secrets and are left out of repr."""

    source: str
    """"settings", "environment", "licence file <path>", or "default" (Gurobi's own search, or pip's
    size-limited licence)."""
    params: dict[str, str | int] = field(default_factory=dict, repr=False)
    licence_file: Path | None = None
    """A licence file Gurobi must read itself (e.g. node-locked), via GRB_LICENSE_FILE."""

    @property
    def configured(self) -> bool:
        """The user asked for a specific licence (a failure to start it is then an error)."""
        return self.source != "default"

    @classmethod
    def from_settings(cls, settings: Mapping[str, object] | None, environ: Mapping[str, str]) -> "GurobiLicence":
        """Validate licence settings (scenario's `scheduler.gurobi`, else the environment).

        Raises:
            UserError: unknown or empty keys, an incomplete WLS triple, a non-integer id, a missing file.
        """
        if settings:
            return cls._from_mapping(settings, "settings", SETTINGS_FIELD)
        env_params = {k: environ[k] for k in _ENV_PARAMS if environ.get(k)}
        if env_params:
            return cls._from_mapping({_ENV_PARAMS[k]: v for k, v in env_params.items()}, "environment", None,
                                     names={v: k for k, v in _ENV_PARAMS.items()})
        path = environ.get("GRB_LICENSE_FILE")
        if path:
            return cls._from_file(Path(path), "environment variable GRB_LICENSE_FILE")
        return cls("default")

    @classmethod
    def _from_mapping(
        cls, raw: Mapping[str, object], source: str, field_prefix: str | None, names: dict[str, str] | None = None
    ) -> "GurobiLicence":
        names = names or {}
        params: dict[str, str | int] = {}
        licence_file: Path | None = None
        for key, value in raw.items():
            upper = str(key).upper()
            where = names.get(upper) or (f"{field_prefix}.{key}" if field_prefix else str(key))
            if value is None or str(value).strip() == "":
                raise UserError("licence setting is empty", field=where)
            if upper in _FILE_KEYS:
                licence_file = Path(str(value)).expanduser()
                continue
            if upper not in LICENCE_PARAMS:
                raise UserError(
                    f"unknown Gurobi licence setting '{key}'; use license_file or one of {', '.join(LICENCE_PARAMS)}",
                    field=field_prefix or where,
                )
            if upper in _INT_PARAMS:
                try:
                    params[upper] = int(str(value).strip())
                except ValueError:
                    raise UserError("must be a whole number", field=where) from None
            else:
                params[upper] = str(value).strip()
        if licence_file is not None:
            if params:
                raise UserError("give either license_file or licence parameters, not both", field=field_prefix)
            return cls._from_file(licence_file, f"{field_prefix}.license_file" if field_prefix else "license_file")
        _check_complete(params, lambda k: names.get(k) or (f"{field_prefix}.{k}" if field_prefix else k))
        return cls(source, params)

    @classmethod
    def _from_file(cls, path: Path, where: str) -> "GurobiLicence":
        if not path.is_file():
            raise UserError(f"Gurobi licence file not found ({where})", path)
        try:
            text = path.read_text(errors="replace")
        except OSError as e:
            raise UserError(f"cannot read Gurobi licence file: {e.strerror} ({where})", path) from None
        params: dict[str, str | int] = {}
        for lineno, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#") or "=" not in line:
                continue
            key, value = (s.strip() for s in line.split("=", 1))
            upper = key.upper()
            if upper in LICENCE_PARAMS:
                if upper in _INT_PARAMS:
                    try:
                        params[upper] = int(value)
                    except ValueError:
                        raise UserError(f"{key} must be a whole number", path, lineno) from None
                else:
                    params[upper] = value
        source = f"licence file {path}"
        if not params:
            # Node-locked and other keyed licences: Gurobi reads the file itself.
            return cls(source, {}, path)
        _check_complete(params, lambda k: k, path)
        return cls(source, params)

    def scrub(self, text: str) -> str:
        """`text` with every licence value replaced by ***."""
        for v in self.params.values():
            s = str(v)
            if len(s) >= 3:
                text = text.replace(s, "***")
        return text


def _check_complete(params: dict[str, str | int], name, path: Path | None = None) -> None:
    if "WLSTOKEN" in params:
        return
    given = [k for k in _WLS_KEYS if k in params]
    if given and len(given) != len(_WLS_KEYS):
        missing = [name(k) for k in _WLS_KEYS if k not in params]
        raise UserError(f"incomplete Gurobi WLS licence: missing {', '.join(missing)}", path)
    if ("CSAPIACCESSID" in params) != ("CSAPISECRET" in params):
        missing = "CSAPISECRET" if "CSAPIACCESSID" in params else "CSAPIACCESSID"
        raise UserError(f"incomplete Gurobi Cluster Manager licence: missing {name(missing)}", path)


class GurobiSolver:
    """Solves `MilpProblem`s with Gurobi, on one environment started once (licence checked then)."""

    def __init__(self, licence: GurobiLicence) -> None:
        self.licence = licence
        self._env = None

    def start(self) -> None:
        """Start the Gurobi environment (reads the licence).

        Raises:
            UserError: the licence could not be obtained (message scrubbed of licence values).
        """
        if self._env is not None:
            return
        import gurobipy as gp

        env = gp.Env(empty=True)
        env.setParam("OutputFlag", 0)
        for k, v in self.licence.params.items():
            env.setParam(k, v)
        try:
            if self.licence.licence_file is not None:
                with _env_var_lock:
                    old = os.environ.get("GRB_LICENSE_FILE")
                    os.environ["GRB_LICENSE_FILE"] = str(self.licence.licence_file)
                    try:
                        env.start()
                    finally:
                        if old is None:
                            os.environ.pop("GRB_LICENSE_FILE", None)
                        else:
                            os.environ["GRB_LICENSE_FILE"] = old
            else:
                env.start()
        except gp.GurobiError as e:
            msg = self.licence.scrub(str(e))
            raise UserError(f"Gurobi licence ({self.licence.source}) could not be used: {msg} "
                            f"(error {e.errno})", field=SETTINGS_FIELD) from None
        self._env = env

    def solve(
        self, problem: MilpProblem, time_limit_s: float, *, seed: int = 0, rel_gap: float = 1e-4,
        abs_gap: float = 1e-6,
    ) -> MilpResult:
        """Solve `problem` within `time_limit_s`.

        Raises:
            GurobiSizeLimit: the licence refused a model this large.
        """
        import gurobipy as gp
        from gurobipy import GRB

        self.start()
        t0 = time.perf_counter()
        model = gp.Model(env=self._env)
        try:
            model.Params.TimeLimit = float(time_limit_s)
            model.Params.MIPGap = float(rel_gap)
            model.Params.MIPGapAbs = float(abs_gap)
            model.Params.Seed = int(seed) % (2**31 - 1)
            model.Params.Threads = 1
            vtype = np.where(problem.integral, GRB.INTEGER, GRB.CONTINUOUS)
            x = model.addMVar(problem.num_vars, lb=problem.col_lower, ub=problem.col_upper, vtype=vtype)
            a = problem.matrix.tocsr()
            lo, hi = problem.row_lower, problem.row_upper
            eq = lo == hi
            for mask, sense, rhs in ((eq, GRB.EQUAL, hi), (~eq & np.isfinite(hi), GRB.LESS_EQUAL, hi),
                                     (~eq & np.isfinite(lo), GRB.GREATER_EQUAL, lo)):
                if mask.any():
                    model.addMConstr(a[mask], x, sense, rhs[mask])
            model.setMObjective(None, problem.cost, 0.0, xc=x, sense=GRB.MINIMIZE)
            if problem.start is not None:
                x.Start = problem.start
            model.optimize()
        except gp.GurobiError as e:
            if e.errno == _SIZE_LIMIT_ERRNO:
                raise GurobiSizeLimit(str(e)) from None
            return MilpResult(MilpStatus.ERROR, "gurobi", time.perf_counter() - t0,
                              message=self.licence.scrub(f"error {e.errno}: {e}"))
        try:
            status = model.Status
            has_x = model.SolCount > 0
            sol = np.asarray(x.X, dtype=np.float64) if has_x else None
            obj = problem.objective(sol) if sol is not None else None
        finally:
            model.dispose()
        elapsed = time.perf_counter() - t0
        if status == GRB.OPTIMAL:
            st = MilpStatus.OPTIMAL
        elif status == GRB.INFEASIBLE:
            st = MilpStatus.INFEASIBLE
        elif status in (GRB.TIME_LIMIT, GRB.INTERRUPTED, GRB.SOLUTION_LIMIT, GRB.NODE_LIMIT, GRB.WORK_LIMIT):
            st = MilpStatus.FEASIBLE if has_x else MilpStatus.NO_SOLUTION
        else:
            st = MilpStatus.ERROR
        return MilpResult(st, "gurobi", elapsed, sol, obj, message=f"status {status}")

    def close(self) -> None:
        if self._env is not None:
            self._env.dispose()
            self._env = None
