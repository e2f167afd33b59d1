"""A SHEPHERD-like baseline: a periodic planner plus a deadline-driven, preemptive online scheduler.

SHEPHERD (Zhang et al., "SHEPHERD: Serving DNNs in the Wild", NSDI 2023) splits serving in two:

- Herd, a periodic planner, aggregates request streams and decides which models each group of GPUs
  serves, so that every model's capacity covers its load (it maximises the minimum headroom);
- Flex, an online scheduler, forms batches from the queued requests that can still meet their
  deadlines (earliest deadline first; requests that cannot are dropped), and preempts the running
  batch when a new batch would bring in at least lambda times as much goodput.

What changes for LLMs served by vLLM instances (and how this policy adapts each part):

- *Deadline*: a request's deadline is its TTFT SLO (arrival + ttft_slo_s). Once its first token is
  out, that deadline is met; the rest of the request is work still to finish.
- *Planner* (every `shepherd_plan_interval_s`, default 5 s): per model, the load is the instances it
  needs over the planning window (`shepherd_window_s`, default 60 s): its arrival rate over the last
  window plus its queued backlog spread over one window, divided by the model's service rate on an
  instance (requests that can no longer meet their deadline count for little: goodput). Every model
  with load gets one instance, largest load first, while instances last (Herd places every model);
  the other instances go by the D'Hondt rule on that load (the model with the largest load per
  instance it already has wins the next one), but only to models whose load exceeds the instances
  they have; an instance left over keeps its model. A model already loaded gets a stickiness bonus, so
  that a load blip does not cause a swap; instances already holding a model fill its seats first.
  An instance assigned another model stops taking requests, drains, then swaps. Model placement
  changes only at plan time: this is SHEPHERD's coarse planning, and its weakness when many models
  share few instances.
- *Batches*: with continuous batching there is no fixed batch; a "batch" is what the online
  scheduler admits into the free batch slots and KV blocks at an instant. It admits per model in
  earliest-deadline order the requests that can still meet their deadline (now + prefill time <=
  deadline), least-loaded instance first. Instead of dropping the others (SHEPHERD would), it serves
  them after every feasible one (they are SLO misses either way), after requests it preempted
  once they had their first token.
- *Preemption* (when a new plan arrives, if `enable_eviction`): on a full instance, the feasible
  queued requests that the estimate says will miss their deadline waiting for slots to free (mean
  output lengths, no percentile: SHEPHERD knows no output-length distribution) form the new batch.
  Victims are running requests whose deadlines are looser than the whole new batch's by more than
  one plan interval (SHEPHERD orders by deadline only); those that already have their first token
  go first, least progress first (no SLO at risk, only their recompute; skipped when a TPOT SLO is
  set), then the others, loosest first. The new batch preempts them when it brings in at least
  `shepherd_preempt_ratio` (lambda, default 2) times as many deadline hits as the victims put at risk;
  otherwise only the victims that risk nothing are preempted.

Unlike QLM, it has no request groups, no virtual queues ordered by a waiting-time estimator, and it
places models by load, not by deadlines.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

from qlmctl.core.cluster import ClusterView, Decision, Dispatch, Evict, InstanceView, SwapModel
from qlmctl.core.estimator import RWTEstimator
from qlmctl.core.request import Request
from qlmctl.policies.base import Policy, PolicyContext
from qlmctl.policies.common import Room, room_of

DEFAULT_PLAN_INTERVAL_S = 5.0
DEFAULT_PREEMPT_RATIO = 2.0
DEFAULT_STICKINESS = 0.5
DEFAULT_WINDOW_S = 60.0
LATE_WEIGHT = 0.1
"""Weight of a request that can no longer meet its deadline in the planner's load (goodput: little)."""

_Entry = tuple[float, int, Request]


@dataclass(slots=True)
class ShepherdStats:
    plans: int = 0
    evictions: int = 0
    swaps: int = 0
    deferred: int = 0
    """Requests moved behind all feasible ones because their deadline could no longer be met."""


class _ModelPool:
    """The queued requests of one model, in three tiers served in order.

    ready: deadline still reachable, earliest deadline first; resumed: preempted after their first
    token, in arrival order; late: deadline no longer reachable, earliest deadline first.
    """

    __slots__ = ("ready", "resumed", "late", "prefill")

    def __init__(self, prefill: Callable[[int], float]) -> None:
        self.ready: list[_Entry] = []
        self.resumed: list[_Entry] = []
        self.late: list[_Entry] = []
        self.prefill = prefill

    def __len__(self) -> int:
        return len(self.ready) + len(self.resumed) + len(self.late)

    def push(self, r: Request, now: float) -> bool:
        """Queue `r` in its tier; True when it went to the late tier."""
        if r.first_token_s is not None:
            heapq.heappush(self.resumed, (r.arrival_s, r.request_id, r))
            return False
        if r.deadline_s < now + self.prefill(r.prompt_tokens):
            heapq.heappush(self.late, (r.deadline_s, r.request_id, r))
            return True
        heapq.heappush(self.ready, (r.deadline_s, r.request_id, r))
        return False

    def purge(self, now: float) -> int:
        """Move ready requests whose deadline became unreachable to the late tier; how many moved."""
        moved = 0
        ready = self.ready
        while ready and ready[0][2].deadline_s < now + self.prefill(ready[0][2].prompt_tokens):
            entry = heapq.heappop(ready)
            heapq.heappush(self.late, entry)
            moved += 1
        return moved

    def head(self) -> list[_Entry] | None:
        """The tier whose first request is served next (call `purge` first)."""
        for tier in (self.ready, self.resumed, self.late):
            if tier:
                return tier
        return None

    def requests(self) -> Iterator[Request]:
        for tier in (self.ready, self.resumed, self.late):
            for _, _, r in tier:
                yield r


class ShepherdPolicy(Policy):
    """SHEPHERD-like (NSDI'23, adapted): periodic load-based model planner, EDF batches, preemption."""

    name: ClassVar[str] = "shepherd"
    takes_evictions: ClassVar[bool] = True

    def __init__(self, ctx: PolicyContext) -> None:
        super().__init__(ctx)
        p = ctx.params
        self.plan_interval_s = float(p.get("shepherd_plan_interval_s", DEFAULT_PLAN_INTERVAL_S))
        self.preempt_ratio = float(p.get("shepherd_preempt_ratio", DEFAULT_PREEMPT_RATIO))
        self.stickiness = float(p.get("shepherd_stickiness", DEFAULT_STICKINESS))
        self.window_s = float(p.get("shepherd_window_s", DEFAULT_WINDOW_S))
        if min(self.plan_interval_s, self.preempt_ratio, self.window_s) <= 0 or self.stickiness < 0:
            raise ValueError("shepherd parameters: interval, window and preempt ratio must be > 0, stickiness >= 0")
        self.est = RWTEstimator(ctx.profiles, ctx.percentile)
        self.stats = ShepherdStats()
        self._pools: dict[str, _ModelPool] = {}
        self._arrivals: dict[str, deque[float]] = {}
        self._target: dict[int, str] = {}
        self._swapping_to: dict[int, str] = {}
        self._evicting: set[int] = set()
        self._count = 0
        self._next_plan = -math.inf
        self._open = True

    # ------------------------------------------------------------- hooks
    def _pool(self, model: str) -> _ModelPool:
        pool = self._pools.get(model)
        if pool is None:
            prof = self.ctx.profiles.get(model)
            prefill = prof.prefill_time if prof is not None else (lambda _n: 0.0)
            pool = self._pools[model] = _ModelPool(prefill)
        return pool

    def add_request(self, request: Request, now: float) -> None:
        self._arrivals.setdefault(request.model, deque()).append(now)
        if self._pool(request.model).push(request, now):
            self.stats.deferred += 1
        self._count += 1
        self._open = True

    def on_finished(self, request: Request, now: float) -> None:
        self.est.observe(request.model, request.prompt_tokens, request.generated_tokens)
        self._open = True

    def on_instance_changed(self, instance_id: int) -> None:
        self._swapping_to.pop(instance_id, None)
        self._open = True

    def on_evicted(self, request: Request, now: float) -> None:
        self._evicting.discard(request.request_id)
        if self._pool(request.model).push(request, now):
            self.stats.deferred += 1
        self._count += 1
        self._open = True

    def num_queued(self) -> int:
        return self._count

    def queue_depths(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for pool in self._pools.values():
            for r in pool.requests():
                out[r.slo_class] = out.get(r.slo_class, 0) + 1
        return out

    def queue_groups(self) -> dict[tuple[str, str], int]:
        """One pool per model."""
        return {(m, self.name): n for m, pool in self._pools.items() if (n := sum(1 for _ in pool.requests()))}

    def next_wakeup(self, now: float) -> float | None:
        if not self._count:
            return None
        return max(self._next_plan, now)

    # ---------------------------------------------------------- schedule
    def schedule(self, cluster: ClusterView) -> list[Decision]:
        now = cluster.now()
        out: list[Decision] = []
        if self._count and now >= self._next_plan:
            self._next_plan = now + self.plan_interval_s
            self._plan(cluster)
            self.stats.plans += 1
            if self.ctx.enable_eviction:
                out.extend(self._preemptions(cluster, now))
            self._open = True
        if not self._open:
            return out
        self._open = False
        out.extend(self._swaps(cluster))
        if not self._count:
            return out
        rooms: dict[str, list[Room]] = {}
        for inst in cluster.instances:
            room = room_of(inst, self.ctx.dispatch_limit)
            if room is None or self._target.get(inst.instance_id, inst.model) != inst.model:
                continue  # serving nothing now, or draining before a planned swap
            rooms.setdefault(inst.model, []).append(room)
        for model, pool in self._pools.items():
            serving = rooms.get(model)
            if not serving or not len(pool):
                continue
            self.stats.deferred += pool.purge(now)
            while True:
                tier = pool.head()
                if tier is None:
                    break
                r = tier[0][2]
                best = None
                for rm in serving:
                    if rm.fits(r) and (best is None or rm.load < best.load):
                        best = rm
                if best is None:
                    break
                heapq.heappop(tier)
                self._count -= 1
                best.take(r)
                out.append(Dispatch(r, best.inst.instance_id))
        return out

    def _swaps(self, cluster: ClusterView) -> list[Decision]:
        """Swap drained instances to the model the plan gave them."""
        if not self.ctx.enable_swap:
            return []
        out: list[Decision] = []
        for inst in cluster.instances:
            iid = inst.instance_id
            target = self._target.get(iid)
            if target is None or target == inst.model or inst.swapping or not inst.healthy:
                continue
            if iid in self._swapping_to or inst.num_running + inst.num_waiting > 0:
                continue
            if inst.profile_for(target) is None:
                continue
            self._swapping_to[iid] = target
            self.stats.swaps += 1
            out.append(SwapModel(iid, target))
        return out

    # ---------------------------------------------------------- planning
    def _load(self, cluster: ClusterView, model: str, running: int) -> float:
        """Instances `model` needs: recent arrival rate plus backlog over one window, over its service rate."""
        now = cluster.now()
        arrivals = self._arrivals.get(model)
        while arrivals and arrivals[0] < now - self.window_s:
            arrivals.popleft()
        pool = self._pools.get(model)
        backlog = float(running)
        if pool is not None:
            backlog += len(pool.ready) + len(pool.resumed) + LATE_WEIGHT * len(pool.late)
        # Over the window, or the time elapsed so far (but at least one plan interval: no burst of
        # the first second taken for a rate).
        span = max(min(self.window_s, now), self.plan_interval_s)
        per_s = (len(arrivals) if arrivals else 0) / span + backlog / self.window_s
        if per_s <= 0:
            return 0.0
        prof = self.ctx.profiles.get(model)
        if prof is None:
            for inst in cluster.instances:
                prof = inst.profile_for(model)
                if prof is not None:
                    break
        if prof is None:
            return 0.0
        return per_s / self.est.rate(prof, model).requests_per_s

    def _plan(self, cluster: ClusterView) -> None:
        """Herd, adapted: seats (instances) per model by D'Hondt on load, then instances to seats."""
        insts = [i for i in cluster.instances if i.healthy]
        current = {i.instance_id: self._swapping_to.get(i.instance_id, i.model) for i in insts}
        if not self.ctx.enable_swap:
            self._target = {iid: m for iid, m in current.items() if m is not None}
            return
        for pool in self._pools.values():
            self.stats.deferred += pool.purge(cluster.now())
        running: dict[str, int] = {}
        for i in insts:
            if i.model is not None:
                running[i.model] = running.get(i.model, 0) + i.num_running + i.num_waiting
        models = set(self._pools) | set(running)
        loads = {m: self._load(cluster, m, running.get(m, 0)) for m in models}
        loads = {m: v for m, v in loads.items() if v > 0 and any(i.profile_for(m) for i in insts)}
        if not loads:
            self._target = {iid: m for iid, m in current.items() if m is not None}
            return
        held = {m: sum(1 for x in current.values() if x == m) for m in loads}
        seats = dict.fromkeys(loads, 0)
        # Herd serves every model somewhere: one instance each first, largest load first (held
        # models ahead on a near tie), then the rest by D'Hondt.
        cover = sorted(loads, key=lambda m: (-loads[m] * (1.0 + self.stickiness * (held[m] > 0)), m))
        for m in cover[: len(insts)]:
            seats[m] = 1
        for _ in range(len(insts) - sum(seats.values())):
            # Only models whose load exceeds the instances they have compete for another one.
            short = [m for m in sorted(loads) if loads[m] > seats[m]]
            if not short:
                break

            def quotient(m: str) -> float:
                bonus = 1.0 + self.stickiness if seats[m] < held[m] else 1.0
                return loads[m] * bonus / (seats[m] + 1)

            seats[max(short, key=quotient)] += 1
        target: dict[int, str] = {}
        free: list[InstanceView] = []
        for i in insts:
            m = current[i.instance_id]
            if m is not None and seats.get(m, 0) > 0:
                seats[m] -= 1
                target[i.instance_id] = m
            else:
                free.append(i)
        # Remaining seats: the least-busy free instances, warm loads first.
        for m in sorted(seats, key=lambda m: -loads[m]):
            for _ in range(seats[m]):
                cands = [i for i in free if i.profile_for(m) is not None]
                if not cands:
                    break
                pick = min(cands, key=lambda i: (i.num_running + i.num_waiting, i.load_time(m), i.instance_id))
                free.remove(pick)
                target[pick.instance_id] = m
        for i in free:  # nothing to give it: keep what it holds
            if current[i.instance_id] is not None:
                target[i.instance_id] = current[i.instance_id]  # type: ignore[assignment]
        self._target = target

    def _preemptions(self, cluster: ClusterView, now: float) -> list[Decision]:
        """Flex, adapted: preempt looser-deadline running requests for a batch that would miss waiting."""
        out: list[Decision] = []
        for inst in cluster.instances:
            model = inst.model
            room = room_of(inst, 0)
            if room is None or model is None or self._target.get(inst.instance_id, model) != model:
                continue
            pool = self._pools.get(model)
            if pool is None or not pool.ready:
                continue
            head = pool.ready[0][2]
            if room.fits(head):
                continue  # a slot is free: no need to preempt
            prof = inst.profile
            assert prof is not None
            rate = self.est.rate(prof, model)
            # The new batch: feasible requests, in EDF order, that miss if they wait for slots to free.
            limit = max(1, rate.concurrency)
            batch: list[Request] = []
            for pos, (_, _, r) in enumerate(heapq.nsmallest(limit, pool.ready), start=1):
                start = now + self.est.completions_time(pos, rate, model, pct=False)
                if start + prof.prefill_time(r.prompt_tokens) > r.deadline_s:
                    batch.append(r)
            if not batch:
                continue
            loosest_needed = max(r.deadline_s for r in batch) + self.plan_interval_s
            victims: list[tuple[tuple[int, float], Request, bool]] = []
            for r in inst.running_requests():
                if r.request_id in self._evicting or r.deadline_s <= loosest_needed:
                    continue
                if r.first_token_s is None:
                    victims.append(((1, -r.deadline_s), r, True))
                elif r.tpot_slo_s is None:
                    victims.append(((0, now - r.first_token_s), r, False))
            if not victims:
                continue
            victims.sort(key=lambda v: v[0])
            chosen = victims[: len(batch)]
            horizon = now + self.est.completions_time(len(pool.ready) + len(chosen), rate, model, pct=False)
            at_risk = sum(1 for _, r, unstarted in chosen if unstarted and r.deadline_s < horizon)
            if len(batch) < self.preempt_ratio * at_risk:
                chosen = [v for v in chosen if not (v[2] and v[1].deadline_s < horizon)]
            for _, r, _ in chosen:
                self._evicting.add(r.request_id)
                self.stats.evictions += 1
                out.append(Evict(r, inst.instance_id))
        return out
