"""Baselines through the same interface: fcfs (vLLM's default), priority (vLLM's priority scheduling), edf.

Each keeps one queue per model ordered by its key, routes to the least-loaded instance serving the model
when it has a batch slot and KV room, and, when an instance falls idle while another model's requests
wait with no instance serving them, swaps it to the model whose head request comes first.
"""

from __future__ import annotations

import heapq
from typing import ClassVar

from qlmctl.core.cluster import ClusterView, Decision, Dispatch, SwapModel
from qlmctl.core.request import Request
from qlmctl.policies.base import Policy, PolicyContext
from qlmctl.policies.common import room_of


class QueuePolicy(Policy):
    """A per-model priority queue of requests, ordered by `key`."""

    name: ClassVar[str] = "queue"

    def __init__(self, ctx: PolicyContext) -> None:
        super().__init__(ctx)
        self._queues: dict[str, list[tuple[tuple[float, ...], int, Request]]] = {}
        self._count = 0
        self._open = True  # something changed since the last look at the instances

    def key(self, r: Request) -> tuple[float, ...]:
        raise NotImplementedError

    def add_request(self, request: Request, now: float) -> None:
        heapq.heappush(self._queues.setdefault(request.model, []), (self.key(request), request.request_id, request))
        self._count += 1
        self._open = True

    def on_finished(self, request: Request, now: float) -> None:
        self._open = True

    def on_instance_changed(self, instance_id: int) -> None:
        self._open = True

    def num_queued(self) -> int:
        return self._count

    def queue_depths(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for q in self._queues.values():
            for _, _, r in q:
                out[r.slo_class] = out.get(r.slo_class, 0) + 1
        return out

    def schedule(self, cluster: ClusterView) -> list[Decision]:
        if not self._count or not self._open:
            return []
        self._open = False
        out: list[Decision] = []
        rooms = [room_of(i, self.ctx.dispatch_limit) for i in cluster.instances]
        for model, q in self._queues.items():
            serving = [rm for rm in rooms if rm is not None and rm.inst.model == model]
            while q and serving:
                r = q[0][2]
                best = None
                for rm in serving:
                    if rm.fits(r) and (best is None or rm.load < best.load):
                        best = rm
                if best is None:
                    break
                heapq.heappop(q)
                self._count -= 1
                best.take(r)
                out.append(Dispatch(r, best.inst.instance_id))
        if self.ctx.enable_swap:
            out.extend(self._swaps(cluster, {rm.inst.instance_id: rm.load for rm in rooms if rm is not None}))
        return out

    def _swaps(self, cluster: ClusterView, loads: dict[int, int]) -> list[Decision]:
        served = {i.model for i in cluster.instances if i.healthy}
        starving = [(q[0][0], m) for m, q in self._queues.items() if q and m not in served]
        if not starving:
            return []
        starving.sort()
        out: list[Decision] = []
        for inst in cluster.instances:
            if not starving:
                break
            # Loads include this call's dispatches, which the backend has not carried out yet.
            if inst.swapping or not inst.healthy or loads.get(inst.instance_id, 0) > 0:
                continue
            # Leave a model loaded while it still has queued requests.
            if inst.model is not None and self._queues.get(inst.model):
                continue
            _, m = starving.pop(0)
            if inst.profile_for(m) is None:
                continue
            out.append(SwapModel(inst.instance_id, m))
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
