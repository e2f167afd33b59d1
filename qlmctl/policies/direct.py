"""No gateway: a client talking straight to the engines.

Every request goes to an engine the moment it arrives (to the least-loaded instance serving its model, as a
client spreading over several URLs would), and waits in that engine's own queue: vLLM's scheduler alone
decides the order, by its `--scheduling-policy` (a scenario's `cluster.instances[].engine.scheduling_policy`;
fcfs by default). This is what a replay sent with `qlmctl replay --url` to vLLM itself does, so it is the
simulated side of such a run. It holds a request only while no instance serves its model, and never swaps.
"""

from __future__ import annotations

from collections import deque
from typing import ClassVar

from qlmctl.core.cluster import ClusterView, Decision, Dispatch
from qlmctl.core.request import Request
from qlmctl.policies.base import Policy, PolicyContext


class DirectPolicy(Policy):
    """Dispatch on arrival; the engines' own schedulers do the rest."""

    name: ClassVar[str] = "direct"
    label: ClassVar[str | None] = "direct (no gateway)"
    through_gateway: ClassVar[bool] = False

    def __init__(self, ctx: PolicyContext) -> None:
        super().__init__(ctx)
        self._queue: deque[Request] = deque()

    def add_request(self, request: Request, now: float) -> None:
        self._queue.append(request)

    def num_queued(self) -> int:
        return len(self._queue)

    def queue_depths(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self._queue:
            out[r.slo_class] = out.get(r.slo_class, 0) + 1
        return out

    def schedule(self, cluster: ClusterView) -> list[Decision]:
        if not self._queue:
            return []
        serving: dict[str, list[list]] = {}  # model -> [[load, instance id], ...]
        for inst in cluster.instances:
            if inst.model is not None and not inst.swapping and inst.healthy:
                serving.setdefault(inst.model, []).append([inst.num_running + inst.num_waiting, inst.instance_id])
        out: list[Decision] = []
        held: deque[Request] = deque()
        while self._queue:
            r = self._queue.popleft()
            choices = serving.get(r.model)
            if not choices:
                held.append(r)  # no instance serves its model now
                continue
            best = min(choices)
            best[0] += 1
            out.append(Dispatch(r, best[1]))
        self._queue = held
        return out
