"""Baselines through the same interface: fcfs (vLLM's default), priority (vLLM's priority scheduling), edf.

Each keeps one queue per model ordered by its key, routes to the least-loaded instance serving the model
when it has a batch slot and KV room, and, when an instance falls idle while another model's requests
wait with no instance serving them, swaps it to the model whose head request comes first.
"""

from __future__ import annotations

from collections import deque
from heapq import heappop, heappush
from typing import ClassVar

from qlmctl.core.cluster import ClusterView, Decision, Dispatch, SwapModel
from qlmctl.core.request import Request
from qlmctl.policies.base import Policy, PolicyContext
from qlmctl.policies.common import RoomBook


class _KeyQueue:
    """A priority queue of entries (key..., request id, request), smallest first, that costs O(1) for entries
    that come in order (fcfs: always; the others mostly): those wait in a run, the rest in a heap."""

    __slots__ = ("_run", "_heap")

    def __init__(self) -> None:
        self._run: deque[tuple] = deque()
        self._heap: list[tuple] = []

    def __len__(self) -> int:
        return len(self._run) + len(self._heap)

    def __bool__(self) -> bool:
        return bool(self._run) or bool(self._heap)

    def push(self, entry: tuple) -> None:
        run = self._run
        if not run or entry >= run[-1]:
            run.append(entry)
        else:
            heappush(self._heap, entry)

    def head(self) -> tuple:
        run, heap = self._run, self._heap
        if heap and (not run or heap[0] < run[0]):
            return heap[0]
        return run[0]

    def pop(self) -> tuple:
        run, heap = self._run, self._heap
        if heap and (not run or heap[0] < run[0]):
            return heappop(heap)
        return run.popleft()


class QueuePolicy(Policy):
    """A per-model priority queue of requests, ordered by `key`."""

    name: ClassVar[str] = "queue"

    def __init__(self, ctx: PolicyContext) -> None:
        super().__init__(ctx)
        self._queues: dict[str, _KeyQueue] = {}  # entries: (*key, request id, request)
        self._count = 0
        self._book = RoomBook(ctx.dispatch_limit, tracks_steps=True)
        self.on_instance_stepped = self._book.stepped  # type: ignore[method-assign]  # (bound straight through)
        self._served: set[str] | None = None  # models loaded somewhere; None: to recompute
        self._swap_targets: dict[int, str] = {}  # swaps under way: instance -> model
        self._depth: dict[str, int] = {}
        self._settled = False
        """The last call left every model's head fitting no room, and nothing that could change that has happened
        since: a call would dispatch nothing (see `schedule`)."""

    def key(self, r: Request) -> tuple[float, ...]:
        raise NotImplementedError

    def add_request(self, request: Request, now: float) -> None:
        q = self._queues.get(request.model)
        if q is None:
            q = self._queues[request.model] = _KeyQueue()
        entry = (*self.key(request), request.request_id, request)
        q.push(entry)
        if self._settled and q.head() is entry:
            self._settled = False  # a new head, which may fit where the last one did not
        self._count += 1
        self._depth[request.slo_class] = self._depth.get(request.slo_class, 0) + 1

    def on_finished(self, request: Request, now: float) -> None:
        self._book.touch(request.instance_id)
        self._settled = False

    def on_preempted(self, request: Request, now: float) -> None:
        self._settled = False  # its blocks are free

    def on_instance_changed(self, instance_id: int) -> None:
        self._book.touch(instance_id)
        self._settled = False
        self._served = None
        self._swap_targets.pop(instance_id, None)

    def num_queued(self) -> int:
        return self._count

    def queue_depths(self) -> dict[str, int]:
        return dict(self._depth)

    def queue_groups(self) -> dict[tuple[str, str], int]:
        """One queue per model, labelled with the policy's name."""
        return {(m, self.name): len(q) for m, q in self._queues.items() if q}

    def schedule(self, cluster: ClusterView) -> list[Decision]:
        if not self._count or self._settled:
            return []
        book = self._book
        book.refresh(cluster)
        out: list[Decision] = []
        for model, q in self._queues.items():
            # Each head goes to the least-loaded instance it fits (ties by instance id); the first that fits
            # nowhere waits, and so does everything behind it. So a call leaves each model's head fitting no
            # room, and a second call with nothing changed dispatches nothing (the simulator relies on that).
            while q:
                r = q.head()[-1]
                rm = book.place(model, r)
                if rm is None:
                    break
                q.pop()
                self._count -= 1
                self._depth[r.slo_class] -= 1
                rm.take(r)
                book.taken(rm)
                out.append(Dispatch(r, rm.inst.instance_id))
        if self.ctx.enable_swap and self._count:
            out.extend(self._swaps(cluster))
        # In a world that reports every change to an engine (the simulator), the next call can dispatch only
        # after one of: a new head, a finish, a preemption, a swap done (the hooks above). Free KV blocks
        # otherwise only shrink as requests decode, and load and slots move only with finishes; under
        # overload most calls come from engine steps that change none of it. Live, engines move on their own.
        self._settled = getattr(cluster, "steps_reported", False)
        return out

    def _swaps(self, cluster: ClusterView) -> list[Decision]:
        """Swap idle instances to models whose requests wait with no instance serving them."""
        if self._served is None:
            self._served = {i.model for i in cluster.instances if i.healthy and i.model is not None}
        served = self._served | set(self._swap_targets.values()) if self._swap_targets else self._served
        starving = None  # (a plain loop: this runs on every call while requests wait, mostly to find none)
        for m, q in self._queues.items():
            if q and m not in served:
                if starving is None:
                    starving = []
                starving.append((q.head()[:-2], m))
        if starving is None:
            return []
        starving.sort()
        book = self._book
        idle = []
        for inst in cluster.instances:
            rm = book.get(inst.instance_id)
            # Loads include this call's dispatches, which the backend has not carried out yet.
            load = rm.load if rm is not None else inst.num_running + inst.num_waiting
            if load == 0 and not inst.swapping and inst.healthy:
                idle.append(inst)
        if not idle:
            return []
        out: list[Decision] = []
        for inst in idle:
            if not starving:
                break
            # Leave a model loaded while it still has queued requests.
            if inst.model is not None and self._queues.get(inst.model):
                continue
            for k, (_, m) in enumerate(starving):
                if inst.profile_for(m) is not None:
                    out.append(SwapModel(inst.instance_id, m))
                    book.touch(inst.instance_id)
                    self._swap_targets[inst.instance_id] = m
                    del starving[k]
                    break
        return out


class FCFSPolicy(QueuePolicy):
    """vLLM's default: first come, first served, least-loaded routing."""

    name = "fcfs"

    def key(self, r: Request) -> tuple[float, ...]:
        return (r.arrival_s,)


class PriorityPolicy(QueuePolicy):
    """vLLM's priority scheduling: by SLO class priority, then arrival; preemption evicts low priority."""

    name = "priority"
    engine_policy = "priority"

    def key(self, r: Request) -> tuple[float, ...]:
        return (r.priority, r.arrival_s)


class EDFPolicy(QueuePolicy):
    """Earliest deadline first, per request (deadline = arrival + TTFT SLO)."""

    name = "edf"

    def key(self, r: Request) -> tuple[float, ...]:
        return (r.deadline_s, r.arrival_s)
