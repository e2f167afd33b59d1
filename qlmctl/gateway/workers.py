"""`qlmctl serve --workers N`: N relay processes in front of one QLM core.

The data path and the decision are split at the seam the relay already had with the live cluster:

- A *relay worker* (`qlmctl.gateway.relayproc`, one process each) runs the HTTP server, parsing, admission,
  the streams to the engines with resume after eviction, retries and token counting: `GatewayApp` and
  `Relay` as in the single-process gateway, on a `RelayCluster` that turns each of the relay's calls on the
  cluster into a message.
- The *core* (this process: `CoreCluster`, a `LiveCluster`) holds the policy, its groups and virtual
  queues, the estimator, the driver, the instances' bookkeeping, engine health and metrics polling, swaps
  and the aggregated /metrics. It sees each request as a shadow `LiveRequest` whose "handler" is a message
  to the worker that owns it.

Messages (`qlmctl.gateway.channel`: one frame per loop iteration and direction):

    worker -> core   a  arrived [rid, model, class, ttft_slo, tpot_slo, priority, prompt, output, arrival_s, x-request-id]
                     f  first token [rid, now]        T  tokens [rid, n, rid, n, ...] (summed, ahead of the events)
                     e  evicted [rid, sent]           r  failed, retry [rid, engine, kind, sent]
                     x  failed, no retry left [rid, engine, kind]
                     d  ended [rid, now, sent, error, outcome]
                     m  metrics wanted [token]        M  this worker's metrics [token, families]
    core -> worker   D  dispatch [rid, engine, priority]      A  end a queued request [rid, status, message]
                     C  cancel the running attempt [rid, evict?, status, message]
                     S  state [any engine healthy, unavailable models, queued per class]
                     G  send your metrics [token]    R  merged metrics [token, text]    drain, stop

Request ids are numbered per worker (i, i + N, ...), so a request's worker is its id modulo N. The port
is held by the core (bound with SO_REUSEPORT, not listening) and each worker listens on it with a socket
of its own; the kernel spreads connections over the workers.

A worker that dies takes its requests with it (their clients' connections were its own); the core ends
their shadows (outcome error), releasing what they held on the engines, and goes on with the others. Unless
the gateway is draining or stopping, the core then starts the worker again: same index, same port, after a
backoff (`RestartPolicy`: 0.5 s doubling to 30 s, back to 0.5 s once a worker stayed up 60 s) so that one
crashing at start does not spin; it numbers its requests on from the highest id the core saw of its
predecessor, and gets the core's state as a fresh worker does. Workers die with the core
(PR_SET_PDEATHSIG, and the channel's end of file).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Histogram

from qlmctl.core.request import Request
from qlmctl.engines.base import FailureKind
from qlmctl.gateway.channel import Channel, pack_config
from qlmctl.gateway.cluster import LiveCluster
from qlmctl.gateway.exporter import Families, families_of, render_merged
from qlmctl.gateway.limits import AdmissionMetrics, QueueLimits
from qlmctl.gateway.request import LiveRequest

log = logging.getLogger("qlmctl.gateway")

MAX_AUTO_WORKERS = 8
"""`--workers 0` (auto): one relay worker per CPU beyond the core's, up to this many."""

DECISION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, float("inf"))


@dataclass(frozen=True)
class RestartPolicy:
    """When to start a relay worker again after it died: `first_s` doubling up to `max_s`, so a worker that
    crashes at start does not spin; back to `first_s` once a worker stayed up `stable_s`."""

    first_s: float = 0.5
    max_s: float = 30.0
    stable_s: float = 60.0
    ready_timeout_s: float = 60.0
    """A restarted worker that does not listen within this long is killed (and restarted, backed off)."""

    def delay(self, previous_s: float | None, uptime_s: float) -> float:
        """The wait before the next start, given the last wait (None: none yet) and how long the worker ran."""
        if previous_s is None or uptime_s >= self.stable_s:
            return self.first_s
        return min(self.max_s, previous_s * 2)


@dataclass
class WorkerSlot:
    """One worker index's life across restarts."""

    started_at: float = 0.0
    """When its current process started (monotonic s)."""
    restarts: int = 0
    last_delay_s: float | None = None
    next_id: int = 0
    """The first request id a new process of this index may use (above every id the core saw from it)."""


def auto_workers(cpus: int | None = None) -> int:
    n = cpus if cpus is not None else len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    return max(1, min(MAX_AUTO_WORKERS, n - 1))


class _Answer:
    """A shadow request's "waiter": resolving it tells the owning worker at once, in order with the rest."""

    __slots__ = ("_core", "_lr", "_done")

    def __init__(self, core: "CoreCluster", lr: LiveRequest) -> None:
        self._core = core
        self._lr = lr
        self._done = False

    def done(self) -> bool:
        return self._done

    def set_result(self, engine: Any) -> None:
        self._done = True
        self._core._answer(self._lr, engine)


class _Scope:
    """A shadow request's cancel scope: expiring it cancels the worker's upstream stream."""

    __slots__ = ("_core", "_lr")

    def __init__(self, core: "CoreCluster", lr: LiveRequest) -> None:
        self._core = core
        self._lr = lr

    def reschedule(self, when: float | None) -> None:
        lr = self._lr
        abort = lr.abort or (None, None)
        self._core._send(lr.req.request_id, ["C", lr.req.request_id, lr.evict_pending, abort[0], abort[1]])


class CoreCluster(LiveCluster):
    """The live cluster in the core process: its requests are shadows of those the relay workers hold."""

    def __init__(self, *args: Any, limits: QueueLimits, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.pool: RelayWorkers | None = None
        self.engine_list = [e for inst in self.instances for e in inst.engines.values()]
        self._engine_index = {id(e): i for i, e in enumerate(self.engine_list)}
        self.limits = limits
        self.admission = AdmissionMetrics(self.metrics.registry)
        self.decision = Histogram("qlm_core_decision_seconds",
                                  "Time in the QLM core from a request's arrival message to its dispatch message "
                                  "(first dispatch; wall s).", buckets=DECISION_BUCKETS, registry=self.metrics.registry)
        self._arrived_at: dict[int, float] = {}

    # ------------------------------------------------------------ the shadows' handlers
    def _new_waiter(self, lr: LiveRequest) -> Any:
        return _Answer(self, lr)

    def _send(self, rid: int, msg: list[Any]) -> None:
        assert self.pool is not None
        self.pool.send(rid % self.pool.n, msg)

    def _answer(self, lr: LiveRequest, engine: Any) -> None:
        rid = lr.req.request_id
        if engine is not None:
            self._send(rid, ["D", rid, self._engine_index[id(engine)], lr.engine_priority])
            t = self._arrived_at.pop(rid, None)
            if t is not None:
                self.decision.observe(time.perf_counter() - t)
        else:
            status, message = lr.abort or (503, "the gateway is shutting down")
            self._send(rid, ["A", rid, status, message])

    def finished(self, lr: LiveRequest, error: str | None = None, outcome: str | None = None,
                 tell_policy: bool = True, now: float | None = None) -> None:
        self._arrived_at.pop(lr.req.request_id, None)
        super().finished(lr, error, outcome, tell_policy, now)

    # ------------------------------------------------------------ what the workers say
    def deliver(self, worker: int, msgs: list[Any]) -> None:
        live = self._live
        for m in msgs:
            op = m[0]
            if op == "T":
                flat = m[1]
                for i in range(0, len(flat), 2):
                    lr = live.get(flat[i])
                    if lr is not None:
                        self.tokens(lr, flat[i + 1])
            elif op == "a":
                self._arrive(m)
            elif op == "f":
                lr = live.get(m[1])
                if lr is not None:
                    self.first_token(lr, m[2])
            elif op == "d":
                lr = live.get(m[1])
                if lr is not None:
                    self._sync_sent(lr, m[3])
                    self.finished(lr, m[4], m[5], now=m[2])
            elif op == "e":
                lr = live.get(m[1])
                if lr is not None:
                    self._sync_sent(lr, m[2])
                    self.evicted(lr)
                    lr.scope = _Scope(self, lr)
            elif op == "r":
                lr = live.get(m[1])
                if lr is not None:
                    self._sync_sent(lr, m[4])
                    if not self.retry(lr, self.engine_list[m[2]], FailureKind(m[3])):
                        self._send(m[1], ["A", m[1], 503, "the gateway is shutting down"])
                    lr.scope = _Scope(self, lr)
            elif op == "x":
                self.health.failure(self.engine_list[m[2]], FailureKind(m[3]))
            elif op == "m":
                asyncio.ensure_future(self._metrics_for(worker, m[1]))
            elif op == "M":
                assert self.pool is not None
                self.pool.metrics_reply(worker, m[1], m[2])
            elif op == "ready":
                assert self.pool is not None
                self.pool.ready(worker, m[1])
            elif op == "fail":
                assert self.pool is not None
                self.pool.failed(worker, m[1])

    def _sync_sent(self, lr: LiveRequest, sent: int) -> None:
        if sent != lr.sent:
            self.tokens(lr, sent - lr.sent)

    def _arrive(self, m: list[Any]) -> None:
        _, rid, model, cls, ttft, tpot, prio, prompt, output, arrival, external = m
        assert self.pool is not None
        self.pool.saw_id(rid)
        r = Request(request_id=rid, arrival_s=arrival, model=model, slo_class=cls, ttft_slo_s=ttft,
                    prompt_tokens=prompt, output_tokens=output, tpot_slo_s=tpot, priority=prio)
        unavailable = self.health.unavailable_message(model)
        if unavailable is not None:
            self.admission.rejected.labels(cls, "unavailable").inc()
            self._send(rid, ["A", rid, 503, unavailable])
            return
        if self.limits.full(cls, self.queued_by_class.get(cls, 0)):
            self.admission.rejected.labels(cls, "queue_full").inc()
            self._send(rid, ["A", rid, 429, f"too many requests of SLO class '{cls}' are waiting (limit "
                                            f"{self.limits.limit(cls)}); retry after {self.limits.retry_after_s} s"])
            return
        lr = LiveRequest(req=r, api="completions", body={}, client_id="", created=0, stream=True,
                         external_id=external)
        lr.scope = _Scope(self, lr)
        self._arrived_at[rid] = time.perf_counter()
        self.submit(lr)

    def worker_gone(self, worker: int, n: int) -> None:
        """Worker `worker` of `n` died: its requests end (their clients were connected to it)."""
        for lr in [lr for lr in self._live.values() if lr.req.request_id % n == worker]:
            if lr.queued:
                lr.abort = (503, "relay worker died")
            self.finished(lr, error="relay worker died")

    # ------------------------------------------------------------ metrics
    async def _metrics_for(self, worker: int, token: int) -> None:
        assert self.pool is not None
        text = await self.render_all()
        self.pool.send(worker, ["R", token, text.decode()])

    async def render_all(self) -> bytes:
        """Every process's metrics, summed (the core's own and each live worker's)."""
        assert self.pool is not None
        parts = await self.pool.gather_metrics()
        return render_merged([families_of(self.metrics.registry), *parts])

    def state(self) -> list[Any]:
        unavailable = {m: msg for m in self.models if (msg := self.health.unavailable_message(m)) is not None}
        return ["S", any(inst.healthy for inst in self.instances), unavailable, dict(self.queued_by_class)]


class RelayWorkers:
    """The relay worker processes of one core: start, talk, restart the ones that die, stop."""

    def __init__(self, core: CoreCluster, n: int, config: dict[str, Any],
                 restart: RestartPolicy | None = None) -> None:
        self.core = core
        self.n = n
        self.config = config
        self.restart = restart or RestartPolicy()
        self.command = [sys.executable, "-m", "qlmctl.gateway.relayproc"]
        """The worker's command line (its channel's fd and the core's pid follow)."""
        self.procs: list[subprocess.Popen | None] = [None] * n
        self.channels: list[Channel | None] = [None] * n
        self.slots = [WorkerSlot(next_id=w) for w in range(n)]
        self._readers: list[asyncio.Task] = []
        self._ready: list[asyncio.Future] = []
        self._restarting: set[asyncio.Task] = set()
        self._gathers: dict[int, tuple[dict[int, Families], asyncio.Future, int]] = {}
        self._token = 0
        self._state_task: asyncio.Task | None = None
        self._last_state: Any = None
        self._address: tuple[str, int] | None = None
        self._started = False
        self.draining = False
        self.stopping = False
        self.port_socket: socket.socket | None = None
        self.restarts = Counter("qlm_relay_worker_restarts", "Relay worker processes started again after one "
                                "died (by worker index).", ["worker"], registry=core.metrics.registry)

    def send(self, worker: int, msg: list[Any]) -> None:
        ch = self.channels[worker]
        if ch is not None and not ch.closed:
            ch.send(msg)

    def broadcast(self, msg: list[Any]) -> None:
        for w in range(self.n):
            self.send(w, msg)

    def drain(self) -> None:
        """Stop intake in every worker; from now on a worker that dies is not started again."""
        self.draining = True
        self.broadcast(["drain"])

    def live_workers(self) -> list[int]:
        """The workers that listen (a restarted one counts once it said it is ready)."""
        return [w for w, ch in enumerate(self.channels)
                if ch is not None and not ch.closed and self._ready[w].done() and self._ready[w].result() is True]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p is not None]

    def saw_id(self, rid: int) -> None:
        slot = self.slots[rid % self.n]
        if rid >= slot.next_id:
            slot.next_id = rid + self.n

    async def start(self, host: str, port: int, timeout_s: float = 60.0) -> int:
        """Hold the port, start the workers, wait until each listens; returns the port."""
        port = self._hold_port(host, port)
        self._address = (host, port)
        self._ready = [asyncio.get_running_loop().create_future() for _ in range(self.n)]
        for w in range(self.n):
            await self._spawn(w)
        done, pending = await asyncio.wait(self._ready, timeout=timeout_s)
        problems = [f.result() for f in done if f.result() is not True]
        if pending or problems:
            await self.stop(1.0)
            raise OSError(f"relay workers did not start: {'; '.join(problems) or 'timed out'}")
        self._started = True
        self.broadcast(self.core.state())
        self._state_task = asyncio.create_task(self._states())
        return port

    def _hold_port(self, host: str, port: int) -> int:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # First without SO_REUSEPORT: that fails if anything holds the port, also another gateway's workers
        # (sockets that all set SO_REUSEPORT would share it silently).
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as e:
                raise OSError(f"gateway could not listen on {host}:{port}: {e}") from None
            port = probe.getsockname()[1]
        hold = socket.socket(family, socket.SOCK_STREAM)
        hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            hold.bind((host, port))
        except OSError as e:
            hold.close()
            raise OSError(f"gateway could not listen on {host}:{port}: {e}") from None
        self.port_socket = hold
        return hold.getsockname()[1]

    async def _spawn(self, w: int) -> subprocess.Popen:
        """Start worker `w`'s process, send it its configuration and read its channel; `_ready[w]` says when
        it listens."""
        assert self._address is not None
        host, port = self._address
        self._ready[w] = asyncio.get_running_loop().create_future()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = subprocess.Popen([*self.command, str(theirs.fileno()), str(os.getpid())],
                                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.procs[w] = proc  # at once: stop() finds it even if this task is cancelled from here on
        self.slots[w].started_at = time.monotonic()
        try:
            ch = await Channel.open(ours)
        except BaseException:
            proc.kill()
            raise
        ch.send_raw(pack_config({**self.config, "index": w, "workers": self.n, "host": host, "port": port,
                                 "first_id": self.slots[w].next_id}))
        self.channels[w] = ch
        self._readers.append(asyncio.create_task(self._read(w, ch)))
        return proc

    def ready(self, worker: int, pid: int) -> None:
        if not self._ready[worker].done():
            self._ready[worker].set_result(True)

    def failed(self, worker: int, message: str) -> None:
        if not self._ready[worker].done():
            self._ready[worker].set_result(message)

    async def _read(self, w: int, ch: Channel) -> None:
        await ch.run(lambda msgs: self.core.deliver(w, msgs))
        # The worker closed its end: it exited (stopping) or died.
        listened = self._ready[w].done() and self._ready[w].result() is True
        if not self._ready[w].done():
            self._ready[w].set_result(f"relay worker {w} exited at start")
        for token, (got, fut, _) in list(self._gathers.items()):
            got.setdefault(w, [])
            self._gather_done(token)
        if self.stopping:
            return
        self.core.worker_gone(w, self.n)
        if not (listened or self._started):  # one that never listened fails start() as a whole
            return
        proc = self.procs[w]
        if proc is not None:
            task = asyncio.create_task(self._after_death(w, proc))
            self._restarting.add(task)
            task.add_done_callback(self._restarting.discard)

    async def _after_death(self, w: int, proc: subprocess.Popen) -> None:
        """Reap worker `w`'s process, say so, and start it again after its backoff (unless the gateway is
        draining or stopping by then)."""
        code = await _reap(proc)
        slot = self.slots[w]
        uptime = time.monotonic() - slot.started_at
        if self.draining or self.stopping:
            log.error("relay worker %d (pid %d) died (exit status %s) after %.1f s; its requests end; not "
                      "restarted: the gateway is stopping", w, proc.pid, _status(code), uptime)
            return
        delay = self.restart.delay(slot.last_delay_s, uptime)
        slot.last_delay_s = delay
        log.error("relay worker %d (pid %d) died (exit status %s) after %.1f s; its requests end; restarting "
                  "it in %g s (restart %d)", w, proc.pid, _status(code), uptime, delay, slot.restarts + 1)
        await asyncio.sleep(delay)
        if self.draining or self.stopping:
            return
        slot.restarts += 1
        self.restarts.labels(str(w)).inc()
        await self._await_ready(w, await self._spawn(w))

    async def _await_ready(self, w: int, proc: subprocess.Popen) -> None:
        """A restarted worker listens: give it the core's state. One that exits first is restarted by its
        reader (`_read`); one that hangs is killed, which ends the same way."""
        try:
            result = await asyncio.wait_for(asyncio.shield(self._ready[w]), self.restart.ready_timeout_s)
        except asyncio.TimeoutError:
            log.error("relay worker %d (pid %d) did not listen within %g s; killing it", w, proc.pid,
                      self.restart.ready_timeout_s)
            proc.kill()
            return
        if result is True:
            self.send(w, self.core.state())
            if self.draining:  # began while it started: the broadcast may have missed it
                self.send(w, ["drain"])
            log.warning("relay worker %d restarted (pid %d, restart %d)", w, proc.pid, self.slots[w].restarts)
        else:
            log.error("relay worker %d (pid %d) did not start: %s", w, proc.pid, result)

    async def _states(self) -> None:
        """Every 50 ms, when it changed: engine health, unavailable models, queue depths, to every worker."""
        while True:
            await asyncio.sleep(0.05)
            st = self.core.state()
            if st != self._last_state:
                self._last_state = st
                self.broadcast(st)

    # ------------------------------------------------------------ metrics
    async def gather_metrics(self, timeout_s: float = 2.0) -> list[Families]:
        workers = self.live_workers()
        if not workers:
            return []
        self._token += 1
        token = self._token
        fut = asyncio.get_running_loop().create_future()
        self._gathers[token] = ({}, fut, len(workers))
        for w in workers:
            self.send(w, ["G", token])
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        except asyncio.TimeoutError:
            log.warning("metrics: not every relay worker answered within %g s", timeout_s)
        got, _, _ = self._gathers.pop(token)
        return list(got.values())

    def metrics_reply(self, worker: int, token: int, fams: Families) -> None:
        entry = self._gathers.get(token)
        if entry is not None:
            entry[0][worker] = fams
            self._gather_done(token)

    def _gather_done(self, token: int) -> None:
        got, fut, want = self._gathers[token]
        if len(got) >= want and not fut.done():
            fut.set_result(None)

    # ------------------------------------------------------------ stop
    async def stop(self, timeout_s: float = 10.0) -> None:
        """Tell the workers to stop (they end what they still hold), wait, then kill the stragglers."""
        self.stopping = True
        # No restart from here on: one under way is cancelled (a process it started is in `procs`).
        pending = list(self._restarting)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if self._state_task is not None:
            self._state_task.cancel()
        self.broadcast(["stop"])
        for ch in self.channels:
            if ch is not None:
                await ch.drain()
        deadline = time.monotonic() + timeout_s
        while any(p is not None and p.poll() is None for p in self.procs) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for p in self.procs:
            if p is not None and p.poll() is None:
                log.warning("relay worker %d did not stop; killing it", p.pid)
                p.kill()
        for p in self.procs:
            if p is not None:
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        for ch in self.channels:
            if ch is not None:
                ch.close()
        for t in self._readers:
            t.cancel()
        await asyncio.gather(*self._readers, *(t for t in (self._state_task,) if t is not None),
                             return_exceptions=True)
        if self.port_socket is not None:
            self.port_socket.close()
            self.port_socket = None


async def _reap(proc: subprocess.Popen, timeout_s: float = 5.0) -> int | None:
    """Wait for a process whose channel closed to exit (killing it if it lingers); its exit status."""
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    if proc.poll() is None:
        proc.kill()
        await asyncio.to_thread(proc.wait)
    return proc.returncode


def _status(code: int | None) -> str:
    """An exit status as an operator reads it: the signal's name for a killed process."""
    if code is not None and code < 0:
        try:
            return f"{code} ({signal.Signals(-code).name})"
        except ValueError:
            pass
    return str(code)


def engine_specs(cluster: CoreCluster) -> Sequence[Any]:
    """The engines in the core's order (a dispatch names one by its index)."""
    return [e.spec for e in cluster.engine_list]
