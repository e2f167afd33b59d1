"""The gateway's lifecycle: connect to the engines, listen, drain on SIGTERM, stop.

A `Gateway` owns one policy, the live cluster it drives (`qlmctl.gateway.cluster`), the ASGI app in front
(`qlmctl.gateway.app`) on uvicorn, its Prometheus registry and its event-loop lag monitor.

With `workers` > 1 this process is the QLM core only and the HTTP side runs in that many relay worker
processes (`qlmctl.gateway.workers`); the lifecycle (start, drain, stop) is the same.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from qlmctl.errors import UserError
from qlmctl.gateway.app import GatewayApp
from qlmctl.gateway.clientconn import ClientLimits, ConnectionGuard
from qlmctl.gateway.cluster import LiveCluster
from qlmctl.gateway.exporter import GatewayMetrics
from qlmctl.gateway.instance import SwapControl
from qlmctl.gateway.lograte import QuietLoggers
from qlmctl.looplag import LoopLagMonitor
from qlmctl.gateway.security import SecretFilter, resolve_api_key, resolve_api_keys, scenario_secrets
from qlmctl.gateway.tokenizer import resolve
from qlmctl.policies import Policy, PolicyContext, make_policy
from qlmctl.scenario import LiveEngineSpec, Scenario

log = logging.getLogger("qlmctl.gateway")


def quiet_server(config: Any) -> Any:
    """A uvicorn server without its signal handlers: SIGINT/SIGTERM are the caller's to handle
    (`qlmctl serve` drains), and a gateway inside tests or another program must not take them."""
    import contextlib

    import uvicorn

    class _Server(uvicorn.Server):
        def capture_signals(self) -> Any:
            return contextlib.nullcontext()

    return _Server(config)


class Gateway:
    """A gateway with one policy in front of a scenario's engines; start/stop it inside an event loop.

    Args:
        scenario: A scenario with a `live` section (or `engines` given here).
        policy: Policy name (see `qlmctl policies`), or a policy object.
        host, port: Where to listen; default the scenario's `live.host`/`live.port` (port 0: any free one).
        engines: The engines, replacing `live.engines` (e.g. those `--launch` started).
        speedup: Gateway clock rate; default `live.speedup`.
        swap_control: How instances swap models (default: vLLM sleep mode).
        record: Keep every request for `records()` (results files); off for a long-running server.
        access_log: Log every HTTP request (uvicorn's access log).
        api_key: Clients must send `Authorization: Bearer <api_key>`; default live.api_key, else
            $QLMCTL_API_KEY, else no authentication; live.api_keys adds keys with limits.
    """

    def __init__(
        self,
        scenario: Scenario,
        policy: str | Policy,
        *,
        host: str | None = None,
        port: int | None = None,
        engines: list[LiveEngineSpec] | None = None,
        speedup: float | None = None,
        swap_control: SwapControl | None = None,
        record: bool = True,
        access_log: bool = False,
        api_key: str | None = None,
        workers: int = 1,
    ) -> None:
        live = scenario.spec.live
        self.workers = max(1, workers)
        self.scenario = scenario
        self.policy_name = policy if isinstance(policy, str) else policy.name
        self.host = host or (live.host if live is not None else "127.0.0.1")
        self.port = port if port is not None else (live.port if live is not None else 8000)
        self.resume = live.resume if live is not None else "continue"
        self.token_count = live.token_count if live is not None else "usage"
        self.drain_timeout_s = live.drain_timeout_s if live is not None else 30.0
        keys = resolve_api_keys(scenario, api_key)
        self.api_key = resolve_api_key(scenario, api_key) or (keys[0][0] if keys else None)
        """The key a replay through this gateway sends (live.api_key, else the first of live.api_keys)."""
        self._secret_filter = SecretFilter(scenario_secrets(scenario, [self.api_key]))
        self.metrics = GatewayMetrics()
        self.policy = (make_policy(policy, PolicyContext.from_scenario(scenario, realtime=True))
                       if isinstance(policy, str) else policy)
        self.pool: Any = None
        """The relay worker processes (`workers` > 1), else None."""
        if self.workers > 1:
            from qlmctl.gateway.limits import QueueLimits
            from qlmctl.gateway.workers import CoreCluster, RelayWorkers, engine_specs

            self.cluster = CoreCluster(scenario, self.policy, engines=engines, speedup=speedup,
                                       swap_control=swap_control, metrics=self.metrics, record=record,
                                       limits=QueueLimits.from_live(live))
            self.app = None
            max_conn = live.max_connections if live is not None else 4096
            self.pool = RelayWorkers(self.cluster, self.workers, {
                "scenario": scenario, "engines": engine_specs(self.cluster), "models": self.cluster.models,
                "speedup": self.cluster.speedup, "max_retries": self.cluster.max_retries,
                "retry_after_s": self.cluster.retry_after_s,
                "max_connections": max(16, -(-max_conn // self.workers)),  # the engines' limit, shared
                "api_keys": keys, "resume": self.resume, "token_count": self.token_count,
                "access_log": access_log, "secrets": scenario_secrets(scenario, [self.api_key]),
                "log_level": logging.getLogger().getEffectiveLevel(),
            })
            self.cluster.pool = self.pool
        else:
            self.cluster = LiveCluster(scenario, self.policy, engines=engines, speedup=speedup,
                                       swap_control=swap_control, metrics=self.metrics, record=record)
            self.app = GatewayApp(self.cluster, scenario, self.metrics, api_keys=keys, resume=self.resume,
                                  token_count=self.token_count)
        self.metrics.attach(self.cluster)
        self._accepting = True
        self.loop_lag = LoopLagMonitor(observe=self.metrics.loop_lag.observe,
                                       on_window=self._record_lag if record else None, keep=record)
        """The event loop's lag while the gateway runs (/metrics; per second in the timeline when recording)."""
        self.client_limits = ClientLimits.from_live(live)
        self._quiet = QuietLoggers(self.client_limits.log_interval_s)
        self.connections: ConnectionGuard | None = None
        """Client connections: timeouts and the connection limit (made at `start`)."""
        self._access_log = access_log
        self._server: Any = None
        self._task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _record_lag(self, max_lag_s: float) -> None:
        self.cluster.timeline.append((self.cluster.now(), "loop_lag", -1, "", "", max_lag_s))

    async def start(self, wait_healthy_s: float = 60.0) -> None:
        """Connect to the engines, then listen; returns once the server accepts connections."""
        import uvicorn

        log.addFilter(self._secret_filter)
        self._quiet.install()
        try:
            await self.cluster.start(wait_healthy_s)
        except BaseException:
            log.removeFilter(self._secret_filter)
            self._quiet.remove()
            raise
        try:
            await self._resolve_tokenizers()
        except BaseException:
            await self.cluster.stop()
            log.removeFilter(self._secret_filter)
            self._quiet.remove()
            raise
        self.loop_lag.start()
        if self.pool is not None:
            self.pool.config["t0"] = self.cluster.t0
            try:
                self.port = await self.pool.start(self.host, self.port)
            except BaseException:
                await self.loop_lag.stop()
                await self.cluster.stop()
                log.removeFilter(self._secret_filter)
                self._quiet.remove()
                raise
            return
        self.connections = ConnectionGuard(self.client_limits, self.metrics.registry)
        self.connections.start()
        config = uvicorn.Config(self.app, host=self.host, port=self.port, log_level="warning", lifespan="off",
                                access_log=self._access_log, http=self.connections.protocol_class(), loop="none",
                                # the guard closes idle connections (and counts them); uvicorn's timer is a backstop
                                timeout_keep_alive=self.client_limits.idle_timeout_s + 5, backlog=4096,
                                timeout_graceful_shutdown=10)
        self._server = quiet_server(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self.connections.stop()
                await self.loop_lag.stop()
                await self.cluster.stop()
                log.removeFilter(self._secret_filter)
                self._quiet.remove()
                exc = self._task.exception()
                raise OSError(f"gateway could not listen on {self.host}:{self.port}: {exc or 'exited'}")
            await asyncio.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]

    async def _resolve_tokenizers(self) -> None:
        """Pick each model's prompt token counter (`live.tokenizer`) and say which is in use."""
        live = self.scenario.spec.live
        setting = live.tokenizer if live is not None else "auto"
        timeout_s = live.probe_timeout_s if live is not None else 2.0
        for model in self.cluster.models:
            servers = [e.server for inst in self.cluster.instances for m, e in inst.engines.items() if m == model]
            try:
                counter = await resolve(setting, model, servers, timeout_s)
            except ValueError as e:
                raise UserError(str(e)) from None
            if self.app is not None:
                self.app.counters[model] = counter
            else:  # relay workers build the same counter from its source (`tokenizer.counter_for`)
                self.pool.config.setdefault("tokenizers", {})[model] = counter.source
            self.metrics.vllm.tokenizers[model] = counter.source
            log.info("prompt tokens of model %s: %s (live.tokenizer: %s)", model, counter.source, setting)

    @property
    def tokenizers(self) -> dict[str, str]:
        """Model -> the source of its prompt token counts (`words`, `engine`, `hf:<path>`)."""
        return dict(self.metrics.vllm.tokenizers)

    async def wait(self) -> None:
        """Until the server exits (Ctrl-C, SIGTERM)."""
        if self._task is not None:
            await self._task
        elif self.pool is not None:
            await asyncio.Event().wait()  # the workers serve until stop()

    @property
    def accepting(self) -> bool:
        return self._accepting

    def _stop_intake(self) -> None:
        self._accepting = False
        if self.app is not None:
            self.app.accepting = False
        if self.pool is not None:
            self.pool.drain()

    @property
    def draining(self) -> bool:
        return not self._accepting

    async def drain(self, grace_s: float | None = None) -> tuple[int, int]:
        """Stop intake (new requests get 503), let queued and running requests finish for up to `grace_s`
        wall seconds (default live.drain_timeout_s), then end the rest with a 503 error.

        Returns (requests that finished during the grace period, requests ended with an error). The
        server still listens (answering 503) until `stop()`.
        """
        loop = asyncio.get_running_loop()
        grace = self.drain_timeout_s if grace_s is None else grace_s
        self._stop_intake()
        cluster = self.cluster
        active = cluster.num_active()
        log.warning("draining: %d request(s) queued or running, up to %g s", active, grace)
        deadline = loop.time() + grace
        while cluster.num_active() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        failed = await self._end_all("the gateway shut down before this request finished")
        if failed:
            log.warning("drain: ended %d request(s) unfinished after %g s", failed, grace)
        return active - failed, failed

    async def _end_all(self, message: str) -> int:
        """End every request still queued or running with a 503; wait (briefly) for their answers."""
        failed = self.cluster.abort_all(503, message)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5.0
        while self.cluster.num_active() and loop.time() < deadline:
            await asyncio.sleep(0.02)
        return failed

    async def stop(self) -> None:
        """Stop at once: requests still queued or running end with a 503 (`drain` first to let them finish)."""
        self._stop_intake()
        if (self._server is not None or self.pool is not None) and self.cluster.num_active():
            await self._end_all("the gateway is shutting down")
        if self.pool is not None:
            await self.pool.stop()
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self.connections is not None:
            self.connections.stop()
        await self.loop_lag.stop()
        await self.cluster.stop()
        log.removeFilter(self._secret_filter)
        self._quiet.remove()

    async def render_metrics(self) -> bytes:
        """What GET /metrics answers: this process's registry, or with workers every process's summed."""
        if self.pool is not None:
            return await self.cluster.render_all()
        return self.metrics.render()

    async def __aenter__(self) -> "Gateway":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
