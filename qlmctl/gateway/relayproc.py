"""A relay worker of `qlmctl serve --workers N`: the HTTP side of the gateway in a process of its own.

    python -m qlmctl.gateway.relayproc CHANNEL_FD PARENT_PID

Started by the core process (`qlmctl.gateway.workers`), never by hand; started again by it (same index,
same port, after a backoff) if it dies while the gateway is not stopping. It listens on the gateway's port
(its own socket, SO_REUSEPORT: the kernel spreads connections over the workers), parses and admits
requests, streams them from the engines with resume after eviction, counts tokens, and serves /health,
/v1/models and /metrics, with the same `GatewayApp` and `Relay` as the single-process gateway. What the
relay asks of the live cluster, `RelayCluster` asks of the core over the channel; the core answers with
"dispatch to engine E", "evict" or "end it".

It dies with the core: PR_SET_PDEATHSIG(SIGKILL), and it exits when the channel closes. It ignores SIGINT
and SIGTERM (a Ctrl-C or a service manager's SIGTERM reaches the whole process group): the core drains
and then tells its workers to stop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

from qlmctl.engines.base import FailureKind
from qlmctl.gateway.channel import Channel, unpack_config
from qlmctl.gateway.request import LiveRequest

log = logging.getLogger("qlmctl.gateway")


class RemoteHealth:
    """Which models have had no healthy engine for too long (the core's verdict, as last broadcast)."""

    def __init__(self) -> None:
        self.unavailable: dict[str, str] = {}

    def unavailable_message(self, model: str) -> str | None:
        return self.unavailable.get(model)


class _Instance:
    __slots__ = ("healthy",)

    def __init__(self, healthy: bool) -> None:
        self.healthy = healthy


class WorkerEngine:
    """An engine as a relay worker streams from it: its own connection pool to the engine's URL."""

    __slots__ = ("index", "model", "url", "server")

    def __init__(self, index: int, model: str, url: str, server: Any) -> None:
        self.index = index
        self.model = model
        self.url = url
        self.server = server


class RelayCluster:
    """The live cluster as a relay worker's `GatewayApp` and `Relay`s see it (`LiveCluster`'s HTTP-side calls),
    each call a message to the core; the core's decisions come back as messages (`deliver`)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        from qlmctl.engines import engine_kind

        self.index: int = cfg["index"]
        self.workers: int = cfg["workers"]
        self.models: list[str] = cfg["models"]
        self.speedup: float = cfg["speedup"]
        self.t0: float = cfg["t0"]
        self.max_retries: int = cfg["max_retries"]
        self.retry_after_s: int = cfg["retry_after_s"]
        self.health = RemoteHealth()
        self.queued_by_class: dict[str, int] = {}
        """Queued requests per SLO class at the core's last broadcast (the core checks the limit exactly)."""
        self._healthy = True
        self.engines: list[WorkerEngine] = []
        for i, spec in enumerate(cfg["engines"]):
            kind = engine_kind(spec.kind)
            self.engines.append(WorkerEngine(i, spec.model, spec.url, kind.connect(spec.url, cfg["max_connections"])))
        self._live: dict[int, LiveRequest] = {}
        self._next_id: int = cfg.get("first_id", self.index)
        """A restarted worker numbers on from its predecessor's ids (the core's records and queues key on them)."""
        self._tokens: dict[int, int] = {}
        self._loop = asyncio.get_running_loop()
        self.channel: Channel | None = None
        self.running = True
        self.app: Any = None
        self._metric_waits: dict[int, asyncio.Future] = {}
        self._metric_token = 0
        self.stop_requested = asyncio.Event()
        self.families: Any = None
        """A callable giving this worker's metrics as plain data (set by the worker)."""

    # ------------------------------------------------------------ what the HTTP side reads
    @property
    def instances(self) -> list[_Instance]:
        return [_Instance(self._healthy)]

    def now(self) -> float:
        return (time.monotonic() - self.t0) * self.speedup

    def new_request_id(self) -> int:
        rid = self._next_id
        self._next_id += self.workers  # worker i of N numbers i, i + N, ...: unique across workers
        return rid

    def num_active(self) -> int:
        return len(self._live)

    # ------------------------------------------------------------ requests
    def _send(self, msg: list[Any]) -> None:
        assert self.channel is not None
        self.channel.send(msg)

    def _take_tokens(self, head: list[Any]) -> None:
        """Before each frame: the tokens counted since the last one, summed per request (ahead of the events)."""
        if self._tokens:
            flat: list[int] = []
            for rid, n in self._tokens.items():
                flat.append(rid)
                flat.append(n)
            self._tokens = {}
            head.append(["T", flat])

    def submit(self, lr: LiveRequest) -> None:
        r = lr.req
        self._live[r.request_id] = lr
        lr.queued = True
        lr.waiter = self._loop.create_future()
        self._send(["a", r.request_id, r.model, r.slo_class, r.ttft_slo_s, r.tpot_slo_s, r.priority,
                    r.prompt_tokens, r.output_tokens, r.arrival_s, lr.external_id])

    async def wait_dispatch(self, lr: LiveRequest) -> Any:
        assert lr.waiter is not None
        return await lr.waiter

    def first_token(self, lr: LiveRequest) -> None:
        r = lr.req
        now = self.now()
        if r.first_token_s is None:
            r.first_token_s = now
        self._send(["f", r.request_id, now])

    def tokens(self, lr: LiveRequest, n: int) -> None:
        lr.sent += n
        lr.req.generated_tokens = lr.sent
        rid = lr.req.request_id
        self._tokens[rid] = self._tokens.get(rid, 0) + n
        self.channel.schedule()  # type: ignore[union-attr]

    def finished(self, lr: LiveRequest, error: str | None = None, outcome: str | None = None,
                 tell_policy: bool = True) -> None:
        now = self.now()
        if not lr.end(now, error):
            return
        r = lr.req
        self._live.pop(r.request_id, None)
        if lr.queued:
            lr.cancelled = True
            lr.queued = False
        self._send(["d", r.request_id, now, lr.sent, error, outcome])

    def _requeue(self, lr: LiveRequest) -> None:
        lr.evict_pending = False
        lr.engine = None
        lr.scope = None
        lr.queued = True
        lr.waiter = self._loop.create_future()
        lr.req.generated_tokens = lr.sent

    def evicted(self, lr: LiveRequest) -> None:
        self._requeue(lr)
        lr.req.num_evictions += 1
        self._send(["e", lr.req.request_id, lr.sent])

    def retry(self, lr: LiveRequest, engine: WorkerEngine, kind: FailureKind) -> bool:
        rid = lr.req.request_id
        if lr.retries >= self.max_retries or not self.running:
            self._send(["x", rid, engine.index, kind.value])  # the engine's health still counts it
            return False
        lr.retries += 1
        self._requeue(lr)
        self._send(["r", rid, engine.index, kind.value, lr.sent])
        return True

    def abort_all(self, status: int, message: str) -> int:
        """End every request here (the core is gone): queued ones at once, running ones through their scope."""
        n = 0
        for lr in list(self._live.values()):
            if lr.done:
                continue
            n += 1
            lr.abort = (status, message)
            if lr.waiter is not None and not lr.waiter.done():
                lr.waiter.set_result(None)
            elif lr.scope is not None:
                lr.scope.reschedule(self._loop.time())
        return n

    # ------------------------------------------------------------ what the core says
    def deliver(self, msgs: list[Any]) -> None:
        live = self._live
        for m in msgs:
            op = m[0]
            if op == "D":  # dispatch: [D, rid, engine, priority]
                lr = live.get(m[1])
                if lr is None or lr.waiter is None or lr.waiter.done():
                    continue
                lr.queued = False
                lr.engine = eng = self.engines[m[2]]
                lr.engine_priority = m[3]
                lr.waiter.set_result(eng)
            elif op == "A":  # end a queued request: [A, rid, status, message]
                lr = live.get(m[1])
                if lr is None:
                    continue
                lr.queued = False
                lr.abort = (m[2], m[3])
                if lr.waiter is not None and not lr.waiter.done():
                    lr.waiter.set_result(None)
            elif op == "C":  # cancel the running attempt: [C, rid, evict, status, message]
                lr = live.get(m[1])
                if lr is None:
                    continue
                if lr.queued:
                    # Back in the queue (a retry crossed this message): the eviction is moot, an end is not.
                    if m[3] is not None and lr.waiter is not None and not lr.waiter.done():
                        lr.queued = False
                        lr.abort = (m[3], m[4])
                        lr.waiter.set_result(None)
                    continue
                if m[2]:
                    lr.evict_pending = True
                if m[3] is not None:
                    lr.abort = (m[3], m[4])
                if lr.scope is not None:
                    lr.scope.reschedule(self._loop.time())
                # else its handler has not opened the stream yet; it checks evict_pending and abort first.
            elif op == "S":  # the core's state: [S, any healthy, unavailable models, queued per class]
                self._healthy, self.health.unavailable, self.queued_by_class = m[1], m[2], m[3]
            elif op == "G":  # the core gathers metrics: [G, token]
                self._send(["M", m[1], self.families()])
            elif op == "R":  # merged metrics for a scrape of ours: [R, token, text]
                fut = self._metric_waits.pop(m[1], None)
                if fut is not None and not fut.done():
                    fut.set_result(m[2].encode())
            elif op == "drain":
                if self.app is not None:
                    self.app.accepting = False
            elif op == "stop":
                self.running = False
                if self.app is not None:
                    self.app.accepting = False
                self.stop_requested.set()

    async def render_metrics(self) -> bytes:
        """/metrics: every process's metrics summed, gathered by the core (this worker's alone if it is slow)."""
        self._metric_token += 1
        token = self._metric_token
        fut = self._loop.create_future()
        self._metric_waits[token] = fut
        self._send(["m", token])
        try:
            return await asyncio.wait_for(fut, 5.0)
        except asyncio.TimeoutError:
            self._metric_waits.pop(token, None)
            from qlmctl.gateway.exporter import render_merged

            return render_merged([self.families()])


def _die_with_parent(parent: int) -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the core died before prctl took effect
        os._exit(1)


def listen_socket(host: str, port: int, backlog: int = 4096) -> socket.socket:
    """A listening socket on host:port with SO_REUSEPORT (the core holds the port, bound, not listening)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP (else Nagle and
    # delayed ACKs hold small writes for ~40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


async def _worker(fd: int) -> int:
    import uvicorn

    from qlmctl.gateway.app import GatewayApp
    from qlmctl.gateway.clientconn import ClientLimits, ConnectionGuard, raise_fd_limit
    from qlmctl.gateway.exporter import GatewayMetrics, families_of
    from qlmctl.gateway.lograte import QuietLoggers
    from qlmctl.looplag import LoopLagMonitor
    from qlmctl.gateway.security import SecretFilter
    from qlmctl.gateway.server import quiet_server
    from qlmctl.gateway.tokenizer import counter_for

    raise_fd_limit()
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 22)
    first = Channel(reader, writer)
    cfg = unpack_config(await first.recv_raw())
    logging.basicConfig(level=cfg.get("log_level", logging.WARNING), format="%(levelname)s %(name)s: %(message)s")
    cluster = RelayCluster(cfg)
    channel = Channel(reader, writer, before_flush=cluster._take_tokens)
    cluster.channel = channel
    scenario = cfg["scenario"]
    metrics = GatewayMetrics()
    app = GatewayApp(cluster, scenario, metrics, api_keys=cfg["api_keys"], resume=cfg["resume"],  # type: ignore[arg-type]
                     token_count=cfg["token_count"], render_metrics=cluster.render_metrics)
    cluster.app = app
    live = scenario.spec.live
    for model, source in cfg.get("tokenizers", {}).items():
        servers = [e.server for e in cluster.engines if e.model == model]
        app.counters[model] = await asyncio.to_thread(
            counter_for, source, model, servers, live.probe_timeout_s if live is not None else 2.0)
    cluster.families = lambda: families_of(metrics.registry)
    limits = ClientLimits.from_live(scenario.spec.live)
    quiet = QuietLoggers(limits.log_interval_s)
    quiet.install()
    log.addFilter(SecretFilter(cfg["secrets"]))
    lag = LoopLagMonitor(observe=metrics.loop_lag.observe, keep=False)
    lag.start()
    guard = ConnectionGuard(limits, metrics.registry)
    guard.start()
    listener = listen_socket(cfg["host"], cfg["port"])
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=cfg["access_log"],
                            http=guard.protocol_class(), loop="none", timeout_keep_alive=limits.idle_timeout_s + 5,
                            backlog=4096, timeout_graceful_shutdown=10)
    server = quiet_server(config)
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    while not server.started:
        if serving.done():
            channel.send(["fail", f"relay worker {cluster.index} could not listen: {serving.exception()}"])
            await channel.drain()
            return 1
        await asyncio.sleep(0.01)
    reading = asyncio.create_task(channel.run(cluster.deliver))
    channel.send(["ready", os.getpid()])
    stop = asyncio.create_task(cluster.stop_requested.wait())
    await asyncio.wait([reading, stop, serving], return_when=asyncio.FIRST_COMPLETED)
    cluster.running = False
    app.accepting = False
    if not stop.done():  # the core is gone (or the server died): end what is left here
        cluster.abort_all(503, "the gateway is shutting down")
    deadline = time.monotonic() + 5.0
    while cluster.num_active() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    server.should_exit = True
    await asyncio.gather(serving, return_exceptions=True)
    guard.stop()
    await lag.stop()
    await channel.drain()
    reading.cancel()
    stop.cancel()
    await asyncio.gather(reading, stop, return_exceptions=True)
    await asyncio.gather(*(e.server.aclose() for e in cluster.engines), return_exceptions=True)
    quiet.remove()
    return 0


def main(argv: list[str]) -> int:
    fd, parent = int(argv[1]), int(argv[2])
    _die_with_parent(parent)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # the core drains, then says stop
    return asyncio.run(_worker(fd))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
