"""Capacity-planning sweeps: many independent simulations, on local cores or on Ray.

A sweep file (`spec`) expands into points and bisection configurations (`plan`); each point's
scenario travels as a self-contained `bundle`; `run_point` simulates one point in a worker; an
`executors` backend (process pool or Ray) runs them; the `runner` feeds the executor, retries
failures and drives the `bisection` searches; the `store` makes a sweep resumable; `tables` and
`figures` write the results.

The executors run any `Task` on a bundle, not only sweep points: `qlmctl evaluate` runs its
points on them too (`qlmctl.evaluation`).
"""

from qlmctl.sweep.bisection import Bisection, CapacityStatus
from qlmctl.sweep.executors import (
    Executor,
    LocalExecutor,
    RayExecutor,
    Task,
    available_cpus,
    make_executor,
    run_all,
)
from qlmctl.sweep.plan import Configuration, Point, SweepPlan, build_plan
from qlmctl.sweep.point import PointOutcome, run_point
from qlmctl.sweep.runner import SweepReporter, SweepResult, run_sweep
from qlmctl.sweep.spec import SweepSpec, load_sweep
from qlmctl.sweep.store import PointRecord, ResultStore

__all__ = [
    "Bisection",
    "CapacityStatus",
    "Configuration",
    "Executor",
    "LocalExecutor",
    "Point",
    "PointOutcome",
    "PointRecord",
    "RayExecutor",
    "ResultStore",
    "SweepPlan",
    "SweepReporter",
    "SweepResult",
    "SweepSpec",
    "Task",
    "available_cpus",
    "build_plan",
    "load_sweep",
    "make_executor",
    "run_all",
    "run_point",
    "run_sweep",
]
