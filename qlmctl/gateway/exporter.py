"""The gateway's own Prometheus metrics (GET /metrics): counters and histograms updated as requests end,
gauges of queue depths and engine state read from the cluster at scrape time.

One `CollectorRegistry` per gateway (no global state, so several gateways can live in one process, as in
tests). The exporter reads the cluster through `ObservedCluster`, not the cluster class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest

from qlmctl.engines.base import EngineMetrics
from qlmctl.gateway.reqmetrics import RequestMetrics

# Latency buckets (s): from sub-second interactive answers to hour-long batch deadlines.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0, 3600.0, float("inf"),
)
# Event-loop lag buckets (s): a healthy loop lags well under a millisecond.
LOOP_LAG_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, float("inf"),
)


class ObservedEngine(Protocol):
    """An engine's state as the exporter reads it."""

    @property
    def in_flight(self) -> int: ...

    @property
    def free_kv_blocks(self) -> int: ...

    @property
    def awake(self) -> bool: ...

    healthy: bool
    metrics: EngineMetrics | None
    """The engine's metrics at its last poll."""


class ObservedInstance(Protocol):
    name: str

    @property
    def swapping(self) -> bool: ...


class ObservedCluster(Protocol):
    """What the exporter reads from the live cluster at scrape time."""

    @property
    def instances(self) -> Sequence[ObservedInstance]: ...

    def queue_depth_by_class(self) -> dict[str, int]: ...

    def queue_depth_by_group(self) -> dict[tuple[str, str], int]: ...

    def engine_rows(self) -> Sequence[tuple[str, str, ObservedEngine]]:
        """(instance name, model, engine) for every engine."""
        ...

    def request_counts(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(model, SLO class) -> (requests waiting in the gateway, requests on an engine)."""
        ...


class GatewayMetrics:
    """The gateway's Prometheus metrics, in a registry of its own: the `qlm_*` families here, and the
    vLLM-style `qlm:` families of `qlmctl.gateway.reqmetrics` (`vllm`)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.vllm = RequestMetrics()
        """The per-request families under vLLM's conventions (`qlm:` names, model_name and slo_class labels)."""
        r.register(self.vllm)  # type: ignore[arg-type]
        self.requests = Counter(
            "qlm_requests", "Requests ended, by SLO class, model and outcome "
            "(slo_met, slo_missed, error, cancelled).", ["slo_class", "model", "outcome"], registry=r)
        self.slo_met = Counter("qlm_slo_met", "Requests that met their SLO.", ["slo_class"], registry=r)
        self.evictions = Counter("qlm_evictions", "Requests evicted from an engine.", ["slo_class"], registry=r)
        self.swaps = Counter("qlm_model_swaps", "Model swaps done.", ["instance", "model"], registry=r)
        self.ttft = Histogram("qlm_time_to_first_token_seconds", "Gateway-side TTFT (arrival to first token), s.",
                              ["slo_class"], buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("qlm_e2e_request_latency_seconds", "Gateway-side end-to-end latency, s.",
                             ["slo_class"], buckets=LATENCY_BUCKETS, registry=r)
        self.loop_lag = Histogram("qlm_gateway_event_loop_lag_seconds",
                                  "How much later than due the gateway's event loop ran a task that slept a "
                                  "fixed interval, s (time spent on other work first).",
                                  buckets=LOOP_LAG_BUCKETS, registry=r)
        self._children: dict[tuple[str, ...], object] = {}

    def attach(self, cluster: ObservedCluster) -> None:
        """Export `cluster`'s queue depths and engine state (read at scrape time)."""
        self.registry.register(_ClusterCollector(cluster))
        self.vllm.attach(cluster.request_counts)

    def observe_end(self, slo_class: str, model: str, outcome: str, ttft_s: float | None,
                    e2e_s: float | None) -> None:
        """Count one request that ended; latencies in s (None where there were none)."""
        key = (slo_class, model, outcome)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.requests.labels(slo_class, model, outcome)
        child.inc()  # type: ignore[attr-defined]
        if outcome == "slo_met":
            self.slo_met.labels(slo_class).inc()
        if ttft_s is not None:
            self.ttft.labels(slo_class).observe(ttft_s)
        if e2e_s is not None and outcome in ("slo_met", "slo_missed"):
            self.e2e.labels(slo_class).observe(e2e_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ClusterCollector:
    """Gauges read from the live cluster at scrape time."""

    def __init__(self, cluster: ObservedCluster) -> None:
        self.cluster = cluster

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        c = self.cluster
        by_class = GaugeMetricFamily("qlm_queue_depth", "Requests waiting in the gateway, by SLO class.",
                                     labels=["slo_class"])
        for cls, n in sorted(c.queue_depth_by_class().items()):
            by_class.add_metric([cls], n)
        yield by_class
        by_group = GaugeMetricFamily("qlm_group_queue_depth",
                                     "Requests waiting in the gateway, by request group (model, SLO bucket).",
                                     labels=["model", "group"])
        for (model, group), n in sorted(c.queue_depth_by_group().items()):
            by_group.add_metric([model, group], n)
        yield by_group
        yield _gauge("qlm_requests_in_flight", "Requests the gateway has on each engine.",
                     c.engine_rows(), lambda e: e.in_flight)
        yield _gauge("qlm_engine_num_requests_running", "vllm:num_requests_running at the last poll.",
                     c.engine_rows(), lambda e: e.metrics.num_requests_running if e.metrics else 0.0)
        yield _gauge("qlm_engine_num_requests_waiting", "vllm:num_requests_waiting at the last poll.",
                     c.engine_rows(), lambda e: e.metrics.num_requests_waiting if e.metrics else 0.0)
        yield _gauge("qlm_engine_kv_cache_usage", "vllm:kv_cache_usage_perc at the last poll (0..1).",
                     c.engine_rows(), lambda e: (e.metrics.kv_cache_usage or 0.0) if e.metrics else 0.0)
        yield _gauge("qlm_engine_free_kv_blocks", "KV blocks the scheduler believes free on the awake engine.",
                     c.engine_rows(), lambda e: e.free_kv_blocks)
        yield _gauge("qlm_engine_awake", "1 when this engine's model is the one awake on its GPU.",
                     c.engine_rows(), lambda e: 1.0 if e.awake else 0.0)
        yield _gauge("qlm_engine_healthy", "1 when the engine answered its last poll.",
                     c.engine_rows(), lambda e: 1.0 if e.healthy else 0.0)
        yield _gauge("qlm_instance_swapping", "1 while a model swap is under way on the instance.",
                     [(i.name, "", i) for i in c.instances], lambda i: 1.0 if i.swapping else 0.0,
                     labels=("instance",))


def _gauge(name: str, doc: str, rows: list, value: Callable, labels: tuple[str, ...] = ("instance", "model")
           ) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=list(labels))
    for row in rows:
        g.add_metric(list(row[: len(labels)]), float(value(row[-1])))
    return g


# ----------------------------------------------------------------------------------------------- several processes
Families = list[list]
"""A registry's metrics as plain data (what a relay worker sends the core): [name, help, type, unit, samples],
each sample [name, labels, value]."""


def families_of(registry: CollectorRegistry) -> Families:
    """`registry`'s metrics now, as plain data (`Families`)."""
    return [[m.name, m.documentation, m.type, m.unit, [[s.name, s.labels, s.value] for s in m.samples]]
            for m in registry.collect()]


def render_merged(parts: Sequence[Families]) -> bytes:
    """Prometheus text of several processes' metrics as one: the samples of a metric with the same labels are
    summed (counters, histogram buckets and sums, and gauges such as open connections all add up across relay
    workers); a `_created` timestamp is the earliest."""
    merged: dict[str, tuple[str, str, str, dict[tuple[str, tuple], list]]] = {}
    for fams in parts:
        for name, doc, typ, unit, samples in fams:
            entry = merged.get(name)
            if entry is None:
                entry = merged[name] = (doc, typ, unit, {})
            rows = entry[3]
            for sname, labels, value in samples:
                key = (sname, tuple(sorted(labels.items())))
                row = rows.get(key)
                if row is None:
                    rows[key] = [sname, labels, value]
                elif sname.endswith("_created"):
                    row[2] = min(row[2], value)
                else:
                    row[2] += value

    class _Merged:
        def collect(self) -> Iterator[Metric]:
            for name, (doc, typ, unit, rows) in merged.items():
                m = Metric(name, doc, typ, unit)
                for sname, labels, value in rows.values():
                    m.add_sample(sname, labels, value)
                yield m

    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Merged())
    return generate_latest(reg)
