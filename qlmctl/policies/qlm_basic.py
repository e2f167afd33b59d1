"""qlm-basic: QLM as first built here, kept for comparison with `qlm` (qlmctl/policies/qlm.py).

It follows the paper's plain algorithm: request groups ordered by their head's deadline on per-instance
virtual queues, the RWT estimator to foresee violations, eviction and swaps; and it hands an engine every
request it has a batch slot and KV blocks for. Under chunked prefill the token budget runs out long before
the slots, so the queue forms inside the engine, first come first served, out of its reach; `qlm` pulls by
the engine's real bottleneck instead (see there).

- Requests join the group of their model and SLO bucket (FCFS inside). A request that can no longer get
  its first token in time (its deadline is nearer than its own prefill) moves to its model's late group,
  which is served last: it is a miss whatever happens, and serving it first would only make others miss.
- Each instance has a virtual queue of group keys; it pulls from the first group with requests, which must
  match its loaded model (else it drains and swaps). One group may sit on several instances (replicas
  share its FIFO), and an instance whose queue has run dry pulls from any group of its model (work
  conserving).
- The plan (`plan_queues`) is rebuilt when groups appear, when the estimator predicts a violation in the
  current plan, or when the cluster changed, at most every `reschedule_interval_s`. It orders groups by
  head deadline and places each on the instances where the estimator says it starts soonest, preferring
  instances that already run its model when that still meets the deadline, and spreads a group over more
  replicas while that brings its tail in.
- Eviction: when an instance is full and the head of its queue would miss its deadline waiting for a slot,
  running requests of far less urgent groups are evicted (back to the head of their group) to make room.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from operator import itemgetter
from typing import ClassVar

from qlmctl.core.cluster import ClusterView, Decision, Dispatch, Evict, InstanceView, SwapModel
from qlmctl.core.estimator import RWTEstimator, ServiceRate
from qlmctl.core.groups import LATE_BUCKET, GroupKey, RequestGroup, group_key
from qlmctl.core.request import Request
from qlmctl.policies.base import Policy, PolicyContext
from qlmctl.policies.common import Room, RoomBook, room_of


@dataclass(slots=True, init=False)
class _Lane:
    """Planning state of one instance while groups are placed on it."""

    inst: InstanceView
    model: str | None
    ahead: float  # requests ahead (running + planned), in requests
    offset_s: float  # time before `ahead` starts counting (swaps planned)
    planned: list[GroupKey]
    rates: dict[str, ServiceRate | None] = field(default_factory=dict)  # per model, this plan
    loads: dict[str, float] = field(default_factory=dict)  # load time per model, this plan

    # Written out: the dataclass's generated one would be interpreted code in the compiled build.
    def __init__(self, inst: InstanceView, model: str | None, ahead: float, offset_s: float, planned: list[GroupKey],
                 rates: dict[str, ServiceRate | None] | None = None, loads: dict[str, float] | None = None) -> None:
        self.inst = inst
        self.model = model
        self.ahead = ahead
        self.offset_s = offset_s
        self.planned = planned
        self.rates = {} if rates is None else rates
        self.loads = {} if loads is None else loads


@dataclass(slots=True)
class PlanStats:
    plans: int = 0
    predicted_violations: int = 0
    evictions: int = 0
    swaps: int = 0
    demoted: int = 0
    """Requests moved to a late group: hopeless (or, in qlm, deferred)."""


class QLMBasicPolicy(Policy):
    """QLM as first built: groups ordered by head deadline, slot-and-KV room (for comparison with qlm)."""

    name: ClassVar[str] = "qlm-basic"
    takes_evictions: ClassVar[bool] = True

    def __init__(self, ctx: PolicyContext) -> None:
        super().__init__(ctx)
        self.est = RWTEstimator(ctx.profiles, ctx.percentile)
        self.groups: dict[GroupKey, RequestGroup] = {}
        self.vqs: dict[int, list[GroupKey]] = {}
        self.stats = PlanStats()
        self._count = 0
        self._dirty = True
        self._next_plan = -math.inf
        self._book = RoomBook(ctx.dispatch_limit, tracks_steps=True)
        self._tpot: dict[str, float] = {}
        """TPOT SLO per class that has one (qlm keeps batches within them; none here)."""
        self._urgent: RequestGroup | None = None
        """Within one dispatch pass, while `_urgent_valid`: the group of `_urgent_model` whose head goes next (qlm's
        `_most_urgent`). One entry, not one per model: most calls dispatch once, and what a change (a dispatch, a
        demotion) makes it forget, `_most_urgent` finds again the same, with nothing more to demote."""
        self._urgent_model: str | None = None
        self._urgent_valid = False
        self._arrived_models: set[str] = set()
        self._depth: dict[str, int] = {}
        self._planned: set[GroupKey] = set()  # keys on some virtual queue
        self._evicting: set[int] = set()
        self._swapping_to: dict[int, str] = {}
        self._rates: dict[tuple[int, str], ServiceRate] = {}
        self._resident_until: dict[int, float] = {}  # swap hysteresis, see _next_group
        self._lag: dict[str, float] = {}  # admission lag per model, see _hopeless
        self._lag_gen = 0  # counts `_lag`'s updates (`_ready_head`)

    # ------------------------------------------------------------- hooks
    def add_request(self, request: Request, now: float) -> None:
        key = group_key(request, self.ctx.slo_bucket_s)
        g = self.groups.get(key)
        if g is None:
            g = self.groups[key] = RequestGroup(key, request.ttft_slo_s)
            self._dirty = True
        elif key not in self._planned:
            self._dirty = True
        g.queue.append(request)
        self._count += 1
        self._depth[request.slo_class] = self._depth.get(request.slo_class, 0) + 1
        self._arrived_models.add(request.model)

    def on_finished(self, request: Request, now: float) -> None:
        self.est.observe(request.model, request.prompt_tokens, request.generated_tokens)
        self._touch(request.instance_id)

    def on_instance_changed(self, instance_id: int) -> None:
        self._swapping_to.pop(instance_id, None)
        self._touch(instance_id)
        self._dirty = True

    def on_evicted(self, request: Request, now: float) -> None:
        self._evicting.discard(request.request_id)
        key = group_key(request, self.ctx.slo_bucket_s)
        if request.first_token_s is None and now > request.deadline_s:
            key = GroupKey(request.model, LATE_BUCKET)
        g = self.groups.get(key)
        if g is None:
            g = self.groups[key] = RequestGroup(key, request.ttft_slo_s)
            self._dirty = True
        g.queue.appendleft(request)
        self._count += 1
        self._depth[request.slo_class] = self._depth.get(request.slo_class, 0) + 1
        self._arrived_models.add(request.model)
        self._touch(request.instance_id)

    def _touch(self, instance_id: int | None) -> None:
        self._book.touch(instance_id)

    def on_instance_stepped(self, instance_id: int) -> None:
        self._book.stepped(instance_id)  # what was read of its room is out of date; the room (blocked or not) stands

    def num_queued(self) -> int:
        return self._count

    def queue_depths(self) -> dict[str, int]:
        return dict(self._depth)

    def queue_groups(self) -> dict[tuple[str, str], int]:
        width = self.ctx.slo_bucket_s
        out: dict[tuple[str, str], int] = {}
        for key, g in self.groups.items():
            if g.queue:
                label = "late" if g.late else f"{key.bucket * width:g}-{(key.bucket + 1) * width:g}s"
                out[(key.model, label)] = out.get((key.model, label), 0) + len(g.queue)
        return out

    def next_wakeup(self, now: float) -> float | None:
        if not self._count:
            return None
        return max(self._next_plan, now)

    # ---------------------------------------------------------- schedule
    def schedule(self, cluster: ClusterView) -> list[Decision]:
        out = self._held_decisions()
        if not self._count:
            return out  # nothing queued (most calls): no plan, no dispatch
        now = cluster.now()
        self._on_schedule(now)
        if now >= self._next_plan:
            self._next_plan = now + self.ctx.reschedule_interval_s
            self._update_lag()  # from the rooms as of the last call: refreshed once per plan, off the hot path
            self._lag_gen += 1  # what `_ready_head` found under the old lag is to be found again
            self._demote_expired(now)
            if self._dirty or self._predicts_violation(cluster, now):
                self.vqs = self.plan_queues(cluster, now)
                self._planned = {k for vq in self.vqs.values() for k in vq}
                self.stats.plans += 1
                self._dirty = False
            out.extend(self._after_plan(cluster, now))
            if self.ctx.enable_eviction:
                out.extend(self._evictions(cluster, now))
            self._book.unblock(set(self.ctx.profiles) | {g.model for g in self.groups.values()})
        if not self._count:
            return out
        book = self._book
        book.refresh(cluster)
        if self._arrived_models:
            book.unblock(self._arrived_models)
            self._arrived_models.clear()
        insts = cluster.instances
        for iid in book.unloaded():
            inst = insts[iid]
            if not inst.swapping and inst.healthy:
                out.extend(self._maybe_swap(inst, now))
        # Least-loaded first, one request at a time, so replicas of a model share its load.
        # (The book scans its open rooms for the least loaded, again after each dispatch: most calls dispatch one
        # or two requests, and a scan costs less than a heap of (load, id, room) or a list of the rooms.)
        tpot = self._tpot
        self._urgent_valid = False
        while self._count:
            room = book.least_loaded()
            if room is None:
                break
            iid = room.iid
            book.read(room)
            if tpot:  # (without TPOT classes every cap is None)
                self._cap_for_tpot(room)
            g = self._next_group(room.inst, room, now, out)  # (a method call: native in the compiled build)
            if g is None:
                book.block(room)
                continue
            r = g.queue.popleft()
            self._urgent_valid = False
            self._count -= 1
            self._depth[r.slo_class] -= 1
            room.take(r)
            book.took(room)
            prio = self._priority(r, g.late) if room.inst.scheduling_policy == "priority" else None
            out.append(Dispatch(r, iid, prio))
        return out

    # What qlm adds to the schedule above (no-ops here: the paper's algorithm).
    def _held_decisions(self) -> list[Decision]:
        """Decisions made outside `schedule` (admission control's refusals), handed out with the next call."""
        return []

    def _on_schedule(self, now: float) -> None:
        """A schedule call at `now` with requests queued, before anything else."""

    def _after_plan(self, cluster: ClusterView, now: float) -> list[Decision]:
        """After each planning tick (and the plan, when it was made again)."""
        return []

    def _cap_for_tpot(self, room: Room) -> None:
        """Narrow `room` to the batch a TPOT SLO allows (called only with `_tpot` classes: qlm's)."""

    def _priority(self, r: Request, late: bool) -> int | None:
        """The `priority` a request goes to a priority-scheduling engine with (None: its own)."""
        return None

    def _next_group(self, inst: InstanceView, room: Room, now: float, out: list[Decision]) -> RequestGroup | None:
        """The group `inst` should take its next request from, if that request fits; None to stop."""
        for key in self.vqs.get(inst.instance_id, ()):
            g = self.groups.get(key)
            if g is None or not self._ready_head(g, now):
                continue
            if g.model != inst.model:
                # Swap hysteresis (off by default): a model just loaded serves its own queue for a while
                # first, so an instance shared by two busy models does not alternate every few seconds.
                if now < self._resident_until.get(inst.instance_id, -math.inf) and self._has_queued(inst.model):
                    continue
                # The plan puts another model next: stop feeding this one, drain, then swap.
                if room.load == 0:
                    out.extend(self._swap(inst, g.model, now))
                    return None
                # While that group can wait well beyond the drain and the load, keep the batch full with
                # this model's later groups instead of leaving slots idle (work conserving).
                if self._can_defer(inst, g, room.load, now):
                    continue
                return None
            return g if room.fits(g.queue[0]) else None
        # Work conserving: the queue ran dry, so take any group of this model, most urgent first.
        best = None
        for g in list(self.groups.values()):  # _ready_head may demote into a new late group
            if g.model == inst.model and self._ready_head(g, now):
                if best is None or (g.late, g.head_deadline()) < (best.late, best.head_deadline()):
                    best = g
        if best is not None and room.fits(best.queue[0]):
            return best
        return None

    def _can_defer(self, inst: InstanceView, g: RequestGroup, load: int, now: float) -> bool:
        """Can `g` (another model) wait while `inst` keeps serving its current model?"""
        cur = self._rate_of(inst, inst.model) if inst.model is not None else None
        if cur is None:
            return False
        drain = cur.completions_time(load + 1)
        return g.head_deadline() - now > 2.0 * (drain + inst.load_time(g.model))

    def _ready_head(self, g: RequestGroup, now: float) -> bool:
        """Demote expired heads; True when `g` has a request to give."""
        q = g.queue
        if not q:
            return False
        head = q[0]
        if g.ready_head is head and g.ready_s == now and g.ready_gen == self._lag_gen:
            return True  # asked by every open room of a call: `_hopeless` depends on the head, now and the lag
        while q and not g.late and self._hopeless(q[0], now):
            self._demote(g, q[0])
        if not q:
            return False
        g.ready_head, g.ready_s, g.ready_gen = q[0], now, self._lag_gen
        return True

    def _hopeless(self, r: Request, now: float) -> bool:
        """Its first token cannot come in time even if it were dispatched now: its own prefill plus the
        steps an engine runs before admitting it (one, two with asynchronous scheduling) and the server's
        frontend delay (which grows with the streams it relays) are too long."""
        if r.first_token_s is not None:
            return False
        prof = self.ctx.profiles.get(r.model)
        if prof is None:
            return now > r.deadline_s
        return now + prof.prefill_time(r.prompt_tokens) + self._lag.get(r.model, 0.0) > r.deadline_s

    def _update_lag(self) -> None:
        """Per model, the admission lag on its least-loaded instance (steps before a new request runs)."""
        lag: dict[str, float] = {}
        for rm in self._book.rooms():
            prof = rm.inst.profile
            if prof is None or rm.inst.model is None:
                continue
            d = rm.load
            steps = 2 if prof.async_scheduling else 1
            t = (steps * prof.decode_step_time(d) if d else 0.0) + prof.client_delay(d)
            m = rm.inst.model
            lag[m] = min(lag.get(m, math.inf), t)
        self._lag = lag

    def _demote(self, g: RequestGroup, r: Request) -> None:
        g.queue.popleft()
        key = GroupKey(g.model, LATE_BUCKET)
        late = self.groups.get(key)
        if late is None:
            late = self.groups[key] = RequestGroup(key, math.inf)
            self._dirty = True
        late.queue.append(r)
        self.stats.demoted += 1

    def _demote_expired(self, now: float) -> None:
        for g in list(self.groups.values()):
            if g.late:
                continue
            while g.queue and self._hopeless(g.queue[0], now):
                self._demote(g, g.queue[0])

    def _maybe_swap(self, inst: InstanceView, now: float) -> list[Decision]:
        if inst.profile is not None or inst.instance_id in self._swapping_to:
            return []
        # Nothing loaded: load the model of the first group planned here.
        for key in self.vqs.get(inst.instance_id, []):
            g = self.groups.get(key)
            if g is not None and g.queue:
                return self._swap(inst, g.model, now)
        return []

    def _has_queued(self, model: str | None) -> bool:
        return any(g.queue and g.model == model and not g.late for g in self.groups.values())

    def _swap(self, inst: InstanceView, model: str, now: float) -> list[Decision]:
        if not self.ctx.enable_swap or inst.instance_id in self._swapping_to or inst.profile_for(model) is None:
            return []
        self._swapping_to[inst.instance_id] = model
        # Optional hysteresis (scheduler.params): keep a model at least this long after loading it.
        load = inst.load_time(model)
        residency = max(float(self.ctx.params.get("min_residency_s", 0.0)),  # type: ignore[arg-type]
                        float(self.ctx.params.get("residency_load_factor", 0.0)) * load)  # type: ignore[arg-type]
        self._resident_until[inst.instance_id] = now + load + residency
        self.stats.swaps += 1
        return [SwapModel(inst.instance_id, model)]

    # ---------------------------------------------------------- planning
    def _lanes(self, cluster: ClusterView) -> list[_Lane]:
        lanes = []
        swapping_to = self._swapping_to
        for inst in cluster.instances:
            if not inst.healthy:
                continue
            model = swapping_to.get(inst.instance_id, inst.model)
            offset = inst.load_time(model) if inst.swapping and model else 0.0
            # (the per-plan dicts passed, not made by the dataclass's default factories: once per lane and plan)
            lanes.append(_Lane(inst, model, float(inst.num_running + inst.num_waiting), offset, [], {}, {}))
        return lanes

    def _rate_of(self, inst: InstanceView, model: str) -> ServiceRate | None:
        """The estimator's service rate of `model` on `inst`, cached for one plan."""
        key = (inst.instance_id, model)
        hit = self._rates.get(key)
        if hit is None:
            prof = inst.profile_for(model)
            if prof is None:
                return None
            hit = self._rates[key] = self.est.rate(prof, model)
        return hit

    def _planned_rate(self, lane: _Lane, model: str) -> ServiceRate | None:
        try:
            return lane.rates[model]
        except KeyError:
            r = lane.rates[model] = self._rate_of(lane.inst, model)
            return r

    def _start_on(self, lane: _Lane, model: str) -> tuple[float, bool]:
        """Estimated time from now until a request of `model` queued at the end of `lane` starts."""
        rate = self._planned_rate(lane, model)
        if rate is None:
            return math.inf, False
        if lane.model == model:
            # It starts once `ahead - concurrency + 1` of the requests ahead have finished.
            return lane.offset_s + rate.completions_time(lane.ahead - rate.concurrency + 1), False
        if not self.ctx.enable_swap:
            return math.inf, True
        drain = 0.0
        if lane.model is not None and lane.ahead > 0:
            cur = self._planned_rate(lane, lane.model)
            if cur is not None:
                drain = cur.completions_time(lane.ahead)
        load = lane.loads.get(model)
        if load is None:
            load = lane.loads[model] = lane.inst.load_time(model)
        return lane.offset_s + drain + load, True

    def plan_queues(self, cluster: ClusterView, now: float) -> dict[int, list[GroupKey]]:
        """The heuristic global scheduler: place and order groups on virtual queues."""
        self._rates = {}
        lanes = self._lanes(cluster)
        groups = [g for g in self.groups.values() if g.queue]
        groups.sort(key=lambda g: (g.late, g.head_deadline(), g.key))
        for g in groups:
            n = len(g.queue)
            model = g.model
            slack = g.head_deadline() - now
            options = []
            for lane in lanes:
                if lane.model == model:  # `_start_on` for a lane already serving the model, inlined (hot loop)
                    rates = lane.rates  # `_planned_rate`, without its KeyError on a lane's first look
                    if model in rates:
                        rate_l = rates[model]
                    else:
                        rate_l = rates[model] = self._rate_of(lane.inst, model)
                    if rate_l is not None:
                        options.append((lane.offset_s + rate_l.completions_time(lane.ahead - rate_l.concurrency + 1),
                                        False, lane))
            # Prefer not swapping when that still meets the head's deadline: then swaps are not looked at (the
            # spread below passes them over too).
            no_swap_ok = [o for o in options if o[0] <= slack]
            if not no_swap_ok:
                for lane in lanes:
                    if lane.model != model:
                        start, swap = self._start_on(lane, model)
                        if start < math.inf:
                            options.append((start, swap, lane))
            if not options:
                continue
            pool = no_swap_ok or options
            pool.sort(key=lambda o: (o[0], o[1], o[2].inst.instance_id))
            chosen = [pool[0]]
            # Spread over more replicas of the same model while that brings the tail in sooner.
            rate = self._rate_of(chosen[0][2].inst, g.model)
            assert rate is not None
            for start, swap, lane in sorted(options, key=itemgetter(0)):
                if lane is chosen[0][2] or swap:
                    continue
                k = len(chosen)
                tail_now = max(o[0] for o in chosen) + rate.completions_time(n / k)
                if start >= tail_now:
                    break
                chosen.append((start, swap, lane))
            share = n / len(chosen)
            self._placed(g, chosen, slack, rate, now)
            for start, swap, lane in chosen:
                if swap:
                    lane.offset_s = start
                    lane.ahead = 0.0
                    lane.model = g.model
                lane.ahead += share
                lane.planned.append(g.key)
        return {lane.inst.instance_id: lane.planned for lane in lanes}

    def _placed(self, g: RequestGroup, chosen: list[tuple[float, bool, _Lane]], slack: float, rate: ServiceRate,
                now: float) -> None:
        """`plan_queues` placed `g` on the lanes `chosen` ((start, swap, lane), the first one first); qlm
        records when its head is due to start."""

    def _predicts_violation(self, cluster: ClusterView, now: float) -> bool:
        """Does the current plan make some group's head miss its deadline (per the estimator)?"""
        self._rates = {}
        lanes = {lane.inst.instance_id: lane for lane in self._lanes(cluster)}
        for iid, vq in self.vqs.items():
            lane = lanes.get(iid)
            if lane is None:
                return True
            for key in vq:
                g = self.groups.get(key)
                if g is None or not g.queue:
                    continue
                start, swap = self._start_on(lane, g.model)
                if not g.late and now + start > g.head_deadline():
                    self._plan_violation()
                    return True
                if swap:
                    lane.offset_s, lane.ahead, lane.model = start, 0.0, g.model
                lane.ahead += len(g.queue)
        return False

    def _plan_violation(self) -> None:
        """`_predicts_violation` found a head the plan makes late (qlm counts its predicted violations per
        request in its walk instead)."""
        self.stats.predicted_violations += 1

    def _evictions(self, cluster: ClusterView, now: float) -> list[Decision]:
        """Make room for an urgent group at the head of a full instance's queue."""
        out: list[Decision] = []
        for inst in cluster.instances:
            room = room_of(inst, 0)
            if room is None or room.slots > 0:
                continue
            head = None
            for key in self.vqs.get(inst.instance_id, []):
                g = self.groups.get(key)
                if g is not None and g.queue:
                    head = g
                    break
            if head is None or head.late or head.model != inst.model:
                continue
            out.extend(self._evict_for(inst, head, now))
        return out

    def _evict_for(self, inst: InstanceView, head: RequestGroup, now: float) -> list[Decision]:
        """Evictions on the full instance `inst` for `head`, the group it serves next, if that group's head
        would miss its deadline waiting for a slot: running requests of groups whose SLO is far looser."""
        prof = inst.profile
        assert prof is not None
        rate = self.est.rate(prof, head.model)
        wait = self.est.wait_time(0, inst.num_running + inst.num_waiting, rate, head.model)
        r0 = head.queue[0]
        slack = r0.deadline_s - now - prof.prefill_time(r0.prompt_tokens) - prof.client_delay(inst.num_running)
        if wait <= slack:
            return []
        # Victims: youngest first (least recompute).
        victims = [
            r
            for r in inst.running_requests()
            if r.request_id not in self._evicting and r.ttft_slo_s >= 4 * head.slo_s
            and (r.first_token_s is not None or r.deadline_s - now > 4 * head.slo_s)
        ]
        urgent = sum(1 for r in head.queue if r.deadline_s - now < 2 * wait)
        victims.sort(key=lambda r: (-r.ttft_slo_s, r.generated_tokens))
        out: list[Decision] = []
        for r in victims[: max(1, min(urgent, len(victims)))]:
            self._evicting.add(r.request_id)
            self.stats.evictions += 1
            out.append(Evict(r, inst.instance_id))
        return out
