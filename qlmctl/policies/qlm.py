"""QLM: request groups on virtual queues, the RWT estimator, and pulling by the engine's real bottleneck.

- **Groups.** Requests join the group of their model and SLO bucket (FCFS inside). A request that can no
  longer get its first token in time moves to its model's late group (see "Late" below).
- **Pull.** An instance takes a request only while it has room for what it can start within the next
  `prefill_lookahead_steps` engine steps: batch slots and KV blocks, and prompt tokens against the chunked
  prefill budget (`max_num_batched_tokens` a step); while it serves a class with a TPOT SLO, also no more
  sequences than keep its steps within that TPOT. Everything else waits here, where a later, more urgent
  request can still go first. (Handing an engine all it has slots for lets the queue form inside the
  engine, first come first served, out of reach: `qlm-basic` does that.)
- **Order.** Each instance takes the most urgent head among its model's groups: earliest deadline
  (objectives `most` and `weighted`), or tightest class first, then earliest deadline (`strict`: a
  tighter class is never given up for a looser one).
- **Plan**, every `reschedule_interval_s` (and when groups appear): per model, the RWT estimator walks the
  queued requests in that order over the instances serving the model and predicts each one's TTFT (start
  behind the batch slots and the prefill work ahead of it, its own prefill, the engine's admission lag).
  Where a request is predicted to miss, it does what Moore and Hodgson's rule does for the most jobs on
  time on one machine: it defers the costliest request taken so far (the one whose removal frees the most
  capacity: prefill work plus its expected share of the batch, from output lengths learned per class; for
  `weighted`, the least worth per cost; for `strict`, only within the class that is short), so that
  several cheaper ones make it instead of one expensive one. Deferred requests go to the late group.
  Groups are also placed on instances (virtual queues), which decides model swaps: a virtual queue whose
  first group is another model drains its instance and swaps it.
- **Late.** A late request is a miss whatever happens now; it is served after every on-time request of
  its model, in arrival order, and never dropped. Under `strict`, after every on-time request of its own
  class but before looser classes' (a tighter class is never given up for a looser one, late or not). Under sustained overload it therefore waits until the
  overload passes; `scheduler.admission: reject` refuses such requests at arrival instead (429 live).
- **Engine priority.** On an engine that schedules by priority (vLLM's `--scheduling-policy priority`),
  each request carries its place in this order as its priority, so the engine's own waiting queue and its
  choice of preemption victim agree with the plan.
- **Eviction.** When an instance is full and its most urgent head would miss its deadline waiting for a
  slot, running requests of far looser classes are evicted (back to the head of their group).
"""

from __future__ import annotations

import heapq
import itertools
import math
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from heapq import heapify, heappush
from typing import ClassVar, Final

from qlmctl.core.calibration import TTFTCalibration
from qlmctl.core.cluster import ClusterView, Decision, InstanceView, Reject
from qlmctl.core.estimator import ServiceRate
from qlmctl.core.groups import LATE_BUCKET, GroupKey, RequestGroup, group_key
from qlmctl.core.request import Request
from qlmctl.policies.base import PolicyContext
from qlmctl.policies.common import Room, RoomBook
from qlmctl.policies.qlm_basic import PlanStats as BasicPlanStats
from qlmctl.policies.qlm_basic import QLMBasicPolicy

LATE_PRIORITY: Final = 10**15
"""Engine priority of a late request, above every on-time one (which are deadlines in ms, see `_priority`)."""
CLASS_PRIORITY: Final = 10**12
"""Engine priority step between classes under the strict objective (more ms than any run lasts)."""
TPOT_MARGIN: Final = 0.9
"""Fraction of a TPOT SLO the predicted time per output token may use (steps vary around their mean)."""
ARRIVAL_WINDOW_S: Final = 10.0
"""Time constant of the arrival rates per model and class the estimator extrapolates (see `_Arrivals`)."""

SWAP_WAIT_SHARE: Final = 0.1
"""While a swap is coming, a request of a loaded model whose mean TTFT is above this share of its TTFT SLO is
predicted as one waiting on swaps (see `_predict`): short waits are not, as the instances serve them before
they go (W_B, 60 req/s: the 14B's batch-2 requests, predicted at 500 s from its loaded instance, waited 900 s
while it was swapped out; coverage 0.13)."""

_NO_KEYS: Final[list[GroupKey]] = []
"""The virtual queue of an instance that has none (never changed)."""

SWAP_LOOKAHEAD: Final = 512
"""Queued requests per model that a swap's worth looks at (in urgency order)."""


@dataclass(slots=True)
class _Arrivals:
    """Recent arrivals of one (model, SLO class): a decayed rate and the mean prompt, for the requests that
    will arrive while a queued one waits and go before it."""

    rate: float = 0.0
    """Requests per second, decayed over ARRIVAL_WINDOW_S."""
    t: float = 0.0
    prompt: float = 0.0
    """Mean prompt tokens (decayed the same way)."""

    def add(self, now: float, prompt_tokens: int) -> None:
        decay = math.exp(-(now - self.t) / ARRIVAL_WINDOW_S) if now > self.t else 1.0
        w = 1.0 / ARRIVAL_WINDOW_S
        self.prompt = (self.prompt * self.rate * decay + prompt_tokens * w) / (self.rate * decay + w)
        self.rate = self.rate * decay + w
        self.t = now

    def rate_at(self, now: float) -> float:
        return self.rate * math.exp(-(now - self.t) / ARRIVAL_WINDOW_S) if now > self.t else self.rate


LAG_WINDOW: Final = 256
"""Recent engine admission lags kept per model (see `_update_lag`)."""
LAG_MIN: Final = 20
"""Lags needed before their quantile replaces the profile's."""


class _Memo(dict):
    """A function's values by argument, computed on first use."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def __missing__(self, key):
        v = self[key] = self.fn(key)
        return v


def _deadline(r: Request) -> float:
    return r.deadline_s


def _lag_at(prof, load: int) -> float:
    """The profile's model of the admission lag on an instance running `load` sequences: the steps an engine
    runs before admitting a new request (two with asynchronous scheduling) and the client-side delay."""
    steps = 2 if prof.async_scheduling else 1
    return (steps * prof.decode_step_time(load) if load else 0.0) + prof.client_delay(load)


def _prefill_work_per_token(prof, mean: int) -> float:
    """Prefill work per prompt token at a prompt of `mean` tokens."""
    return prof.prefill_work_s(mean) / mean


class _Quantiles:
    """Recent samples of a delay, with quantiles recomputed every few samples (cheap on a hot path)."""

    __slots__ = ("samples", "_sorted", "_stale")

    def __init__(self, maxlen: int = LAG_WINDOW) -> None:
        self.samples: deque[float] = deque(maxlen=maxlen)
        self._sorted: list[float] = []
        self._stale = 0

    def add(self, x: float) -> None:
        self.samples.append(x)
        self._stale += 1

    def __len__(self) -> int:
        return len(self.samples)

    def quantile(self, q: float) -> float:
        if self._stale >= 16 or len(self._sorted) < min(len(self.samples), LAG_MIN):
            self._sorted = sorted(self.samples)
            self._stale = 0
        s = self._sorted
        return s[min(len(s) - 1, max(0, int(math.ceil(q * len(s))) - 1))]


@dataclass(slots=True, init=False)
class _Server:
    """One instance serving a model, as the per-request walk of a plan sees it."""

    rate: ServiceRate
    running: int
    queued: int = 0
    """Requests the walk has put here so far."""
    prefill_s: float = 0.0
    """Prefill work ahead of the next request: what the engine still has, plus what the walk put here."""
    tpot_cap: int | None = None
    concurrency: int = 0
    """Sequences the engine runs now."""

    # Written out: the dataclass's generated one would be interpreted code in the compiled build.
    def __init__(self, rate: ServiceRate, running: int, queued: int = 0, prefill_s: float = 0.0,
                 tpot_cap: int | None = None, concurrency: int = 0) -> None:
        self.rate = rate
        self.running = running
        self.queued = queued
        self.prefill_s = prefill_s
        self.tpot_cap = tpot_cap
        self.concurrency = concurrency

    def start_s(self, pct: bool) -> float:
        """Time until the next request put here can start: a free batch slot, and the prefill ahead."""
        rate = self.rate
        # What the engine runs now it evidently can: the estimator's concurrency (from mean lengths) is a floor.
        conc = max(rate.concurrency, self.concurrency)
        if self.tpot_cap is not None:
            conc = min(conc, self.tpot_cap)
        need = self.running + self.queued - conc + 1
        slot = 0.0
        if need > 0:
            slot = rate.completions_time(need) if pct else need * rate.request_time_s / rate.concurrency
        return max(slot, self.prefill_s)


@dataclass(slots=True)
class PlanStats(BasicPlanStats):
    deferred: int = 0
    """Of the demoted, requests the plan gave up so that more others meet their deadlines."""
    rejected: int = 0


class QLMPolicy(QLMBasicPolicy):
    """QLM: request groups, virtual queues, the RWT estimator, pulling by the engine's bottleneck.

    Builds on `QLMBasicPolicy` (the paper's plain algorithm): its plan's lanes and swaps, its late groups and
    queue views are inherited; what ordering, room, prediction and eviction do differently is overridden here."""

    name: ClassVar[str] = "qlm"
    takes_evictions: ClassVar[bool] = True

    def __init__(self, ctx: PolicyContext) -> None:
        super().__init__(ctx)
        # The plain algorithm's state, but counters with deferrals and a room that counts prefill tokens.
        self.stats = PlanStats()
        self._book = RoomBook(ctx.dispatch_limit, ctx.prefill_lookahead_steps, tracks_steps=True)
        self._by_model: dict[str, list[RequestGroup]] = {}
        self._lag_low: dict[str, float] = {}
        self._lag_seen: dict[str, _Quantiles] = {}
        """Per model, observed admission lags: first token - dispatch - the prompt's own prefill time."""
        self._rank = {name: c.rank for name, c in ctx.slo_classes.items()}
        self._weight = {name: c.weight for name, c in ctx.slo_classes.items()}
        self._tpot = {name: c.tpot_s for name, c in ctx.slo_classes.items() if c.tpot_s is not None}
        self._strict = ctx.objective == "strict"
        self._weighted = ctx.objective == "weighted"
        self._reject = ctx.admission == "reject"
        self._tpot_caps: dict[int, int | None] = {}
        self._starts: dict[str, tuple[float, list[tuple[float, ...]], list[float], list[float]]] = {}
        """Per model, from the last walk: its time, the order keys, each one's predicted start (mean and at the
        estimator's percentile), for predictions and admission at arrival."""
        self._unwalked: dict[str, tuple[tuple[float, float], int]] = {}
        """Per model, from the last walk: what `_unwalked_s` needs (the work per prompt and output token, the
        servers)."""
        self._arrivals: dict[str, dict[str, _Arrivals]] = {}
        """Recent arrivals by model, then class (looked up on every arrival: no tuple made and hashed)."""
        self._future: dict[str, list[tuple[float, int, float]]] = {}
        self._served: set[str] = set()
        """Models some instance serves now (as of the last walk)."""
        self._swap_coming = False
        """Some model with on-time requests queued is not loaded (as of the last walk): a swap is coming."""
        self._servers_of: dict[str, list[int]] = {}
        """Per model, the instances serving it (as of the last walk)."""
        self._worth: dict[tuple[int, str, float], bool] = {}
        """`_swap_worth`'s answers for this plan, per (instance, model, plan time)."""
        self._prefill_times: dict[int, _Memo] = {}
        self._profile_memo: dict[tuple[int, str], _Memo] = {}
        """See `_per_profile`."""
        self._own_prefill = {m: self._prefill_memo(p) for m, p in ctx.profiles.items()}
        """Per model, its default profile's `prefill_time` (memoised): asked for every arrival and queue head."""
        self._keys: dict[str, dict[float, GroupKey]] = {}
        """Group keys by model, then TTFT SLO, see `_key_of`."""
        self._calib_keys: dict[str, dict[str, list[tuple[str, str, bool, bool]]]] = {}
        """The calibration's keys by model and class, see `_calib_key`."""
        self._future_split: dict[str, tuple[list[float], list[float]]] = {}
        """Per model, `_future`'s TTFT SLOs and loads as two lists (see `_ahead`)."""
        self._horizon_s = max(60.0, 20.0 * ctx.reschedule_interval_s)
        """The walk looks at requests due within this long; later ones wait for a later walk."""
        # (`_urgent`, from QLMBasicPolicy: within one dispatch pass, `_most_urgent` of the model last asked, until
        # its queues change. Every open room asks, and with many instances most of them ask about the same heads.)
        self._calib = TTFTCalibration(ctx.percentile)
        """Turns the estimator's mean TTFT predictions into ones at the configured percentile."""
        self._group_start: dict[GroupKey, tuple[float, float, float]] = {}
        """From the last plan, per group: (its time, the predicted start of its head, and of each further
        request), for requests of models no instance serves now (their start is a swap away)."""
        self._rejects: list[Decision] = []

    # ------------------------------------------------------------- hooks
    def add_request(self, request: Request, now: float) -> None:
        of_model = self._arrivals.get(request.model)
        if of_model is None:
            of_model = self._arrivals[request.model] = {}
        arr = of_model.get(request.slo_class)
        if arr is None:
            arr = of_model[request.slo_class] = _Arrivals(t=now)
        arr.add(now, request.prompt_tokens)
        key = self._key_of(request)
        if request.predicted_ttft_s is None:
            miss = self._predict_at_arrival(request, key, now)
            if miss and self._reject:
                self._calib.forget(request.request_id)
                self._rejects.append(Reject(request, "predicted to miss its TTFT SLO at the current load"))
                self.stats.rejected += 1
                return
        g = self._group(key, request.ttft_slo_s)
        if key not in self._planned:
            self._dirty = True
        g.queue.append(request)
        self._count += 1
        self._depth[request.slo_class] = self._depth.get(request.slo_class, 0) + 1
        if len(g.queue) == 1:
            # A new head: rooms that had nothing to take may take it. Behind a head, it changes nothing a
            # blocked room looked at (a room is blocked with the heads as they are; time moving on is seen
            # at the next plan, which unblocks every room).
            self._arrived_models.add(request.model)

    def on_first_token(self, request: Request, now: float) -> None:
        self._touch(request.instance_id)  # its prompt left the engine's prefill backlog
        if request.dispatch_s is not None and request.num_evictions == 0 and request.num_preemptions == 0:
            prefill = self._own_prefill.get(request.model)  # (the default profile's `prefill_time`, memoised)
            if prefill is not None:
                seen = self._lag_seen.get(request.model)
                if seen is None:
                    seen = self._lag_seen[request.model] = _Quantiles()
                pf: float = prefill[request.prompt_tokens]
                seen.add(max(0.0, now - request.dispatch_s - pf))
        self._calib.first_token(request.request_id, now)

    def on_finished(self, request: Request, now: float) -> None:
        self._calib.forget(request.request_id)
        if request.error is None:
            self.est.observe(request.model, request.prompt_tokens, request.generated_tokens, request.slo_class)
        self._touch(request.instance_id)

    def on_evicted(self, request: Request, now: float) -> None:
        self._evicting.discard(request.request_id)
        key = group_key(request, self.ctx.slo_bucket_s)
        if request.first_token_s is None and now > request.deadline_s:
            key = self._late_key(request)
        g = self._group(key, request.ttft_slo_s if key.bucket < LATE_BUCKET else math.inf)
        g.queue.appendleft(request)
        self._count += 1
        self._depth[request.slo_class] = self._depth.get(request.slo_class, 0) + 1
        self._arrived_models.add(request.model)
        self._touch(request.instance_id)

    def _key_of(self, r: Request) -> GroupKey:
        """`group_key(r)`, worked out once per (model, SLO) and reused: it is asked on every arrival."""
        of_model = self._keys.get(r.model)
        if of_model is None:
            of_model = self._keys[r.model] = {}
        key = of_model.get(r.ttft_slo_s)
        if key is None:
            key = of_model[r.ttft_slo_s] = group_key(r, self.ctx.slo_bucket_s)
        return key

    def _group(self, key: GroupKey, slo_s: float) -> RequestGroup:
        g = self.groups.get(key)
        if g is None:
            g = self.groups[key] = RequestGroup(key, slo_s)
            self._by_model.setdefault(key.model, []).append(g)
            self._dirty = True
        return g

    # ---------------------------------------------------------- order
    def _key(self, r: Request) -> tuple[float, ...]:
        """The order of urgency the objective gives (smaller first)."""
        if self._strict:
            return (self._rank.get(r.slo_class, 0), r.deadline_s)
        return (r.deadline_s,)

    def _priority(self, r: Request, late: bool) -> int:
        """`_key` as vLLM's integer priority (lower first): deadlines in ms, classes above them when strict."""
        if late:
            if self._strict:  # after the class's on-time requests, before looser classes'
                return self._rank.get(r.slo_class, 0) * CLASS_PRIORITY + CLASS_PRIORITY // 2 + round(r.arrival_s * 1000)
            return LATE_PRIORITY + round(r.arrival_s * 1000)
        p = round(r.deadline_s * 1000)
        return p + self._rank.get(r.slo_class, 0) * CLASS_PRIORITY if self._strict else p

    def _cost(self, r: Request, prof_rate: tuple[float, float]) -> float:
        """Capacity `r` takes from an instance: its prefill work plus its share of the batch's decode time."""
        pf_s_per_token, slot_s_per_token = prof_rate
        out = self.est.class_output_mean(r.model, r.slo_class)
        return (r.prompt_tokens + r.generated_tokens) * pf_s_per_token + max(0.0, out - r.generated_tokens) * slot_s_per_token

    # ---------------------------------------------------------- schedule
    def _held_decisions(self) -> list[Decision]:
        out, self._rejects = self._rejects, []
        return out

    def _on_schedule(self, now: float) -> None:
        self._calib.advance(now)

    def _after_plan(self, cluster: ClusterView, now: float) -> list[Decision]:
        return self._walk(cluster, now)

    def _next_group(self, inst: InstanceView, room: Room, now: float, out: list[Decision]) -> RequestGroup | None:
        """The group `inst` should take its next request from, if that request fits; None to stop."""
        groups = self.groups
        model = inst.model  # (read once: through the instance view, each read is a lookup)
        for key in self.vqs.get(room.iid, _NO_KEYS):  # (a list either way: iterated natively)
            g = groups.get(key)
            if g is None or not g.queue or not self._ready_head(g, now):  # (an empty group is never ready)
                continue
            if g.model == model:
                break
            # Swap hysteresis (off by default): a model just loaded serves its own queue for a while
            # first, so an instance shared by two busy models does not alternate every few seconds.
            if now < self._resident_until.get(room.iid, -math.inf) and self._has_queued(model):
                continue
            # The plan puts another model next. A swap leaves the instance dead for the sleep and the wake, and
            # this model's queue waits: it is worth it only if it brings more requests in on time than it
            # makes late (`_swap_worth`).
            if not self._swap_worth(inst, g.model, room.load, now):
                continue
            if room.load == 0:  # drained: swap
                out.extend(self._swap(inst, g.model, now))
                return None
            # While that group can wait well beyond the drain and the load, keep the batch full with
            # this model's requests instead of leaving slots idle (work conserving); else stop feeding it.
            if self._can_defer(inst, g, room.load, now):
                continue
            return None
        if self._urgent_valid and self._urgent_model == model:
            best = self._urgent
        else:
            best = self._most_urgent(model, now)
            self._urgent, self._urgent_model, self._urgent_valid = best, model, True
        if best is not None and room.fits(best.queue[0]):
            return best
        return None

    def _most_urgent(self, model: str | None, now: float) -> RequestGroup | None:
        """The group of `model` whose head goes next: the most urgent on-time head, else the oldest late one.
        Under strict precedence a class's late requests go after its on-time ones and before looser classes'."""
        best: RequestGroup | None = None
        best_key: tuple[float, ...] = ()
        best_s = 0.0
        late: RequestGroup | None = None
        strict = self._strict
        k: tuple[float, ...]
        for g in self._by_model.get(model or "", ()):  # (`_ready_head` may add a late group: the loop sees it too)
            q = g.queue
            if not q:
                continue
            if g.late:
                if strict:
                    k = (g.key.bucket - LATE_BUCKET, math.inf)
                    if best is None or k < best_key:
                        best, best_key = g, k
                else:
                    late = g
                continue
            if not self._ready_head(g, now):
                continue
            if strict:
                k = self._key(q[0])
                if best is None or k < best_key:
                    best, best_key = g, k
            else:  # `_key` is (deadline,): the deadlines compared, without the tuples (the same order)
                d = q[0].deadline_s
                if best is None or d < best_s:
                    best, best_s = g, d
        if best is None and late is not None and late.queue:
            return late
        return best

    def _cap_for_tpot(self, room: Room) -> None:
        """While `room`'s instance serves a class with a TPOT SLO, no more sequences than keep steps within it."""
        cap = self._tpot_caps.get(room.inst.instance_id)
        if cap is not None:
            room.slots = min(room.slots, cap - room.load)

    def _swap_worth(self, inst: InstanceView, model: str, load: int, now: float) -> bool:
        """Is swapping `inst` to `model` now better than swapping once its current model's queue is served?

        Counts, in urgency order, the queued requests of `model` that a swap now brings in on time and the
        later swap would not (`saved`), and those of the current model that the swap makes late, having
        to wait for the sleep, the wake, `model`'s queue and the wake back (`lost`, shared with the other
        instances serving that model). Worked out once per plan for each instance and model."""
        key = (inst.instance_id, model, self._next_plan)
        hit = self._worth.get(key)
        if hit is not None:
            return hit
        cur = inst.model
        if cur is None or not self._has_queued(cur):
            # Nothing of the current model waits: the swap costs only idle time, and the late requests of
            # `model` must be served some time (work conserving).
            worth = self._worth[key] = any(g.queue for g in self._by_model.get(model, ()))
            return worth
        new_rate, cur_rate = self._rate_of(inst, model), self._rate_of(inst, cur)
        new_prof, cur_prof = inst.profile_for(model), inst.profile
        if new_rate is None or new_prof is None or cur_rate is None or cur_prof is None:
            self._worth[key] = False
            return False
        cap = SWAP_LOOKAHEAD
        cur_q = list(itertools.islice(heapq.merge(
            *(g.queue for g in self._by_model.get(cur, ()) if g.queue and not g.late), key=self._key), cap))
        new_q = list(itertools.islice(heapq.merge(
            *(g.queue for g in self._by_model.get(model, ()) if g.queue and not g.late), key=self._key), cap))
        each_cur = cur_rate.request_time_s / cur_rate.concurrency
        each_new = new_rate.request_time_s / new_rate.concurrency
        drain = cur_rate.completions_time(load) if load else 0.0
        swap_at = now + drain + inst.load_time(model)  # swap now: `model` starts after the drain and the wake
        later_at = now + len(cur_q) * each_cur + drain + inst.load_time(model)  # after the current queue
        new_pf, cur_pf = self._prefill_cache(new_prof), self._prefill_cache(cur_prof)
        saved = 0
        for j, r in enumerate(new_q):
            pf = new_pf(r.prompt_tokens)
            saved += (swap_at + j * each_new + pf <= r.deadline_s) - (later_at + j * each_new + pf <= r.deadline_s)
        back = swap_at + len(new_q) * each_new + inst.load_time(cur)  # the current model's queue resumes
        lost = 0.0
        for i, r in enumerate(cur_q):
            pf = cur_pf(r.prompt_tokens)
            lost += (now + i * each_cur + pf <= r.deadline_s) - (back + i * each_cur + pf <= r.deadline_s)
        # The swap's dead time (the sleep and the wake, there and back) serves nobody. With the current model's
        # requests waiting, the instance completes that many fewer of them, and under load the shortfall is
        # never made up: it falls on the classes whose SLO is shorter than what this model's queue then
        # waits (a class that can wait longer absorbs it). Counted by their share of its arrivals.
        dead = inst.load_time(model) + inst.load_time(cur)
        away = back - now + len(cur_q) * each_cur  # how long the last of this model's queue waits, the swap taken
        lost += dead * cur_rate.concurrency / cur_rate.request_time_s * self._tight_share(cur, away, now)
        others = sum(1 for i in self._servers_of.get(cur, ()) if i != inst.instance_id)
        worth = self._worth[key] = saved > lost / (1 + others)
        return worth

    def _tight_share(self, model: str, wait_s: float, now: float) -> float:
        """The share of `model`'s recent arrivals whose TTFT SLO is shorter than `wait_s`."""
        total = tight = 0.0
        for cls, arr in self._arrivals.get(model, {}).items():
            c = self.ctx.slo_classes.get(cls)
            if c is None:
                continue
            rate = arr.rate_at(now)
            total += rate
            if c.ttft_s < wait_s:
                tight += rate
        return tight / total if total > 0 else 0.0

    def _hopeless(self, r: Request, now: float) -> bool:
        """Its first token cannot come in time even if it were dispatched now: its own prefill plus the
        steps an engine runs before admitting it (one, two with asynchronous scheduling) and the server's
        frontend delay (which grows with the streams it relays) are too long."""
        if r.first_token_s is not None:
            return False
        prefill = self._own_prefill.get(r.model)
        if prefill is None:
            return now > r.deadline_s
        pf: float = prefill[r.prompt_tokens]  # (typed: the memo's values are untyped, and arithmetic on them generic)
        return now + pf + self._lag_low.get(r.model, 0.0) > r.deadline_s

    def _update_lag(self) -> None:
        """Per model, the admission lag: from dispatch to first token beyond the prompt's own prefill (the
        steps an engine runs before admitting it, the prefills it shares steps with, the API server's queue).
        Measured on recent requests once there are enough (median for estimates, lower quartile for
        "hopeless", so that nothing that could still make it is given up); until then the profile's model
        on the least-loaded instance."""
        measured = [(m, seen) for m, seen in self._lag_seen.items() if len(seen) >= LAG_MIN]
        self._update_lag_model({m for m, _ in measured})
        self._lag_low = dict(self._lag)
        for m, seen in measured:
            self._lag[m] = seen.quantile(0.5)
            self._lag_low[m] = seen.quantile(0.25)

    def _update_lag_model(self, measured: set[str]) -> None:
        """The profile's model of the lag, for the models not `measured` (their measure replaces it)."""
        lag: dict[str, float] = {}
        for rm in self._book.rooms():
            inst = rm.inst
            prof = inst.profile
            m = inst.model
            if prof is None or m is None or m in measured:
                continue
            t = self._per_profile(prof, "lag", _lag_at)[rm.load]
            lag[m] = min(lag.get(m, math.inf), t)
        self._lag = lag

    def _per_profile(self, prof, what: str, fn) -> _Memo:
        """`fn(prof, x)` memoised per x for `prof` (pure functions of a frozen profile, asked once per plan per
        instance with the same few arguments)."""
        memo = self._profile_memo.get((id(prof), what))
        if memo is None:  # the memo holds `prof`, so its id is not reused while the entry lives
            memo = self._profile_memo[(id(prof), what)] = _Memo(lambda x: fn(prof, x))
        return memo

    def _demote(self, g: RequestGroup, r: Request) -> None:
        g.queue.popleft()
        self._urgent_valid = False
        self._to_late(r)

    def _late_key(self, r: Request) -> GroupKey:
        """The late group `r` goes to: its model's, or under strict precedence its model's and class's."""
        return GroupKey(r.model, LATE_BUCKET + (self._rank.get(r.slo_class, 0) if self._strict else 0))

    def _to_late(self, r: Request) -> None:
        self._group(self._late_key(r), math.inf).queue.append(r)
        self.stats.demoted += 1

    def _has_queued(self, model: str | None) -> bool:
        return any(g.queue and not g.late for g in self._by_model.get(model or "", ()))

    # ---------------------------------------------------------- the per-request walk
    def _walk(self, cluster: ClusterView, now: float) -> list[Decision]:
        """Per model, predict each queued request's TTFT in the order of urgency over the instances serving
        the model; defer (or, with admission control, reject) what Moore and Hodgson's rule gives up."""
        out: list[Decision] = []
        self._starts = {}
        caps: dict[int, int | None] = {}
        servers_by_model: dict[str, list[tuple[InstanceView, _Server]]] = {}
        tpot = self._tpot
        for inst in cluster.instances:
            m = inst.model
            prof = inst.profile
            if m is None or inst.swapping or not inst.healthy or prof is None:
                continue
            rate = self._rate_of(inst, m)
            if rate is None:
                continue
            cap = self._tpot_cap(inst, m) if tpot else None  # (None without TPOT classes, without the call)
            caps[inst.instance_id] = cap
            running = inst.num_running
            pending_s = inst.pending_prefill_tokens * self._prefill_s_per_token(prof, m)
            srv = _Server(rate, running + inst.num_waiting, 0, pending_s, cap, running)
            servers_by_model.setdefault(m, []).append((inst, srv))
        self._tpot_caps = caps
        self._served = set(servers_by_model)
        self._swap_coming = any(self._has_queued(m) for m in self._by_model if m not in self._served)
        self._servers_of = {m: [inst.instance_id for inst, _ in s] for m, s in servers_by_model.items()}
        self._worth = {}
        for model, servers in servers_by_model.items():
            out.extend(self._walk_model(model, servers, now))
        return out

    def _walk_model(self, model: str, servers: list[tuple[InstanceView, _Server]], now: float) -> list[Decision]:
        groups = [g for g in self._by_model.get(model, ()) if g.queue and not g.late]
        if not groups:
            return []
        prof = servers[0][0].profile
        assert prof is not None
        lag = self._lag.get(model, 0.0)
        rate = servers[0][1].rate
        per_tok = (self._prefill_s_per_token(prof, model), rate.token_time_s / rate.concurrency)
        future = self._future[model] = self._future_load(model, per_tok, len(servers), now)
        self._future_split[model] = ([slo_s for slo_s, _, _ in future], [load for _, _, load in future])
        srvs = [s for _, s in servers]
        nearest = [s.start_s(False) for s in srvs]  # each server's start for the next request, kept current
        out_len: dict[str, float] = {}  # per class met, the mean output length (a walk often meets one class)
        classes = self.ctx.slo_classes
        prefill = self._prefill_cache(prof)
        limit = 4 * sum([s.rate.concurrency for s in srvs]) + 256
        horizon = self._horizon_s
        strict = self._strict
        keys: list[tuple[float, ...]] = []
        starts: list[float] = []
        starts_pct: list[float] = []
        taken: list[tuple[float, int, Request, int, float]] = []  # max-heap of (-badness, id, request, server, work)
        deferred: set[int] = set()
        # In urgency order (merging one queue gives that queue: skip the merge's machinery, the common case).
        queued = groups[0].queue if len(groups) == 1 else heapq.merge(*(g.queue for g in groups), key=self._key)
        for r in queued:
            if r.deadline_s - now > horizon:
                if strict:
                    continue  # a looser class may still come
                break  # the rest is due later than the plan looks ahead: a later walk takes it
            if len(starts) >= limit:
                break
            tokens = r.prompt_tokens + r.generated_tokens
            own_pf = prefill(tokens)
            i = nearest.index(min(nearest)) if len(srvs) > 1 else 0
            srv = srvs[i]
            start = nearest[i]
            start_pct = srv.start_s(True)
            if r.predicted_ttft_s is None:
                base = now - r.arrival_s + own_pf + lag
                ahead = self._ahead(r, future, now) if future else None
                self._predict(r, base + self._stretch(start, ahead), base + self._stretch(start_pct, ahead))
            keys.append(self._key(r))
            starts.append(start)
            starts_pct.append(start_pct)
            work = tokens * per_tok[0]
            cls = r.slo_class
            mean_out = out_len.get(cls)
            if mean_out is None:
                mean_out = out_len[cls] = self.est.class_output_mean(model, cls) if cls in classes \
                    else rate.request_time_s
            bad = self._badness(r, work + max(0.0, mean_out - r.generated_tokens) * per_tok[1])
            if now + start + own_pf + lag > r.deadline_s:
                self.stats.predicted_violations += 1
                # Moore-Hodgson: give up the worst request taken so far if that is worse than giving up this one.
                victim = self._victim(taken, r)
                if victim is None or victim[0] >= -bad:
                    deferred.add(r.request_id)
                    continue
                taken.remove(victim)
                heapify(taken)
                _, _, v, vi, vwork = victim
                self._put(srvs[vi], vwork, -1)
                nearest[vi] = srvs[vi].start_s(False)
                deferred.add(v.request_id)
                i = nearest.index(min(nearest)) if len(srvs) > 1 else 0
            self._put(srvs[i], work, +1)
            nearest[i] = srvs[i].start_s(False)
            heappush(taken, (-bad, r.request_id, r, i, work))
        self._starts[model] = (now, keys, starts, starts_pct)
        self._unwalked[model] = (per_tok, len(srvs))
        return self._give_up(groups, deferred, now)

    def _prefill_cache(self, prof) -> Callable[[int], float]:
        """`prof.prefill_time`, memoised per prompt length (the walk asks for the same lengths often)."""
        return self._prefill_memo(prof).__getitem__

    def _prefill_memo(self, prof) -> _Memo:
        """`_prefill_cache`'s memo itself: subscripted, it costs less than a call of its bound method."""
        cache = self._prefill_times.get(id(prof))
        if cache is None:
            cache = self._prefill_times[id(prof)] = _Memo(prof.prefill_time)
        return cache

    def _future_load(self, model: str, per_tok: tuple[float, float], servers: int,
                     now: float) -> list[tuple[float, int, float]]:
        """Per SLO class of `model`: (its TTFT SLO, its rank, the share of the servers' capacity its
        arrivals take), from recent arrival rates and class lengths."""
        out = []
        for cls, arr in self._arrivals.get(model, {}).items():
            c = self.ctx.slo_classes.get(cls)
            if c is None:
                continue
            rate = arr.rate_at(now)
            if rate <= 0:
                continue
            out_len = self.est.class_output_mean(model, cls)
            cost = arr.prompt * per_tok[0] + out_len * per_tok[1]
            out.append((c.ttft_s, c.rank, rate * cost / servers))
        return out

    def _ahead(self, r: Request, future: list[tuple[float, int, float]], now: float
               ) -> tuple[float, list[float], list[float]]:
        """The arrivals that will go before `r` (see `_stretch`), worked out once for its several starts: per
        class, how long its arrivals still go first (under EDF while their deadline comes before `r`'s: `r`'s
        time left less the class's SLO; under strict precedence always, for the tighter classes) and its load.
        As (`r`'s time left, the classes' SLOs, their loads): under EDF the lists are the model's, shared by
        every request (`_future_split`). Lists of floats, not of tuples: the compiled build reads them
        unboxed."""
        if self._strict:
            slos: list[float] = []
            loads: list[float] = []
            rank = self._rank.get(r.slo_class, 0)
            for _, c_rank, load in future:
                if c_rank < rank:
                    slos.append(0.0)  # (inf - 0: always ahead)
                    loads.append(load)
            return math.inf, slos, loads
        slos, loads = self._future_split[r.model]
        return r.deadline_s - now, slos, loads

    @staticmethod
    def _stretch(start: float, ahead: tuple[float, list[float], list[float]] | None) -> float:
        """`start` stretched by the requests that will arrive before it and still go first (`_ahead`; None:
        no arrivals): under EDF those whose deadline comes earlier, under strict precedence those of tighter
        classes."""
        if ahead is None:
            return start
        left, slos, loads = ahead
        n = len(slos)
        base = start
        # A fixed point: the longer it waits, the more arrive ahead of it. Each round is a function of `start`
        # alone, so once a round leaves it unchanged (e.g. nothing ahead at 0 s) the rest would too.
        for _ in range(3):
            extra = 0.0
            for i in range(n):
                cap = left - slos[i]
                m = cap if cap < start else start  # max(0.0, min(start, cap)), without the calls
                extra += loads[i] * (m if m > 0.0 else 0.0)
            new = base + extra
            if new == start:
                return new
            start = new
        return start

    def _prefill_s_per_token(self, prof, model: str) -> float:
        """Prefill work per prompt token of `model`, at its mean prompt length (attention pairs included)."""
        return self._per_profile(prof, "pf/token", _prefill_work_per_token)[max(1, int(self.est.prompt_mean(model)))]

    @staticmethod
    def _put(srv: _Server, prefill_s: float, sign: int) -> None:
        srv.queued += sign
        srv.prefill_s += sign * prefill_s

    def _badness(self, r: Request, cost: float) -> float:
        """What deferring `r` saves: its cost (per unit of worth, for the weighted objective)."""
        return cost / self._weight.get(r.slo_class, 1.0) if self._weighted else cost

    def _victim(self, taken: list, r: Request) -> tuple | None:
        """The request to defer in `r`'s place: the worst taken so far (of `r`'s own class when strict)."""
        if not taken:
            return None
        if not self._strict:
            return taken[0]
        rank = self._rank.get(r.slo_class, 0)
        same = [e for e in taken if self._rank.get(e[2].slo_class, 0) >= rank]
        return min(same) if same else None

    def _give_up(self, groups: list[RequestGroup], deferred: set[int], now: float) -> list[Decision]:
        """Move the deferred requests to the late group (or reject those never dispatched, with admission)."""
        out: list[Decision] = []
        if not deferred:
            return out
        for g in groups:
            if not any(r.request_id in deferred for r in g.queue):
                continue
            keep = []
            for r in g.queue:
                if r.request_id not in deferred:
                    keep.append(r)
                    continue
                self.stats.deferred += 1
                if self._reject and r.dispatch_s is None:
                    self._count -= 1
                    self._depth[r.slo_class] -= 1
                    self.stats.rejected += 1
                    self._calib.forget(r.request_id)
                    out.append(Reject(r, "predicted to miss its TTFT SLO at the current load"))
                else:
                    self._to_late(r)
            g.queue.clear()
            g.queue.extend(keep)
        return out

    def _predict_at_arrival(self, r: Request, key: GroupKey, now: float) -> bool:
        """Record `r`'s predicted TTFT from its place by urgency in the last walk over its model's queue (its
        start then, less the time since); True when the mean prediction misses its deadline. `key`: its group."""
        model = r.model
        prefill = self._own_prefill.get(model)
        if prefill is None:
            return False
        pf: float = prefill[r.prompt_tokens]
        own = pf + self._lag.get(model, 0.0)
        start = start_pct = 0.0
        future = self._future.get(model)
        ahead = self._ahead(r, future, now) if future else None
        planned = self._group_start.get(key) if model not in self._served else None
        if planned is not None:
            t, head, each = planned
            g = self.groups.get(key)
            start = start_pct = max(0.0, head - (now - t)) + (len(g.queue) if g is not None else 0) * each
        else:
            walk = self._starts.get(model)
            if walk is not None:
                t, keys, starts, starts_pct = walk
                if not starts:
                    # The walk reached no request (every queued one is due beyond its horizon): all the
                    # queued requests due before `r` go first.
                    order = self._key(r)
                    start = self._unwalked_s(model, (-math.inf,) * len(order), order)
                    start_pct = self._stretch(start, ahead)
                else:
                    order = self._key(r)
                    i = bisect_left(keys, order)
                    # Beyond the walk's reach (it stops at its horizon), the queued requests between its
                    # last one and `r` go first too.
                    beyond = self._unwalked_s(model, keys[-1], order) if i == len(starts) else 0.0
                    i = min(i, len(starts) - 1)
                    start = max(0.0, starts[i] - (now - t)) + beyond
                    start_pct = self._stretch(max(0.0, starts_pct[i] - (now - t)) + beyond, ahead)
        miss = now + start + own > r.deadline_s
        self._predict(r, self._stretch(start, ahead) + own, start_pct + own)
        return miss

    def _unwalked_s(self, model: str, after: tuple[float, ...], before: tuple[float, ...]) -> float:
        """Service time of the on-time requests of `model` queued with order keys in (`after`, `before`): ones
        the last walk did not reach, at their classes' mean lengths, spread over the model's servers."""
        per_tok, servers = self._unwalked[model]
        prompt = self.est.prompt_mean(model) * per_tok[0]
        strict = self._strict
        # Under EDF a key is (deadline,): its deadline is compared instead, without the tuples (the same order).
        after_s, before_s = (0.0, 0.0) if strict else (after[0], before[0])
        total = 0.0
        for g in self._by_model.get(model, ()):
            q = g.queue
            if not q or g.late:
                continue
            # FCFS within a group of one SLO: its keys rise along the queue. (A bisection of a deque reads
            # its middle, which costs the deque's length: skipped where the ends answer, the common case.)
            if strict:
                key = self._key
                first, last = key(q[0]), key(q[-1])
                if first >= before or last <= after:
                    continue
                n = ((len(q) if last < before else bisect_left(q, before, key=key))
                     - (0 if first > after else bisect_right(q, after, key=key)))
            else:
                first_s, last_s = q[0].deadline_s, q[-1].deadline_s
                if first_s >= before_s or last_s <= after_s:
                    continue
                n = ((len(q) if last_s < before_s else bisect_left(q, before_s, key=_deadline))
                     - (0 if first_s > after_s else bisect_right(q, after_s, key=_deadline)))
            if n > 0:
                total += n * (prompt + self.est.class_output_mean(model, q[0].slo_class) * per_tok[1])
        return total / max(1, servers)

    def _predict(self, r: Request, mean_s: float, pct_s: float) -> None:
        """Record `r`'s predicted TTFT: the mean, calibrated to the configured percentile (`TTFTCalibration`;
        `pct_s`, the estimator's own percentile, is the first guess)."""
        # How far off an estimate runs depends on whether the model is loaded (else its start waits on the
        # swaps the plan foresees): each has its own factor.
        loaded = r.model in self._served
        # A request whose start waits on swaps (its model is not loaded, or is and waits long while a swap is
        # coming that may take its instances away) starts when its slack runs low, between other models'
        # turns, rather than where the estimate puts it: its prediction lies between the mean and its deadline.
        bound = -math.inf < r.ttft_slo_s < math.inf and (not loaded or (  # (math.isfinite, without a call)
            self._swap_coming and mean_s > SWAP_WAIT_SHARE * r.ttft_slo_s))
        r.predicted_ttft_s = self._calib.predict(r.request_id, r.arrival_s, mean_s, pct_s,
                                                 key=self._calib_key(r.model, r.slo_class, loaded, bound),
                                                 ttft_slo_s=r.ttft_slo_s if bound else None)

    def _calib_key(self, model: str, cls: str, loaded: bool, bound: bool) -> tuple[str, str, bool, bool]:
        """(model, class, loaded, bound), the one tuple of these values: the calibration looks it up on every
        prediction, and a key that is the very object stored is found without comparing."""
        of_model = self._calib_keys.get(model)
        if of_model is None:
            of_model = self._calib_keys[model] = {}
        keys = of_model.get(cls)
        if keys is None:
            keys = of_model[cls] = [(model, cls, lo, bo) for lo in (False, True) for bo in (False, True)]
        return keys[(2 if loaded else 0) + (1 if bound else 0)]

    def _tpot_cap(self, inst: InstanceView, model: str) -> int | None:
        """The most sequences `inst` may run while it serves a class with a TPOT SLO (None: no such class)."""
        if not self._tpot:
            return None
        running = {r.slo_class for r in inst.running_requests()}
        tight = min((t for c, t in self._tpot.items() if self._depth.get(c, 0) > 0 or c in running), default=None)
        if tight is None:
            return None
        prof = inst.profile
        assert prof is not None
        mu = max(1.0, self.est.output_mean(model))
        pf = prof.prefill_work_s(int(self.est.prompt_mean(model)))
        lo, hi = 1, prof.max_num_seqs
        while lo < hi:  # the largest batch whose time per output token stays within the SLO
            mid = (lo + hi + 1) // 2
            if prof.decode_step_time(mid) + mid * pf / mu <= TPOT_MARGIN * tight:
                lo = mid
            else:
                hi = mid - 1
        return lo

    # ---------------------------------------------------------- planning
    def _placed(self, g: RequestGroup, chosen: list, slack: float, rate: ServiceRate, now: float) -> None:
        """When `g`'s head is due to start (for predictions while its model is not loaded: `_group_start`)."""
        head = chosen[0][0]
        if chosen[0][1]:
            # A swap waits while the group can (`_can_defer`: twice the drain and the load): the instance
            # keeps its model busy until the head's slack comes down to that, then drains and loads.
            head = max(head, slack - (head - chosen[0][2].offset_s))
        self._group_start[g.key] = (now, head, rate.completions_time(1.0) / len(chosen))

    def _plan_violation(self) -> None:
        pass  # counted per request in the walk

    def _evictions(self, cluster: ClusterView, now: float) -> list[Decision]:
        """Make room for an urgent group at the head of a full instance's queue."""
        out: list[Decision] = []
        for inst in cluster.instances:
            # `room_of(inst, 0)` is None or has a slot: without building the Room (this runs every plan).
            prof = inst.profile
            if inst.swapping or not inst.healthy or prof is None:
                continue
            if prof.max_num_seqs - (inst.num_running + inst.num_waiting) > 0:
                continue
            head = self._most_urgent(inst.model, now)
            if head is None or head.late or not head.queue:
                continue
            out.extend(self._evict_for(inst, head, now))
        return out


class QLMStrictPolicy(QLMPolicy):
    """qlm with strict class precedence: a tighter class is never given up for a looser one."""

    name: ClassVar[str] = "qlm-strict"

    def __init__(self, ctx: PolicyContext) -> None:
        super().__init__(replace(ctx, objective="strict"))
