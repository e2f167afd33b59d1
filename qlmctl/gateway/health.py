"""Engine health in the live gateway: failures, unhealthy engines, probes, models left without an engine.

How an engine fails a request (`FailureKind`) decides what happens to the engine:

- hard failures mark it unhealthy at once: the connection could not be made or was lost (a dead or
  restarting server), or a stream stalled past its timeout (a hung server);
- soft failures count: an error status (5xx) or an error event in the stream from a server that is
  otherwise answering; `live.unhealthy_after` of them in a row mark it unhealthy (a first token on it
  resets the count), and so do as many failed /metrics polls in a row.

- outliers: an engine whose attempts fail at `live.outlier_error_rate` or more over a window is ejected
  for `live.outlier_ejection_s` (`qlmctl.gateway.outlier`), unless it is its model's last healthy engine.

An unhealthy engine takes no new requests (its instance reports `healthy = False`; the policy is told
through `on_instance_changed`); requests it still holds carry on until their own streams end or fail.
Each engine has its own watch task: a healthy one is polled (/metrics) every `metrics_interval_s`, an
unhealthy one probed (/health, then /metrics) every `probe_interval_s`, and is healthy again on the
first probe that answers once its ejection time is over. The ejection time doubles with every
ejection in a row (`probe_interval_s` x 1, 2, 4 ... 32) and resets at the engine's next first token:
an engine that answers /health but fails every request (it looks idle, so least-loaded routing
would send it everything) is tried less and less often. A model none of whose engines has been
healthy for `unavailable_timeout_s` fails its queued requests, and new ones at once, with 503.

The request's side (re-queueing within its retry budget) is in `qlmctl.gateway.relay`; the failure kinds
are the engine seam's (`qlmctl.engines.base.FailureKind`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter

from qlmctl.engines.base import FailureKind
from qlmctl.gateway.outlier import OutlierDetector, OutlierPolicy

if TYPE_CHECKING:
    from qlmctl.gateway.instance import LiveEngine, LiveInstance

log = logging.getLogger("qlmctl.gateway")

MAX_BACKOFF_DOUBLINGS = 5
"""An engine ejected again and again waits at most 2**5 = 32 probe intervals before its next probe."""


class HealthMetrics:
    """Counters of failures and retries, in the gateway's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.engine_failures = Counter(
            "qlm_engine_failures", "Engine attempts that failed, by engine and kind "
            "(connect, lost, status, stream_error, first_token_timeout, stalled).",
            ["instance", "model", "kind"], registry=registry)
        self.retries = Counter("qlm_retries", "Requests re-queued after their engine failed them.",
                               ["slo_class", "kind"], registry=registry)
        self.health_changes = Counter("qlm_engine_health_changes", "Engines marked unhealthy or healthy again.",
                                      ["instance", "model", "healthy"], registry=registry)


class Watched(Protocol):
    """What the monitor needs of the cluster whose engines it watches."""

    @property
    def models(self) -> Sequence[str]: ...

    @property
    def instances(self) -> Sequence[LiveInstance]: ...

    def health_changed(self, e: LiveEngine) -> None:
        """`e` turned unhealthy or healthy."""

    async def poll_engine(self, e: LiveEngine, timeout_s: float = 2.0) -> bool | None:
        """Read `e`'s metrics into the cluster's state; False when it did not answer, None when the gateway
        could not ask (out of resources: not the engine's failure)."""
        ...


class HealthMonitor:
    """Marks a live cluster's engines unhealthy and healthy, polls and probes them, times out lost models."""

    def __init__(self, cluster: Watched, metrics: HealthMetrics, *, unhealthy_after: int = 3,
                 metrics_interval_s: float = 0.5, probe_interval_s: float = 1.0, probe_timeout_s: float = 2.0,
                 unavailable_timeout_s: float = 30.0, outlier: OutlierPolicy | None = None) -> None:
        self.cluster = cluster
        self.metrics = metrics
        self.unhealthy_after = unhealthy_after
        self.metrics_interval_s = metrics_interval_s
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.unavailable_timeout_s = unavailable_timeout_s
        self._down_since: dict[str, float] = {}
        """Per model with no healthy engine: since when (loop time)."""
        self.unavailable: set[str] = set()
        """Models without a healthy engine for longer than `unavailable_timeout_s`."""
        self.outliers = OutlierDetector(outlier)

    # ------------------------------------------------------------ events
    def failure(self, e: LiveEngine, kind: FailureKind) -> None:
        """An attempt on `e` failed. A local failure (the gateway out of descriptors or memory) is not the
        engine's and does not count."""
        if kind is FailureKind.LOCAL:
            return
        self.metrics.engine_failures.labels(e.instance.name, e.model, kind.value).inc()
        e.fails += 1
        now = asyncio.get_running_loop().time()
        eject_s = self.outliers.observe(e, now, failed=True)
        if kind.hard or e.fails >= self.unhealthy_after:
            self.mark_unhealthy(e, kind)
        elif eject_s is not None and e.healthy and self._others_healthy(e):
            attempts, failures = self.outliers.rate(e, now)
            self.mark_unhealthy(e, kind, eject_s, f"{failures} of its last {attempts} attempts failed "
                                                  f"(outlier_error_rate {self.outliers.policy.error_rate:g})")

    def success(self, e: LiveEngine) -> None:
        """A request got its first token from `e`."""
        e.fails = 0
        e.ejections = 0
        self.outliers.observe(e, asyncio.get_running_loop().time(), failed=False)

    def _others_healthy(self, e: LiveEngine) -> bool:
        """Whether another engine of `e`'s model is healthy (outlier ejection never takes the last one)."""
        return any(x is not e and x.healthy for inst in self.cluster.instances
                   for m, x in inst.engines.items() if m == e.model)

    def poll_failed(self, e: LiveEngine) -> None:
        e.poll_fails += 1
        if e.poll_fails >= self.unhealthy_after:
            self.mark_unhealthy(e, FailureKind.POLL)

    def mark_unhealthy(self, e: LiveEngine, kind: FailureKind, eject_s: float | None = None,
                       why: str | None = None) -> None:
        """Take `e` out: it is probed again after `eject_s` (default: the probe backoff)."""
        if not e.healthy:
            return
        e.healthy = False
        e.ejections += 1
        if eject_s is None:
            eject_s = self.probe_interval_s * 2 ** min(e.ejections - 1, MAX_BACKOFF_DOUBLINGS)
        e.eject_until = asyncio.get_running_loop().time() + eject_s
        log.warning("engine %s (%s on %s) is unhealthy: %s; probing it from %g s on", e.url, e.model,
                    e.instance.name, why or kind.describe(), eject_s)
        self.metrics.health_changes.labels(e.instance.name, e.model, "0").inc()
        self.cluster.health_changed(e)

    def mark_healthy(self, e: LiveEngine) -> None:
        e.fails = 0
        e.poll_fails = 0
        if e.healthy:
            return
        e.healthy = True
        self.outliers.readmitted(e, asyncio.get_running_loop().time())
        log.warning("engine %s (%s on %s) is healthy again", e.url, e.model, e.instance.name)
        self.metrics.health_changes.labels(e.instance.name, e.model, "1").inc()
        self.cluster.health_changed(e)

    # ------------------------------------------------------------ watch tasks
    async def watch(self, e: LiveEngine) -> None:
        """Poll `e` while healthy, probe it while not; runs until cancelled."""
        cluster = self.cluster
        while True:
            if e.healthy:
                await asyncio.sleep(self.metrics_interval_s)
                if not e.instance.control.available(e):
                    continue  # stopped on purpose (a restart swap): nothing to poll
                ok = await cluster.poll_engine(e, self.probe_timeout_s)
                if ok:
                    e.poll_fails = 0
                elif ok is False:
                    self.poll_failed(e)
            else:
                await asyncio.sleep(self.probe_interval_s)
                if not e.instance.control.available(e) or asyncio.get_running_loop().time() < e.eject_until:
                    continue
                if await e.server.health(self.probe_timeout_s) and await cluster.poll_engine(e, self.probe_timeout_s):
                    self.mark_healthy(e)

    def check_models(self, now: float) -> list[str]:
        """Update which models have no healthy engine; returns those that just passed the timeout.

        `now` is loop time (wall seconds).
        """
        expired: list[str] = []
        for model in self.cluster.models:
            engines = [e for inst in self.cluster.instances for m, e in inst.engines.items() if m == model]
            if any(e.healthy for e in engines):
                self._down_since.pop(model, None)
                self.unavailable.discard(model)
                continue
            since = self._down_since.setdefault(model, now)
            if model not in self.unavailable and now - since >= self.unavailable_timeout_s:
                self.unavailable.add(model)
                expired.append(model)
        return expired

    def unavailable_message(self, model: str) -> str | None:
        """The 503 message for requests of `model` while it has been without a healthy engine too long."""
        if model not in self.unavailable:
            return None
        return (f"no healthy engine has served model `{model}` for more than {self.unavailable_timeout_s:g} s; "
                "try again later")
