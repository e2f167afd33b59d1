"""The live cluster: engine servers behind the ClusterView seam, driven by asyncio events (the driver's World).

The policies in `qlmctl.policies` run here unchanged, exactly as under the simulator
(`qlmctl.backends.sim`), on another clock: `now()` is seconds since the gateway started, times
`speedup` (1 in front of vLLM; an emulator's speed-up in front of emulated engines, so that profiles,
SLOs and results stay in scenario seconds).

- An *instance* is a GPU (`qlmctl.gateway.instance`). It hosts one engine server per model it can serve;
  at most one is awake, the others sleep (sleep mode) or are stopped (restart swaps under `--launch`).
- The scheduler is a loop callback, not a task: every change (arrival, first token, finish, eviction,
  swap done, metrics refresh) calls `kick()`, which queues one `policy.schedule(cluster)` at the end of
  the current loop iteration, so a burst of changes costs one schedule call. A timer serves
  `policy.next_wakeup`.
- Decisions are carried out by the driver (`qlmctl.core.driver`, its rules are the simulator's too); this
  cluster is its `World`: a Dispatch hands the request's handler its engine (the handler streams it); an
  Evict cancels the handler's upstream stream (an engine aborts a request whose connection closes) and the
  request goes back to the policy through `on_evicted`; a SwapModel runs as a task (drain, sleep the awake
  engine, wake the target).
- Engine state: the gateway's own count of requests in flight per engine is exact and current; the
  engine's metrics (polled every `metrics_interval_s`) add what the gateway cannot see (requests of other
  clients, aborts not yet reaped) and the engine's KV cache size.
- Faults: an engine attempt that fails goes back to the policy like an eviction (`retry`, within the
  request's retry budget); engine health, probes, outlier ejection and models left without an engine are
  `qlmctl.gateway.health`'s.
- Retry placement: the policy places a retry like any request, and may place it on the very engine that
  just failed it (still healthy after a soft failure, and looking idle since the failure freed its slot).
  The world then carries the dispatch out on the least loaded other instance serving the model, healthy
  and not swapping, if there is one (as Envoy's `previous_hosts` retry predicate avoids the host that
  failed); after the batch it tells the policy where the request is (`request.instance_id`) and that both
  instances changed. That instance may be full: the retry then waits in its engine's queue, beyond
  `scheduler.dispatch_limit`, rather than try the failing engine again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

from qlmctl.core.cluster import Evict
from qlmctl.core.driver import Driver
from qlmctl.core.request import Request
from qlmctl.engines import engine_kind
from qlmctl.engines.base import EngineError, FailureKind
from qlmctl.gateway.exporter import GatewayMetrics
from qlmctl.gateway.health import HealthMetrics, HealthMonitor
from qlmctl.gateway.instance import LiveEngine, LiveInstance, SwapControl
from qlmctl.gateway.outlier import OutlierPolicy
from qlmctl.gateway.request import LiveRequest
from qlmctl.gateway.swap import SleepModeControl
from qlmctl.policies.base import Policy
from qlmctl.scenario import LiveEngineSpec, Scenario

log = logging.getLogger("qlmctl.gateway")

MIN_TIMER_S = 0.001
"""The live clock's tick in wall seconds: the shortest delay of the wake-up timer."""


class LiveCluster:
    """The engines of a live scenario under one policy (implements ClusterView).

    The HTTP side calls `submit` when a request arrives, awaits `wait_dispatch`, streams from the engine
    it gets, and reports `first_token`, `tokens`, `finished` or `evicted`.
    """

    def __init__(
        self,
        scenario: Scenario,
        policy: Policy,
        *,
        engines: Sequence[LiveEngineSpec] | None = None,
        speedup: float | None = None,
        swap_control: SwapControl | None = None,
        metrics: GatewayMetrics | None = None,
        record: bool = True,
    ) -> None:
        live = scenario.spec.live
        specs = list(engines if engines is not None else (live.engines if live is not None else []))
        if not specs:
            raise ValueError("a live cluster needs engines (scenario live.engines)")
        self.scenario = scenario
        self.policy = policy
        self.speedup = speedup if speedup is not None else (live.speedup if live is not None else 1.0)
        self.metrics_interval_s = live.metrics_interval_s if live is not None else 0.5
        max_conn = live.max_connections if live is not None else 4096
        self.max_retries = live.max_retries if live is not None else 2
        self.retry_after_s = live.retry_after_s if live is not None else 1
        """Retry-After of a request refused at admission, s."""
        self.metrics = metrics if metrics is not None else GatewayMetrics()
        self.record = record
        control = swap_control or SleepModeControl()
        overrides = {name: spec.profile_overrides for name, spec in scenario.instance_specs()}
        disciplines = {name: spec.engine.scheduling_policy or policy.engine_policy
                       for name, spec in scenario.instance_specs()}
        self._initial = {name: spec.model for name, spec in scenario.instance_specs()}
        self._instances: list[LiveInstance] = []
        by_name: dict[str, LiveInstance] = {}
        usage = scenario.usage_in_every_chunk()
        for spec in specs:
            inst = by_name.get(spec.instance)
            if inst is None:
                profiles = {m: scenario.profile(m, spec.gpu, overrides.get(spec.instance)) for m in scenario.models}
                if usage:  # the engines' API servers as the simulated gateway's (qlmctl/backends/sim.py)
                    profiles = {m: p.with_usage_stats() for m, p in profiles.items()}
                inst = LiveInstance(len(self._instances), spec.instance, spec.gpu, profiles, control,
                                    disciplines.get(spec.instance, policy.engine_policy))
                by_name[spec.instance] = inst
                self._instances.append(inst)
            kind = engine_kind(spec.kind)
            inst.engines[spec.model] = LiveEngine(spec, inst, kind.connect(spec.url, max_conn), kind)
        self.models = sorted({s.model for s in specs})
        self._live: dict[int, LiveRequest] = {}
        self.records: list[Request] = []
        self.by_external: dict[str, Request] = {}
        """Recorded requests by the client's x-request-id (a replay matches its records with them)."""
        self.timeline: list[tuple[float, str, int, str, str, float]] = []
        self._next_id = 0
        self.t0 = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._kicked = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._running = False
        self._tasks: set[asyncio.Task] = set()
        self._poll_task: asyncio.Task | None = None
        self.num_swaps = 0
        self.num_evictions = 0
        self.num_retries = 0
        """Engine attempts that failed and were retried."""
        self.num_retried_requests = 0
        """Requests retried at least once."""
        self.num_retries_moved = 0
        """Retries carried out on another instance than the one the policy chose (its engine had just failed)."""
        self._moved: list[tuple[LiveRequest, int]] = []
        self._unchanged: set[int] = set()
        """Instances that were dispatched a request already ended, in the batch being applied."""
        self.schedule_calls = 0
        self.queued_by_class: dict[str, int] = {}
        """Requests waiting in the policy's queues per SLO class (exact, current: admission reads it)."""
        self.driver = Driver(policy, self)
        self.health = HealthMonitor(
            self, HealthMetrics(self.metrics.registry),
            unhealthy_after=live.unhealthy_after if live is not None else 3,
            metrics_interval_s=self.metrics_interval_s,
            probe_interval_s=live.probe_interval_s if live is not None else 1.0,
            probe_timeout_s=live.probe_timeout_s if live is not None else 2.0,
            unavailable_timeout_s=live.unavailable_timeout_s if live is not None else 30.0,
            outlier=OutlierPolicy(live.outlier_error_rate, live.outlier_min_requests, live.outlier_interval_s,
                                  live.outlier_ejection_s) if live is not None else None,
        )

    # ------------------------------------------------------------ ClusterView
    @property
    def instances(self) -> list[LiveInstance]:
        return self._instances

    def now(self) -> float:
        return (time.monotonic() - self.t0) * self.speedup

    # ------------------------------------------------------------ World (the driver's operations)
    @property
    def resolution_s(self) -> float:
        return MIN_TIMER_S * self.speedup

    def holds(self, request: Request, instance_id: int) -> bool:
        lr = self._live.get(request.request_id)
        return (lr is not None and not lr.done and lr.engine is not None
                and lr.engine.instance.instance_id == instance_id)

    def dispatch(self, request: Request, instance_id: int, now: float, priority: int | None) -> bool:
        lr = self._live.get(request.request_id)
        if lr is None:
            # Its client went away (or the gateway ended it) while it was queued: it ends here, never reaching
            # an engine. The policy counted it on the instance in this call: the instance is as it was.
            self._unchanged.add(instance_id)
            return False
        self._dequeue(lr)
        inst = self._instances[instance_id]
        if lr.avoid is not None:
            if lr.avoid == instance_id:
                other = self._retry_elsewhere(lr, inst)
                if other is not None:
                    self._moved.append((lr, instance_id))
                    inst = other
            lr.avoid = None
        eng = inst.engines[request.model]
        lr.engine = eng
        lr.engine_priority = priority if inst.scheduling_policy == "priority" else None
        if not lr.dispatched:
            lr.dispatched = True
            if lr.series is not None:
                lr.series.queue.observe(max(0.0, now - request.arrival_s) / self.speedup)
        inst.add(lr, now)
        if lr.waiter is not None and not lr.waiter.done():
            lr.waiter.set_result(eng)
        return True

    def preempt(self, request: Request, instance_id: int, now: float) -> None:
        lr = self._live[request.request_id]
        lr.evict_pending = True
        if lr.scope is not None:
            lr.scope.reschedule(self._loop.time())  # type: ignore[union-attr]
        # else its handler has not opened the stream yet; it checks evict_pending first.

    def load_model(self, instance_id: int, model: str, now: float) -> None:
        inst = self._instances[instance_id]
        inst.begin_swap(now)
        self._spawn(self._swap(inst, model, now))

    def reject(self, request: Request, now: float) -> None:
        lr = self._live.get(request.request_id)
        if lr is None:
            return
        lr.policy_done = True
        if lr.queued:
            self._dequeue(lr)
        lr.abort = (429, request.error or "rejected")
        if lr.waiter is not None and not lr.waiter.done():
            lr.waiter.set_result(None)

    def fail_request(self, request: Request, error: str, now: float) -> None:
        lr = self._live.get(request.request_id)
        if lr is None:
            return
        if lr.queued:
            self._dequeue(lr)
        self.finished(lr, error=error, tell_policy=False)
        if lr.waiter is not None and not lr.waiter.done():
            lr.waiter.set_result(None)

    def applied(self, now: float) -> None:
        if self._unchanged:
            # Policies that keep each instance's room between events took a slot for the ended request;
            # told that the instance changed, they read it again (else nothing might ever tell them).
            for iid in self._unchanged:
                self.driver.instance_changed(iid)
            self._unchanged.clear()
            self.kick()
        if not self._moved:
            return
        for lr, chosen in self._moved:
            if lr.engine is not None:
                actual = lr.engine.instance.instance_id
                lr.req.instance_id = actual
                self.num_retries_moved += 1
                self.driver.instance_changed(chosen)
                self.driver.instance_changed(actual)
        self._moved.clear()
        self.kick()

    def _retry_elsewhere(self, lr: LiveRequest, chosen: LiveInstance) -> LiveInstance | None:
        """Another instance for a retry the policy put back on the instance that just failed it (see the
        module docstring), or None."""
        model = lr.req.model
        best, best_load = None, 0
        for inst in self._instances:
            if inst is chosen or inst.swapping or not inst.healthy or inst.model != model:
                continue
            load = inst.num_running + inst.num_waiting
            if best is None or load < best_load:
                best, best_load = inst, load
        return best

    # ------------------------------------------------------------ lifecycle
    async def start(self, wait_healthy_s: float = 60.0) -> None:
        """Wait for the engines, set each instance's awake model, start polling and scheduling."""
        self._loop = asyncio.get_running_loop()
        await asyncio.gather(*(self._sync_instance(inst, wait_healthy_s) for inst in self._instances))
        self.t0 = time.monotonic()
        self._running = True
        self._poll_task = asyncio.create_task(self._poll_loop())
        for inst in self._instances:
            for e in inst.engines.values():
                self._spawn(self.health.watch(e))
        self.kick()

    async def stop(self) -> None:
        self._running = False
        if self._timer is not None:
            self._timer.cancel()
        tasks = [t for t in (self._poll_task, *self._tasks) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        now = self.now()
        for lr in list(self._live.values()):
            if lr.waiter is not None and not lr.waiter.done():
                lr.waiter.set_result(None)
        for inst in self._instances:
            inst._update_busy(now)
        await asyncio.gather(*(e.server.aclose() for i in self._instances for e in i.engines.values()),
                             return_exceptions=True)

    async def _sync_instance(self, inst: LiveInstance, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        engines = [e for e in inst.engines.values() if inst.control.available(e)]
        for e in inst.engines.values():
            if e not in engines:
                e.sleeping = True  # stopped: a restart swap starts it
        while True:
            ok = await asyncio.gather(*(e.server.health() for e in engines))
            if all(ok):
                break
            if time.monotonic() > deadline:
                bad = [e.url for e, good in zip(engines, ok) if not good]
                raise ConnectionError(f"engines not healthy after {wait_s:g} s: {', '.join(bad)}")
            await asyncio.sleep(0.2)
        states = await asyncio.gather(*(e.server.is_sleeping() for e in engines))
        for e, st in zip(engines, states):
            e.sleeping = st
        want = self._initial.get(inst.name)
        if want not in inst.engines:
            awake = [e.model for e in engines if not e.sleeping]
            want = awake[0] if awake else next(iter(inst.engines))
        for e in engines:
            if e.model != want and e.sleeping is not True:
                if e.sleeping is None and isinstance(inst.control, SleepModeControl):
                    raise ConnectionError(f"{e.url} has no sleep mode ({e.kind.sleep_mode_hint}) but shares "
                                          f"instance '{inst.name}' with other engines")
                await inst.control.release(e)
                e.sleeping = True
        target = inst.engines[want]
        if target.sleeping:  # also a lone engine left asleep (by an earlier gateway, or by hand)
            await inst.control.acquire(target)
            target.sleeping = False
        inst.awake = want
        await asyncio.gather(*(self.poll_engine(e) for e in inst.engines.values() if inst.control.available(e)))

    # ------------------------------------------------------------ requests (called by the HTTP side)
    def new_request_id(self) -> int:
        rid = self._next_id
        self._next_id += 1
        return rid

    def submit(self, lr: LiveRequest) -> None:
        """A request arrived: hand it to the policy."""
        r = lr.req
        self._live[r.request_id] = lr
        lr.series = self.metrics.vllm.series(r.model, r.slo_class)
        if self.record:
            self.records.append(r)
            if lr.external_id is not None:
                self.by_external[lr.external_id] = r
        self._enqueue(lr)
        self.driver.arrived(r, r.arrival_s)
        self.kick()

    def _enqueue(self, lr: LiveRequest) -> None:
        lr.queued = True
        lr.waiter = self._new_waiter(lr)
        c = lr.req.slo_class
        self.queued_by_class[c] = self.queued_by_class.get(c, 0) + 1

    def _new_waiter(self, lr: LiveRequest) -> Any:
        """What `dispatch`/`reject` resolve with the request's engine (None: it ends): a future its handler awaits
        here; the core process of `--workers N` answers a relay worker instead (`qlmctl.gateway.workers`)."""
        return self._loop.create_future()  # type: ignore[union-attr]

    def _dequeue(self, lr: LiveRequest) -> None:
        lr.queued = False
        self.queued_by_class[lr.req.slo_class] -= 1

    async def wait_dispatch(self, lr: LiveRequest) -> LiveEngine | None:
        """The engine the policy dispatched `lr` to (None when the gateway is stopping)."""
        assert lr.waiter is not None
        return await lr.waiter

    def first_token(self, lr: LiveRequest, now: float | None = None) -> None:
        """The engine produced the first token of this attempt (at `now`, default now)."""
        r = lr.req
        now = self.now() if now is None else now
        if r.first_token_s is None:
            r.first_token_s = now
            if lr.series is not None:
                lr.series.ttft.observe(max(0.0, now - r.arrival_s) / self.speedup)
        if lr.engine is not None:
            self.health.success(lr.engine)
            lr.engine.instance.prefilled(lr)
        self.driver.first_token(r, now)
        self.kick()

    def tokens(self, lr: LiveRequest, n: int) -> None:
        """`n` more output tokens reached the client."""
        lr.sent += n
        lr.req.generated_tokens = lr.sent
        if n and lr.series is not None:
            t = time.monotonic()
            lr.series.observe_tokens(n, None if lr.last_token_t is None else t - lr.last_token_t)
            lr.last_token_t = t
        if lr.kv_tokens:
            lr.kv_tokens += n
            eng = lr.engine
            if eng is not None:
                eng.instance.kv_tokens += n

    def finished(self, lr: LiveRequest, error: str | None = None, outcome: str | None = None,
                 tell_policy: bool = True, now: float | None = None) -> None:
        """The request ended: complete, failed (`error`), or abandoned by its client. `tell_policy` False: the
        driver tells the policy itself. `now`: when it ended (default now)."""
        now = self.now() if now is None else now
        if not lr.end(now, error):
            return
        r = lr.req
        self._live.pop(r.request_id, None)
        if lr.engine is not None:
            lr.engine.instance.remove(lr, now)
        if lr.queued:
            # Still in the policy's queues: it is finished when the policy dispatches it.
            lr.cancelled = True
            self._dequeue(lr)
        elif tell_policy and not lr.policy_done:
            self.driver.finished(r, now)
            self.kick()
        if outcome is None:
            outcome = "error" if error is not None else ("slo_met" if r.slo_met else "slo_missed")
        ttft = r.ttft_s / self.speedup if r.ttft_s is not None else None
        e2e = r.e2el_s / self.speedup if r.e2el_s is not None else None
        self.metrics.observe_end(r.slo_class, r.model, outcome, ttft, e2e)
        self._observe_end(lr, outcome, ttft, e2e)

    @staticmethod
    def _observe_end(lr: LiveRequest, outcome: str, ttft: float | None, e2e: float | None) -> None:
        """The `qlm:` series of a request that ended (latencies in wall seconds)."""
        s = lr.series
        if s is None:
            return
        s.outcomes[outcome] += 1
        complete = outcome in ("slo_met", "slo_missed")
        if complete:
            fin = lr.finish_reason or "length"
            s.success["abort" if fin == "abort" else "length" if fin == "length" else "stop"] += 1
        else:
            s.success["abort" if outcome == "cancelled" else "error"] += 1
        if lr.req.first_token_s is not None:
            s.prompt_tokens += lr.prompt_tokens if lr.prompt_tokens is not None else lr.req.prompt_tokens
        if complete and e2e is not None:
            s.e2e.observe(e2e)
            if ttft is not None and lr.sent > 1:
                s.tpot.observe(max(0.0, e2e - ttft) / (lr.sent - 1))

    def evicted(self, lr: LiveRequest) -> None:
        """The upstream stream of `lr` was cancelled by an Evict: back to the policy."""
        r = lr.req
        now = self.now()
        eng = lr.engine
        lr.evict_pending = False
        lr.engine = None
        lr.scope = None
        if eng is not None:
            eng.instance.remove(lr, now)
            eng.instance.evictions += 1
        r.generated_tokens = lr.sent
        r.num_evictions += 1
        self.num_evictions += 1
        self.timeline.append((now, "evict", r.instance_id if r.instance_id is not None else -1, r.model,
                              r.slo_class, float(lr.sent)))
        self.metrics.evictions.labels(r.slo_class).inc()
        self._enqueue(lr)
        self.driver.evicted(r, now)
        self.kick()

    def retry(self, lr: LiveRequest, engine: LiveEngine, kind: FailureKind) -> bool:
        """`engine` failed this attempt of `lr`: back to the head of its queue if its retry budget allows.

        Counts the failure against the engine's health either way. False when the budget is spent (the
        caller then fails the request).
        """
        self.health.failure(engine, kind)
        if lr.retries >= self.max_retries or not self._running:
            return False
        r = lr.req
        now = self.now()
        lr.retries += 1
        self.num_retried_requests += lr.retries == 1
        lr.avoid = engine.instance.instance_id
        lr.engine = None
        lr.scope = None
        lr.evict_pending = False
        engine.instance.remove(lr, now)
        r.generated_tokens = lr.sent
        self.num_retries += 1
        self.timeline.append((now, "retry", engine.instance.instance_id, r.model, r.slo_class, float(lr.sent)))
        self.health.metrics.retries.labels(r.slo_class, kind.value).inc()
        self._enqueue(lr)
        self.driver.requeue(r, now)
        self.kick()
        return True

    def end_queued(self, lr: LiveRequest, status: int, message: str) -> None:
        """End a request still waiting in the queues with an error (its handler answers `status`)."""
        if lr.done or not lr.queued:
            return
        lr.abort = (status, message)
        if lr.waiter is not None and not lr.waiter.done():
            lr.waiter.set_result(None)

    def abort_all(self, status: int, message: str) -> int:
        """End every request now (shutting down): queued ones at once, running ones by cancelling their
        upstream stream. Returns how many were ended."""
        n = 0
        loop = self._loop
        for lr in list(self._live.values()):
            if lr.done:
                continue
            n += 1
            if lr.queued:
                self.end_queued(lr, status, message)
            else:
                lr.abort = (status, message)
                if lr.scope is not None and loop is not None:
                    lr.scope.reschedule(loop.time())
        return n

    def health_changed(self, e: LiveEngine) -> None:
        """An engine turned unhealthy or healthy: the policy re-reads its instance."""
        inst = e.instance
        self.timeline.append((self.now(), "healthy" if e.healthy else "unhealthy", inst.instance_id, e.model, "", 0.0))
        if self._running:
            self.driver.instance_changed(inst.instance_id)
            self.kick()

    def requests_of(self, model: str) -> list[LiveRequest]:
        return [lr for lr in self._live.values() if lr.req.model == model]

    def evict(self, request_id: int) -> bool:
        """Evict a running request now, as if the policy had decided it (operators and tests).

        Only for policies that take evicted requests back (`on_evicted`); False when the request is not
        running.
        """
        if not self.policy.takes_evictions:
            raise RuntimeError(f"policy {self.policy.name} does not take evicted requests back")
        lr = self._live.get(request_id)
        if lr is None or lr.engine is None or lr.done:
            return False
        self.driver.apply([Evict(lr.req, lr.engine.instance.instance_id)], self.now())
        return True

    # ------------------------------------------------------------ scheduling
    def kick(self) -> None:
        """Something changed: run the policy once at the end of this loop iteration."""
        if not self._kicked and self._running:
            self._kicked = True
            self._loop.call_soon(self._schedule)  # type: ignore[union-attr]

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        self.kick()

    def _schedule(self) -> None:
        self._kicked = False
        if not self._running:
            return
        now = self.now()
        self.schedule_calls += 1
        try:
            wake = self.driver.schedule(now)
        except Exception:  # noqa: BLE001 - a policy bug must not take the gateway down
            log.exception("policy %s failed in schedule()", self.policy.name)
            wake = now + self.speedup  # try again in a second
        self._arm_timer(wake, now)

    def _arm_timer(self, wake: float | None, now: float) -> None:
        loop = self._loop
        assert loop is not None
        if wake is None or wake == math.inf:
            if self._timer is not None:
                self._timer.cancel()
                self._timer, self._timer_at = None, math.inf
            return
        at = loop.time() + (wake - now) / self.speedup  # the driver keeps it at least one tick ahead
        if self._timer is not None:
            if abs(at - self._timer_at) < MIN_TIMER_S:
                return
            self._timer.cancel()
        self._timer = loop.call_at(at, self._on_timer)
        self._timer_at = at

    def _spawn(self, coro: Any) -> None:
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _swap(self, inst: LiveInstance, model: str, started: float) -> None:
        target = inst.engines[model]
        old = inst.engines.get(inst.awake) if inst.awake is not None and inst.awake != model else None
        ok = False
        try:
            await inst.drained.wait()
            if old is not None:
                await inst.control.release(old)
                inst.awake = None
            await inst.control.acquire(target)
            inst.awake = model
            ok = True
        except Exception as e:  # noqa: BLE001 - a failed swap leaves the instance idle, not the gateway dead
            log.error("swap of %s to %s failed: %s", inst.name, model, e)
        finally:
            now = self.now()
            inst.end_swap(now)
            if ok:
                inst.swaps += 1
                self.num_swaps += 1
                self.metrics.swaps.labels(inst.name, model).inc()
                self.timeline.append((started, "swap", inst.instance_id, model, "", now - started))
            if self._running:
                self.driver.instance_changed(inst.instance_id)
                self.kick()

    # ------------------------------------------------------------ engine state
    async def _poll_loop(self) -> None:
        """Every `metrics_interval_s`: queue depths to the timeline, models without engines, a schedule."""
        loop = asyncio.get_running_loop()
        while self._running:
            await asyncio.sleep(self.metrics_interval_s)
            now = self.now()
            for cls, depth in self.queue_depth_by_class().items():
                self.timeline.append((now, "queue_depth", -1, "", cls, float(depth)))
            for model in self.health.check_models(loop.time()):
                msg = self.health.unavailable_message(model) or ""
                queued = [lr for lr in self.requests_of(model) if lr.queued]
                log.error("%s; failing %d queued request(s)", msg, len(queued))
                for lr in queued:
                    self.end_queued(lr, 503, msg)
            self.kick()

    async def poll_engine(self, e: LiveEngine, timeout_s: float = 2.0) -> bool | None:
        """Read the engine's /metrics into its instance's state; False when it did not answer, None when the
        gateway could not ask it (out of descriptors or memory: not the engine's failure)."""
        inst = e.instance
        try:
            m = await e.server.metrics(timeout_s)
        except EngineError as err:
            return None if err.kind is FailureKind.LOCAL else False
        except Exception:  # noqa: BLE001 - any failure means "not answering"
            return False
        own = len(inst.inflight)
        own_blocks = inst.kv_tokens // (inst._profiles[e.model].block_size) + own
        e.metrics, e.metrics_at = m, self.now()
        changed = inst.set_engine_shape(e.model, m)
        if e.awake:
            # What the engine holds beyond what the gateway sent it (see module docstring). Policies
            # cache an instance's load between the events they are told of, so a change is one.
            ext = max(0, int(m.num_requests_running + m.num_requests_waiting) - own)
            changed |= ext != inst.ext_requests
            inst.ext_requests = ext
            if m.kv_cache_usage is not None:
                used = round(m.kv_cache_usage * inst._profiles[e.model].kv_blocks)
                inst.ext_blocks = max(0, used - own_blocks)  # read afresh by policies: no event needed
        if changed and self._running:
            self.driver.instance_changed(inst.instance_id)
        return True

    # ------------------------------------------------------------ observability
    def queue_depth_by_class(self) -> dict[str, int]:
        out = dict.fromkeys(self.scenario.spec.slo_classes, 0)
        for lr in self._live.values():
            if lr.queued:
                c = lr.req.slo_class
                out[c] = out.get(c, 0) + 1
        return out

    def queue_depth_by_group(self) -> dict[tuple[str, str], int]:
        """Queued requests per (model, group) as the policy holds them."""
        return self.policy.queue_groups()

    def request_counts(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(model, SLO class) -> (requests waiting in the gateway, requests on an engine)."""
        out: dict[tuple[str, str], tuple[int, int]] = {}
        for lr in self._live.values():
            key = (lr.req.model, lr.req.slo_class)
            w, r = out.get(key, (0, 0))
            out[key] = (w + 1, r) if lr.queued else (w, r + 1) if lr.engine is not None else (w, r)
        return out

    def engine_rows(self) -> list[tuple[str, str, LiveEngine]]:
        return [(inst.name, e.model, e) for inst in self._instances for e in inst.engines.values()]

    def instance_stats(self) -> list[dict[str, Any]]:
        now = self.now()
        return [
            {
                "instance_id": inst.instance_id,
                "name": inst.name,
                "gpu": inst.gpu,
                "busy_s": inst.busy_until(now),
                "swaps": inst.swaps,
                "evictions": inst.evictions,
                "engines": {m: e.url for m, e in inst.engines.items()},
            }
            for inst in self._instances
        ]

    def num_active(self) -> int:
        """Requests queued or in flight."""
        return len(self._live)
