"""Prometheus metrics of one emulated vLLM server, under vLLM V1's names and labels.

Counters and histograms are plain numbers updated by the engine driver and turned into metric families
only when /metrics is scraped (a custom collector on a per-app registry): the driver may record a batch
of k tokens as one observation of weight k, which prometheus_client's own Histogram cannot do.
Gauges (running, waiting, KV usage) are read from the engine at scrape time.

All durations are wall-clock seconds as the server's clients see them (simulated seconds / speed-up).
Every series has the labels model_name and engine="0", as vLLM V1 with one engine core.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from qlmctl.histogram import (
    ITL_BUCKETS,
    REQUEST_LATENCY_BUCKETS,
    TTFT_BUCKETS,
    WeightedHistogram,
    one_two_five_buckets,
)
from simulator.profile import EngineProfile

FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")
SLEEP_STATES = ("awake", "weights_offloaded", "discard_all")


@dataclass(slots=True)
class EngineGauges:
    running: int
    waiting: int
    kv_usage: float
    """Fraction of KV blocks in use, 0..1."""
    prefix_queries: int = 0
    """Prompt tokens looked up in the prefix cache (vLLM's prefix_cache_queries)."""
    prefix_hits: int = 0
    """Of those, the tokens found cached."""


class EmulatorMetrics:
    """The counters and histograms of one emulated server; `registry` serves them."""

    def __init__(self, model_name: str, profile: EngineProfile, gauges: Callable[[], EngineGauges]) -> None:
        self.model_name = model_name
        self.profile = profile
        self._gauges = gauges
        self.sleep_state = "awake"
        """vLLM's engine_sleep_state: awake, weights_offloaded (level 1) or discard_all (level 2)."""
        self.preemptions = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.success = dict.fromkeys(FINISH_REASONS, 0)
        tok = one_two_five_buckets(profile.max_model_len)
        self.ttft = WeightedHistogram(TTFT_BUCKETS)
        self.itl = WeightedHistogram(ITL_BUCKETS)
        self.e2e = WeightedHistogram(REQUEST_LATENCY_BUCKETS)
        self.request_tpot = WeightedHistogram(ITL_BUCKETS)
        # vLLM V1's per-request phases, observed when a request ends: queue = first scheduled - arrival at
        # the engine, prefill = first token - first scheduled, decode = last token - first token,
        # inference = last token - first scheduled.
        self.queue_time = WeightedHistogram(REQUEST_LATENCY_BUCKETS)
        self.prefill_time = WeightedHistogram(REQUEST_LATENCY_BUCKETS)
        self.decode_time = WeightedHistogram(REQUEST_LATENCY_BUCKETS)
        self.inference_time = WeightedHistogram(REQUEST_LATENCY_BUCKETS)
        self.request_prompt_tokens = WeightedHistogram(tok)
        self.request_generation_tokens = WeightedHistogram(tok)
        self.request_max_tokens = WeightedHistogram(tok)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)  # type: ignore[arg-type]

    def collect(self) -> Iterator[Metric]:
        lab = ["model_name", "engine"]
        val = [self.model_name, "0"]
        g = self._gauges()

        def gauge(name: str, doc: str, v: float) -> GaugeMetricFamily:
            m = GaugeMetricFamily(name, doc, labels=lab)
            m.add_metric(val, v)
            return m

        def counter(name: str, doc: str, v: float) -> CounterMetricFamily:
            m = CounterMetricFamily(name, doc, labels=lab)
            m.add_metric(val, v)
            return m

        def hist(name: str, doc: str, h: WeightedHistogram) -> HistogramMetricFamily:
            m = HistogramMetricFamily(name, doc, labels=lab)
            m.add_metric(val, h.buckets(), h.sum)
            return m

        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.", g.running)
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", g.waiting)
        m = GaugeMetricFamily("vllm:num_requests_waiting_by_reason", "Number of requests waiting, by reason.",
                              labels=lab + ["reason"])
        m.add_metric(val + ["capacity"], g.waiting)  # every wait here is for a batch slot or KV blocks
        m.add_metric(val + ["deferred"], 0)
        yield m
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", g.kv_usage)
        # Gone from vLLM 0.24; kept for older dashboards and gateways.
        yield gauge("vllm:gpu_cache_usage_perc",
                    "GPU KV-cache usage. 1 means 100 percent usage. DEPRECATED: Use vllm:kv_cache_usage_perc.",
                    g.kv_usage)
        m = GaugeMetricFamily("vllm:engine_sleep_state", "Engine sleep state", labels=lab + ["sleep_state"])
        for st in SLEEP_STATES:
            m.add_metric(val + [st], 1.0 if st == self.sleep_state else 0.0)
        yield m
        p = self.profile
        info = {
            "block_size": str(p.block_size),
            "cache_dtype": "auto",
            "enable_prefix_caching": str(bool(p.enable_prefix_caching)),
            "engine": "0",
            "gpu_memory_utilization": "0.92",
            "kv_cache_size_tokens": str(p.kv_blocks * p.block_size),
            "num_cpu_blocks": "None",
            "num_gpu_blocks": str(p.kv_blocks),
        }
        m = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                              labels=list(info))
        m.add_metric(list(info.values()), 1.0)
        yield m
        yield counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.", self.preemptions)
        yield counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
                      g.prefix_queries)
        yield counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                      g.prefix_hits)
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", self.prompt_tokens)
        yield counter("vllm:generation_tokens", "Number of generation tokens processed.", self.generation_tokens)
        m = CounterMetricFamily("vllm:request_success", "Count of successfully processed requests.",
                                labels=lab + ["finished_reason"])
        for reason, v in self.success.items():
            m.add_metric(val + [reason], v)
        yield m
        yield hist("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", self.ttft)
        yield hist("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", self.itl)
        yield hist("vllm:request_time_per_output_token_seconds",
                   "Histogram of time_per_output_token_seconds per request.", self.request_tpot)
        yield hist("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", self.e2e)
        yield hist("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
                   self.queue_time)
        yield hist("vllm:request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request.",
                   self.inference_time)
        yield hist("vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.",
                   self.prefill_time)
        yield hist("vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.",
                   self.decode_time)
        yield hist("vllm:request_prompt_tokens", "Number of prefill tokens processed.", self.request_prompt_tokens)
        yield hist("vllm:request_generation_tokens", "Number of generation tokens processed.",
                   self.request_generation_tokens)
        yield hist("vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.",
                   self.request_max_tokens)
