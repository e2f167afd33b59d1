"""The simulated cluster: simulator engines behind the ClusterView seam, driven by a discrete-event loop.

The loop jumps between three kinds of time points: the next request arrival, the next engine boundary
(each engine reports its own), and the policy's next wake-up. After each, the driver
(`qlmctl.core.driver`) runs the policy and carries out its decisions at that same instant; this module
supplies the driver's `World`: a clock that jumps, a timer that is the loop's next time point, and the
engines' operations.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from heapq import heappop, heappush
from operator import attrgetter
from typing import Any, Final

from qlmctl.core.driver import Driver
from qlmctl.core.request import Request
from qlmctl.policies.base import Policy
from qlmctl.scenario import Scenario
from simulator.api_server import APIServer
from simulator.engine import Engine, Output, OutputKind, Sequence
from simulator.profile import EngineProfile

INF: Final = math.inf
NO_ENTRY: Final = -math.inf  # (no event time equals it)
_FINISHED: Final = OutputKind.FINISHED
_FIRST_TOKEN: Final = OutputKind.FIRST_TOKEN
_LOADED: Final = OutputKind.LOADED
SIM_RESOLUTION_S: Final = 1e-6
"""The simulated clock's tick: a wake-up asked for at or before now comes this much later."""


def _usage(inst: "SimInstance") -> float | None:
    """Peak KV use of an instance: its peak blocks over the KV capacity of the models it ran (the largest)."""
    total = max((p.kv_blocks for p in inst._profiles.values()), default=0)
    return inst.engine.stats.peak_blocks / total if total else None


class SimInstance:
    """One simulated vLLM instance, as the scheduler sees it (implements InstanceView).

    `instance_id`, `model`, `profile` and `swapping` are plain attributes (policies read them on every call):
    the cluster keeps the last three current with `sync` whenever a swap begins or ends."""

    healthy = True

    def __init__(
        self,
        instance_id: int,
        name: str,
        gpu: str,
        profiles: dict[str, EngineProfile],
        model: str | None,
        engine_policy: str,
        warm: bool = True,
    ) -> None:
        self.instance_id = instance_id
        self.name = name
        self.gpu = gpu
        self._profiles = profiles
        self.engine = Engine(profiles[model] if model else None, engine_policy)
        # Models asleep in CPU memory (or loaded): with `warm`, every model the instance hosts, as the live
        # launcher with sleep mode starts them all; else only the one it starts with.
        self._warm: set[str] = set(profiles) if warm else ({model} if model else set())
        self.requests: dict[int, tuple[Request, Sequence]] = {}
        self.swaps = 0
        self.swap_after_drain: str | None = None
        """A model to load once the requests still on the engine have finished (the instance takes none meanwhile)."""
        self.api_server = APIServer(self.engine)
        self.model: str | None = None
        """The model loaded now (None while nothing is loaded)."""
        self.profile: EngineProfile | None = None
        """Timing profile of the loaded model on this instance's GPU."""
        self.swapping = False
        """True while a model swap is under way (or waits for the instance to drain); it serves nothing then."""
        self.sync()

    def sync(self) -> None:
        """Bring `model`, `profile` and `swapping` up to date with the engine."""
        eng = self.engine
        self.profile = eng.profile
        self.model = eng.model
        self.swapping = eng.loading or self.swap_after_drain is not None

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    @property
    def num_waiting(self) -> int:
        return self.engine.num_waiting

    @property
    def free_kv_blocks(self) -> int:
        return self.engine.free_blocks

    @property
    def pending_prefill_tokens(self) -> int:
        """Prompt tokens dispatched here and not yet prefilled (see `Engine.pending_prefill_tokens`)."""
        return self.engine.pending_prefill_tokens

    @property
    def scheduling_policy(self) -> str:
        return self.engine.policy

    def running_requests(self) -> list[Request]:
        return [r for r, _ in self.requests.values()]

    def remaining_output_tokens(self) -> int:
        return sum(r.output_tokens - s.generated for r, s in self.requests.values())

    def profile_for(self, model: str) -> EngineProfile | None:
        return self._profiles.get(model)

    def frontend_delay(self) -> float:
        """What a client sees on top of the engine's time now (see `APIServer.frontend_delay`)."""
        return self.api_server.frontend_delay()

    def ingress_delay(self, now: float) -> float:
        """Count a dispatch at `now`; return how long its request waits in the API server before the engine
        sees it (see `APIServer.ingress_delay`)."""
        return self.api_server.ingress_delay(now)

    def load_time(self, model: str) -> float:
        """Seconds to swap to `model`: putting the loaded model to sleep (its sleep_s), then waking `model`
        from CPU memory (load_warm_s) or, the first time without sleep mode, loading it (load_cold_s)."""
        prof = self._profiles.get(model)
        if prof is None:
            return INF
        load = prof.load_warm_s if model in self._warm else prof.load_cold_s
        cur = self.engine.profile
        if cur is not None and cur.model != model:
            load += cur.sleep_s
        return load


@dataclass
class SimResult:
    policy: str
    requests: list[Request]
    instances: list[dict[str, Any]]
    num_swaps: int
    num_evictions: int
    sim_duration_s: float
    wall_s: float
    events: int
    timeline: list[tuple[float, str, int, str, str, float]] = field(default_factory=list)
    """(time_s, kind, instance_id, model, slo_class, value) rows: queue depth samples, swaps, evictions."""
    policy_stats: dict[str, Any] = field(default_factory=dict)
    policy_errors: int = 0
    """Decisions the driver refused (see qlmctl.core.driver)."""


class SimulatedCluster:
    """A cluster of simulated instances running one policy over one list of requests (implements ClusterView)."""

    def __init__(
        self,
        scenario: Scenario,
        policy: Policy,
        requests: Seq[Request],
        sample_interval_s: float | None = None,
    ) -> None:
        self.scenario = scenario
        self.policy = policy
        # By (arrival, id): two stable sorts on plain keys, not one on tuples, which would allocate a tuple per
        # request (and, after the copies just made, set off a full collection of every live object: ~30 ms).
        self.requests = sorted(sorted(requests, key=attrgetter("request_id")), key=attrgetter("arrival_s"))
        self._instances: list[SimInstance] = []
        # One object per distinct profile (instances of one GPU type and flags share it), so that what policies
        # and the estimator work out per profile (memoised by identity) is worked out once, not per instance.
        same: dict[EngineProfile, EngineProfile] = {}
        usage = policy.through_gateway and scenario.usage_in_every_chunk()
        for iid, (name, spec) in enumerate(scenario.instance_specs()):
            profiles: dict[str, EngineProfile] = {}
            for m in scenario.models:
                prof = scenario.profile(m, spec.gpu, spec.profile_overrides, spec.engine)
                if usage:
                    prof = prof.with_usage_stats()
                profiles[m] = same.setdefault(prof, prof)
            discipline = spec.engine.scheduling_policy or policy.engine_policy
            self._instances.append(SimInstance(iid, name, spec.gpu, profiles, spec.model, discipline,
                                               warm=scenario.spec.cluster.first_load == "warm"))
        self._now = 0.0
        self._seqs: dict[int, Sequence] = {}
        self._engines = [inst.engine for inst in self._instances]
        self._heap: list[tuple[float, int]] = []
        self._pushed: list[float] = [NO_ENTRY] * len(self._instances)
        """Per engine, the time of its one live entry in `_heap` (NO_ENTRY: none; a float, not None, so that the
        compiled loop compares natively)."""
        self._evictions = 0
        self._done = 0
        span = self.requests[-1].arrival_s - self.requests[0].arrival_s if self.requests else 0.0
        self._sample_dt = sample_interval_s or max(0.5, span / 400.0)
        self._next_sample = 0.0
        self.timeline: list[tuple[float, str, int, str, str, float]] = []
        self._touched: set[int] = set()
        self.driver = Driver(policy, self)

    # ClusterView
    @property
    def instances(self) -> list[SimInstance]:
        return self._instances

    def now(self) -> float:
        return self._now

    steps_reported = True
    """An engine's state changes only when it advances, and each advance is reported (`Policy.on_instance_stepped`),
    its preemptions too (`Policy.on_preempted`)."""

    # World (the driver's operations)
    resolution_s = SIM_RESOLUTION_S

    def holds(self, request: Request, instance_id: int) -> bool:
        return request.request_id in self._instances[instance_id].requests

    def dispatch(self, request: Request, instance_id: int, now: float, priority: int | None) -> bool:
        r = request
        inst = self._instances[instance_id]
        rid = r.request_id
        seq = self._seqs.get(rid)
        if seq is None:
            seq = self._seqs[rid] = Sequence(rid, r.prompt_tokens, r.output_tokens, r.priority, r.arrival_s, r,
                                             r.prefix)  # (positional: tag, prefix)
        if priority is not None:
            seq.priority = priority
        inst.engine.submit(seq, now, inst.api_server.ingress_delay(now))
        inst.requests[rid] = (r, seq)
        self._touched.add(instance_id)
        return True

    def preempt(self, request: Request, instance_id: int, now: float) -> None:
        inst = self._instances[instance_id]
        inst.engine.abort(inst.requests[request.request_id][1], now)
        self._touched.add(instance_id)

    def load_model(self, instance_id: int, model: str, now: float) -> None:
        inst = self._instances[instance_id]
        if inst.requests:
            inst.swap_after_drain = model
            inst.sync()
            return
        self._load(inst, model, now)
        self._touched.add(instance_id)

    def fail_request(self, request: Request, error: str, now: float) -> None:
        request.error = error
        self._done += 1

    def reject(self, request: Request, now: float) -> None:
        self._done += 1

    def applied(self, now: float) -> None:
        engines = self._engines
        stepped = self.driver.stepped
        for iid in self._touched:
            outs = engines[iid].advance(now)
            stepped(iid)
            if outs:
                self._handle(iid, outs)
            self._push(iid)
        self._touched.clear()

    def _load(self, inst: SimInstance, model: str, now: float) -> None:
        prof = inst.profile_for(model)
        assert prof is not None  # the driver checked
        dur = inst.load_time(model)
        inst.engine.load_model(prof, now, dur)
        inst.sync()
        inst._warm.add(model)
        inst.swaps += 1
        self.timeline.append((now, "swap", inst.instance_id, model, "", dur))

    # ------------------------------------------------------------------ run
    def run(self, progress: Callable[[int, int], None] | None = None) -> SimResult:
        # The loop makes no reference cycles worth collecting, but millions of short-lived objects, whose
        # allocation counts set off collections that walk every live request: without the cycle collector a
        # million-request run is a fifth faster, and its cost stays linear in requests.
        gc_on = gc.isenabled()
        gc.disable()
        try:
            return self._run(progress)
        finally:
            if gc_on:
                gc.enable()

    def _run(self, progress: Callable[[int, int], None] | None) -> SimResult:
        wall0 = time.perf_counter()
        reqs = self.requests
        n = len(reqs)
        i = 0
        events = 0
        heap = self._heap
        pushed = self._pushed
        engines = self._engines
        # (The driver's and this object's methods called as methods, not bound to locals: compiled, a method
        # call is a direct native call, a bound method object a generic one.)
        driver = self.driver
        wake: float | None = None
        last_progress = 0
        max_len = {m: max(inst.profile_for(m).max_model_len for inst in self._instances) for m in self.scenario.models}  # type: ignore[union-attr]
        t_arr = reqs[0].arrival_s if n else INF
        while True:
            # The heap's top is live if it is its engine's latest entry (see _push).
            while heap and heap[0][0] != pushed[heap[0][1]]:
                heappop(heap)
            t_eng = heap[0][0] if heap else INF
            now = t_arr if t_arr < t_eng else t_eng
            if wake is not None and wake < now:
                now = wake
            if now == INF:
                break
            self._now = now
            events += 1
            while heap and heap[0][0] <= now:
                t, iid = heappop(heap)
                if pushed[iid] != t:
                    continue  # superseded
                pushed[iid] = NO_ENTRY
                outs = engines[iid].advance(now)
                driver.stepped(iid)
                if outs:
                    self._handle(iid, outs)
                self._push(iid)
            while t_arr <= now:
                r = reqs[i]
                i += 1
                t_arr = reqs[i].arrival_s if i < n else INF
                if r.prompt_tokens + r.output_tokens > max_len.get(r.model, 0):
                    # vLLM answers 400 to such a request; it is counted as failed, not dropped.
                    r.error = "prompt_tokens + max_tokens exceeds max_model_len"
                    self._done += 1
                    continue
                driver.arrived(r, now)
            if now >= self._next_sample:
                self._sample(now)
            wake = driver.schedule(now)
            if progress is not None and self._done - last_progress >= 2000:
                last_progress = self._done
                progress(self._done, n)
        if progress is not None:
            progress(self._done, n)
        for r in reqs:
            if r.finish_s is None and r.error is None:
                r.error = "not served: nothing could run it (no instance can host its model?)"
        end = max((r.finish_s for r in reqs if r.finish_s is not None), default=0.0)
        start = reqs[0].arrival_s if reqs else 0.0
        insts = self.instance_records(end - start)
        return SimResult(
            policy=self.policy.name,
            requests=list(reqs),
            instances=insts,
            num_swaps=sum(inst.swaps for inst in self._instances),
            num_evictions=self._evictions,
            sim_duration_s=end - start,
            wall_s=time.perf_counter() - wall0,
            events=events,
            timeline=self.timeline,
            policy_stats=self.policy.stats_dict(),
            policy_errors=driver.stats.policy_errors,
        )

    def instance_records(self, span_s: float) -> list[dict[str, Any]]:
        """Each instance's counters so far (what `SimResult.instances` holds); `span_s`, the run's span,
        is the denominator of utilisation."""
        return [
            {
                "instance_id": inst.instance_id,
                "name": inst.name,
                "gpu": inst.gpu,
                "busy_s": inst.engine.stats.busy_s,
                "utilisation": inst.engine.stats.busy_s / span_s if span_s > 0 else 0.0,
                "steps": inst.engine.stats.steps,
                "preemptions": inst.engine.stats.preemptions,
                "swaps": inst.swaps,
                "load_s": inst.engine.stats.load_s,
                "peak_kv_blocks": inst.engine.stats.peak_blocks,
                "peak_running": inst.engine.stats.peak_running,
                "peak_kv_usage": _usage(inst),
                "prefix_cache_hit_rate": (inst.engine.stats.prefix_hits / inst.engine.stats.prefix_queries
                                          if inst.engine.stats.prefix_queries else None),
            }
            for inst in self._instances
        ]

    def _push(self, iid: int) -> None:
        """Enter engine `iid`'s next event time in the heap, unless its live entry already says it. An engine's
        entries other than the latest are stale and dropped when they reach the top."""
        t = self._engines[iid].next_event_time()
        if t != self._pushed[iid]:
            if t < INF:
                heappush(self._heap, (t, iid))
                self._pushed[iid] = t
            else:
                self._pushed[iid] = NO_ENTRY

    def _sample(self, now: float) -> None:
        for cls, depth in self.policy.queue_depths().items():
            self.timeline.append((now, "queue_depth", -1, "", cls, float(depth)))
        self._next_sample = now + self._sample_dt

    def _handle(self, iid: int, outs: list[Output]) -> None:
        inst = self._instances[iid]
        driver = self.driver
        # What a client sees on top of the engine's times: the same for every output of this advance (the
        # policy's hooks change nothing on the engine).
        front = inst.api_server.frontend_delay()
        for o in outs:
            kind = o.kind
            if kind is _LOADED:
                inst.sync()
                driver.instance_changed(iid)
                continue
            seq = o.seq
            assert seq is not None  # (every output but LOADED is a sequence's)
            r: Request = seq.tag
            if kind is _FINISHED:
                r.finish_s = o.time + front
                r.generated_tokens = seq.generated
                rid = r.request_id
                del inst.requests[rid]
                del self._seqs[rid]
                self._done += 1
                driver.finished(r, o.time)
            elif kind is _FIRST_TOKEN:
                if r.first_token_s is None:
                    r.first_token_s = o.time + front
                driver.first_token(r, o.time)
            elif kind is OutputKind.PREEMPTED:
                r.num_preemptions += 1
                driver.preempted(r, o.time)
            elif kind is OutputKind.ABORTED:
                r.generated_tokens = seq.generated
                r.num_evictions += 1
                self._evictions += 1
                del inst.requests[r.request_id]
                self.timeline.append((o.time, "evict", iid, r.model, r.slo_class, float(seq.generated)))
                driver.evicted(r, o.time)
        if inst.swap_after_drain is not None and not inst.requests and outs:
            model, inst.swap_after_drain = inst.swap_after_drain, None
            self._load(inst, model, outs[-1].time)
