"""Where batches of simulations run: a local process pool, or a Ray cluster.

An executor runs *tasks*: a sweep's points (`qlmctl.sweep.plan.Point`) or an evaluation's
(`qlmctl.evaluation.EvalTask`). It takes scenario bundles (once each) and tasks, runs each task's
`run` in a worker on the bundle it names, and hands back the outcomes as they complete. Neither
executor retries on its own: a crashed worker or a lost task comes back as the task's `lost` outcome,
and the caller decides about retries, so that every failure is counted and reported once.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
import signal
import tempfile
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from qlmctl.errors import UserError
from qlmctl.sweep.bundle import Bundle, materialise
from qlmctl.sweep.point import LocalBundle

LOCAL_RAY = "local"
"""`--ray-address` value that starts a Ray instance on this machine."""
WAIT_S = 0.5
"""Longest block in `Executor.wait` of the drivers, so that Ctrl-C and progress bars stay responsive."""


class Task(Protocol):
    """Work for an executor: picklable, run in a worker on one scenario bundle."""

    @property
    def bundle(self) -> str:
        """Digest of the bundle `run` reads (added to the executor before the task is submitted)."""
        ...

    def run(self, source: Bundle | LocalBundle) -> Any:
        """In the worker: do the work and return its outcome (picklable). Must not raise."""
        ...

    def lost(self, e: BaseException, what: str) -> Any:
        """In the driver: the outcome of this task when its worker died or its result could not come back."""
        ...


def run_task(task: Task, source: Bundle | LocalBundle) -> Any:
    """The one function both executors ship to their workers."""
    return task.run(source)


def available_cpus() -> int:
    """Cores this process may run on (its CPU affinity, where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class Executor(ABC):
    """Runs tasks; `submit` them, then `wait` for their outcomes as they complete."""

    name: str
    slots: int
    """Tasks worth keeping in flight (enough to keep every worker busy)."""

    @abstractmethod
    def add_bundle(self, bundle: Bundle) -> None:
        """Make a scenario bundle available to the workers (call once per bundle)."""

    @abstractmethod
    def submit(self, task: Task) -> None:
        """Start `task`; its bundle must have been added."""

    @abstractmethod
    def wait(self, timeout_s: float | None = None) -> list[Any]:
        """Block until at least one submitted task is done (or `timeout_s`); the outcomes of all done
        (each what its task's `run` returned, or its `lost` outcome)."""

    @property
    @abstractmethod
    def in_flight(self) -> int:
        """Tasks submitted and not yet returned by `wait`."""

    @property
    def where(self) -> str:
        """Where the tasks run, for messages: "4 local worker(s)", "Ray (64 CPUs)"."""
        return self.name

    @abstractmethod
    def close(self) -> None:
        """Stop the workers; tasks still running are abandoned."""

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _ignore_sigint() -> None:
    """Pool worker initializer: Ctrl-C is the driver's to handle (it stops the workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _pool_context() -> multiprocessing.context.BaseContext:
    # forkserver: workers fork from a clean server that has imported the simulator once, so
    # they start fast and never inherit the driver's threads (rich's refresh thread, Ray's).
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["qlmctl.sweep.point", "qlmctl.runner", "qlmctl.workload"])
        return ctx
    return multiprocessing.get_context("spawn")


class LocalExecutor(Executor):
    """A pool of worker processes on this machine (`workers` of them, default: one per available core)."""

    name = "local"

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or available_cpus()
        self.slots = 2 * self.workers
        self._tmp = tempfile.TemporaryDirectory(prefix="qlmctl-sweep-")
        self._bundles: dict[str, LocalBundle] = {}
        self._pool: cf.ProcessPoolExecutor | None = None
        self._futures: dict[cf.Future[Any], Task] = {}

    def _ensure_pool(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(self.workers, mp_context=_pool_context(), initializer=_ignore_sigint)
        return self._pool

    def add_bundle(self, bundle: Bundle) -> None:
        path = materialise(bundle, Path(self._tmp.name))
        self._bundles[bundle.digest] = LocalBundle(path, bundle.origins)

    def submit(self, task: Task) -> None:
        fut = self._ensure_pool().submit(run_task, task, self._bundles[task.bundle])
        self._futures[fut] = task

    def wait(self, timeout_s: float | None = None) -> list[Any]:
        if not self._futures:
            return []
        done, _ = cf.wait(self._futures, timeout_s, cf.FIRST_COMPLETED)
        out: list[Any] = []
        for fut in done:
            task = self._futures.pop(fut)
            try:
                out.append(fut.result())
            except cf.process.BrokenProcessPool as e:
                # Every task in flight fails with it; a new pool serves the retries.
                self._drop_pool()
                out.append(task.lost(e, "a worker process died"))
            except Exception as e:  # noqa: BLE001 - e.g. an unpicklable result; reported, retried
                out.append(task.lost(e, "the worker could not return the result"))
        return out

    @property
    def in_flight(self) -> int:
        return len(self._futures)

    @property
    def where(self) -> str:
        return f"{self.workers} local worker(s)"

    def _drop_pool(self, terminate: bool = False) -> None:
        if self._pool is None:
            return
        # Tasks still running would hold the interpreter's exit until they finish.
        processes = list((getattr(self._pool, "_processes", None) or {}).values()) if terminate else []
        self._pool.shutdown(wait=False, cancel_futures=True)
        for proc in processes:
            proc.terminate()
        self._pool = None

    def close(self) -> None:
        self._drop_pool(terminate=bool(self._futures))
        self._futures.clear()
        self._tmp.cleanup()


def _ship_code_env() -> dict[str, Any]:
    """A Ray runtime env that ships this checkout's `qlmctl` and `simulator` packages."""
    import qlmctl
    import simulator

    return {"py_modules": [str(Path(qlmctl.__file__).parent), str(Path(simulator.__file__).parent)]}


class RayExecutor(Executor):
    """One Ray task per executor task, on a cluster (`address`), or on a Ray instance started here (`"local"`).

    Args:
        address: A Ray address (`auto`, `host:6379`, `ray://host:10001`) or `"local"`.
        num_cpus: CPUs of a local instance (default: all); ignored for a cluster.
        ship_code: Upload this checkout's qlmctl and simulator packages with the tasks, so that
            the cluster runs the driver's code (its Python still needs qlmctl's dependencies).
            Default: on for a cluster, off for a local instance.
    """

    name = "ray"

    def __init__(self, address: str = LOCAL_RAY, num_cpus: int | None = None, ship_code: bool | None = None) -> None:
        try:
            import ray
        except ModuleNotFoundError:
            raise UserError("Ray is not installed; install the extra: pip install -e '.[ray]'",
                            field="--ray-address") from None
        self._ray = ray
        self._owns = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
            local = address == LOCAL_RAY
            if ship_code if ship_code is not None else not local:
                kwargs["runtime_env"] = _ship_code_env()
            try:
                if local:
                    ray.init(num_cpus=num_cpus, **kwargs)
                else:
                    ray.init(address=address, **kwargs)
            except ConnectionError as e:
                raise UserError(f"cannot reach the Ray cluster at {address}: {e}", field="--ray-address") from None
            self._owns = True
        self._task = ray.remote(num_cpus=1, max_retries=0)(run_task)
        self.cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.slots = 2 * self.cpus
        self._refs: dict[str, Any] = {}
        self._pending: dict[Any, Task] = {}

    def add_bundle(self, bundle: Bundle) -> None:
        # One copy in the object store, fetched once per node rather than once per task.
        self._refs[bundle.digest] = self._ray.put(bundle)

    def submit(self, task: Task) -> None:
        ref = self._task.remote(task, self._refs[task.bundle])
        self._pending[ref] = task

    def wait(self, timeout_s: float | None = None) -> list[Any]:
        if not self._pending:
            return []
        ray = self._ray
        refs = list(self._pending)
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout_s)
        if ready:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        out: list[Any] = []
        for ref in ready:
            task = self._pending.pop(ref)
            try:
                out.append(ray.get(ref))
            except Exception as e:  # noqa: BLE001 - worker crash, node loss, OOM kill: retried
                out.append(task.lost(e, "the Ray task was lost"))
        return out

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def where(self) -> str:
        return f"Ray ({self.cpus} CPUs)"

    def close(self) -> None:
        for ref in self._pending:
            self._ray.cancel(ref, force=True)
        self._pending.clear()
        self._refs.clear()
        if self._owns:
            self._ray.shutdown()


def run_all(executor: Executor, tasks: Iterable[Task], on_outcome: Callable[[Any], None]) -> None:
    """Run `tasks` in their order on `executor`, at most `executor.slots` in flight, calling `on_outcome`
    (in this thread) with each outcome as it arrives. Nothing is retried."""
    queue = deque(tasks)
    while queue or executor.in_flight:
        while queue and executor.in_flight < executor.slots:
            executor.submit(queue.popleft())
        for outcome in executor.wait(WAIT_S):
            on_outcome(outcome)


def make_executor(ray_address: str | None, workers: int | None) -> Executor:
    """The local pool, or Ray when `ray_address` is given (`"local"` starts one here)."""
    if ray_address:
        return RayExecutor(ray_address, num_cpus=workers)
    return LocalExecutor(workers)
