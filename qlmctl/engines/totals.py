"""Prometheus on both sides of the gateway: reading vLLM's /metrics, and exporting the gateway's own.

Reading: a vLLM server's /metrics page is large (tens of KB of histograms) and is polled every
half second per engine, so it is scanned line by line for the few series the gateway needs rather
than parsed in full (the full parser takes milliseconds, which would stall the event loop).

Over a run: `parse_engine_totals` reads the cumulative vLLM histograms and counters that decompose an
engine's latency (queue, prefill, decode, ...) with prometheus_client's full parser (only at the start and
end of a live run), and `engine_totals_delta` takes their difference over the run.

Exporting: one `CollectorRegistry` per gateway (no global state, so several gateways can live in one
process, as in tests). Counters and histograms are updated as requests finish; queue depths and
engine state are read from the live cluster at scrape time by a custom collector.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest

if TYPE_CHECKING:
    from qlmctl.live.backend import LiveCluster

_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

# Latency buckets (s): from sub-second interactive answers to hour-long batch deadlines.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0, 3600.0, float("inf"),
)
# Event-loop lag buckets (s): a healthy loop lags well under a millisecond.
LOOP_LAG_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, float("inf"),
)

RUN_HISTOGRAMS: tuple[str, ...] = (
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:request_time_per_output_token_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds",
    "vllm:request_prefill_time_seconds",
    "vllm:request_decode_time_seconds",
    "vllm:request_inference_time_seconds",
    "vllm:iteration_tokens_total",
)
"""vLLM histograms whose change over a live run `run_live` reports (the engine's latency decomposition)."""
RUN_COUNTERS: tuple[str, ...] = ("vllm:num_preemptions", "vllm:prompt_tokens", "vllm:generation_tokens")
"""vLLM counters whose change over a live run `run_live` reports (names without `_total`)."""


@dataclass(slots=True)
class EngineMetrics:
    """The series of one vLLM /metrics page the gateway uses (summed over the server's engines)."""

    num_requests_running: float = 0.0
    num_requests_waiting: float = 0.0
    kv_cache_usage: float | None = None
    """Fraction of KV blocks in use, 0..1 (vllm:kv_cache_usage_perc, formerly gpu_cache_usage_perc)."""
    num_gpu_blocks: int | None = None
    """From vllm:cache_config_info."""
    block_size: int | None = None


def parse_vllm_metrics(text: str) -> EngineMetrics:
    """Pick vLLM's scheduler gauges and cache config out of a Prometheus text page."""
    m = EngineMetrics()
    usage: list[float] = []
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        brace = line.find("{")
        space = line.rfind(" ")
        if space < 0:
            continue
        name = line[5:brace if 0 <= brace < space else space]
        if name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                    "gpu_cache_usage_perc"):
            try:
                value = float(line[space + 1:])
            except ValueError:
                continue
            if name == "num_requests_running":
                m.num_requests_running += value
            elif name == "num_requests_waiting":
                m.num_requests_waiting += value
            else:
                usage.append(value)
        elif name == "cache_config_info" and brace >= 0:
            labels = dict(_LABEL.findall(line[brace:space]))
            try:
                m.num_gpu_blocks = (m.num_gpu_blocks or 0) + int(labels.get("num_gpu_blocks", ""))
            except ValueError:
                pass
            try:
                m.block_size = int(labels.get("block_size", ""))
            except ValueError:
                pass
    if usage:
        # Data-parallel servers report one gauge per engine; their mean is the server's usage.
        m.kv_cache_usage = sum(usage) / len(usage)
    return m


@dataclass(slots=True)
class HistogramTotals:
    """One histogram's cumulative state, summed over its label sets."""

    count: float = 0.0
    sum: float = 0.0
    buckets: dict[str, float] = field(default_factory=dict)
    """Cumulative count per upper bound, keyed by the `le` label as the page spells it ("0.5", "+Inf")."""


@dataclass(slots=True)
class EngineTotals:
    """The cumulative histograms and counters of one /metrics page that are present on it."""

    histograms: dict[str, HistogramTotals] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)


def parse_engine_totals(text: str, histograms: tuple[str, ...] = RUN_HISTOGRAMS,
                        counters: tuple[str, ...] = RUN_COUNTERS) -> EngineTotals:
    """Sum `histograms` and `counters` over their label sets (model_name, engine, ...) on a /metrics page.

    Samples are matched by name, not by family, so that both spellings of a counter work: the parser
    strips `_total` from a counter family's name when the page types it, and keeps it when the page does
    not (and `vllm:iteration_tokens_total` is a histogram whose name ends in `_total`). Series that are
    absent are absent from the result.
    """
    from prometheus_client.parser import text_string_to_metric_families

    roles: dict[str, tuple[str, str]] = {}
    for h in histograms:
        for suffix in ("_bucket", "_count", "_sum"):
            roles[h + suffix] = (h, suffix)
    for c in counters:
        roles[c] = roles[c + "_total"] = (c, "")
    out = EngineTotals()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            role = roles.get(s.name)
            if role is None:
                continue
            name, suffix = role
            if not suffix:
                out.counters[name] = out.counters.get(name, 0.0) + s.value
                continue
            h = out.histograms.setdefault(name, HistogramTotals())
            if suffix == "_count":
                h.count += s.value
            elif suffix == "_sum":
                h.sum += s.value
            elif "le" in s.labels:
                le = s.labels["le"]
                h.buckets[le] = h.buckets.get(le, 0.0) + s.value
    return out


def _bound(le: str) -> float:
    try:
        return float(le)
    except ValueError:
        return float("inf")


def engine_totals_delta(before: EngineTotals, after: EngineTotals) -> dict[str, Any]:
    """What changed between two scrapes of one engine, as plain JSON-serialisable values.

    Returns {histogram: {"count", "sum", "mean" (None without observations), "buckets": {le: cumulative
    count}}, counter: change}, for the series on the later page. A series that went down (the engine
    restarted in between) counts from zero, as Prometheus' `increase` does.
    """
    out: dict[str, Any] = {}
    for name, h in after.histograms.items():
        b = before.histograms.get(name)
        if b is None or h.count < b.count:
            b = HistogramTotals()
        count = h.count - b.count
        total = h.sum - b.sum
        les = sorted(h.buckets, key=_bound)
        buckets = {le: h.buckets[le] - b.buckets.get(le, 0.0) for le in les}
        out[name] = {"count": count, "sum": total, "mean": total / count if count > 0 else None, "buckets": buckets}
    for name, v in after.counters.items():
        prev = before.counters.get(name, 0.0)
        out[name] = v - prev if v >= prev else v
    return out


class GatewayMetrics:
    """The gateway's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
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

    def attach(self, cluster: "LiveCluster") -> None:
        """Export `cluster`'s queue depths and engine state (read at scrape time)."""
        self.registry.register(_ClusterCollector(cluster))

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

    def __init__(self, cluster: "LiveCluster") -> None:
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
