"""The gateway's per-request metrics under vLLM's conventions: `qlm:` names, `model_name` and `slo_class` labels.

vLLM exports `vllm:time_to_first_token_seconds{model_name}` and its kin; the gateway exports the same
measures as its clients see them, split by SLO class as well (`qlm:time_to_first_token_seconds{model_name,
slo_class}`), plus what only a queue in front of the engines has: `qlm:request_queue_time_seconds`, the time
a request waited in the QLM queues before its first dispatch (QLM's main signal). A dashboard made for
vLLM reads them with the prefix changed.

The numbers are plain counters and bucket arrays updated on the event loop (no locks: the hot path adds
one batch of tokens at a time, and a batch of k tokens is one weighted observation, which
prometheus_client's own Histogram cannot do); they become metric families only when /metrics is scraped.
Every duration is wall-clock seconds, as vLLM's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from qlmctl.histogram import ITL_BUCKETS, REQUEST_LATENCY_BUCKETS, TTFT_BUCKETS, WeightedHistogram

QUEUE_BUCKETS = TTFT_BUCKETS
"""vLLM uses its request-latency buckets for its queue time (0.3 s and up); a gateway queue that works holds
interactive requests for milliseconds, so the queue wait gets the TTFT bounds (1 ms to 43 min)."""

FINISHED_REASONS = ("stop", "length", "abort", "error")
"""vLLM's `finished_reason` values the gateway reports (a tool call's end counts as `stop`)."""
OUTCOMES = ("slo_met", "slo_missed", "error", "cancelled")


class ClassSeries:
    """The series of one (model, SLO class): a request's relay holds its own, looked up once."""

    __slots__ = ("queue", "ttft", "itl", "tpot", "e2e", "prompt_tokens", "generation_tokens", "success",
                 "outcomes")

    def __init__(self) -> None:
        self.queue = WeightedHistogram(QUEUE_BUCKETS)
        self.ttft = WeightedHistogram(TTFT_BUCKETS)
        self.itl = WeightedHistogram(ITL_BUCKETS)
        self.tpot = WeightedHistogram(ITL_BUCKETS)
        self.e2e = WeightedHistogram(REQUEST_LATENCY_BUCKETS)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.success = dict.fromkeys(FINISHED_REASONS, 0)
        self.outcomes = dict.fromkeys(OUTCOMES, 0)

    def observe_tokens(self, n: int, gap_s: float | None) -> None:
        """`n` output tokens reached the client together, `gap_s` after the previous ones (None: these include
        the answer's first token, whose wait is TTFT, not an inter-token gap)."""
        self.generation_tokens += n
        if gap_s is None:
            if n > 1:
                self.itl.observe(0.0, n - 1)  # arrived with the first token: no gap between them
        elif n > 0:
            self.itl.observe(gap_s / n, n)  # tokens that arrive together share the gap (the sum stays exact)


RequestCounts = Callable[[], dict[tuple[str, str], tuple[int, int]]]
"""(model, SLO class) -> (requests waiting in the gateway, requests on an engine), read at scrape time."""


class RequestMetrics:
    """The `qlm:` families: per (model, SLO class) histograms and counters, request gauges, tokenizer info.

    A collector for a `CollectorRegistry`: `collect()` builds the families from the numbers at scrape time.
    """

    def __init__(self) -> None:
        self._series: dict[tuple[str, str], ClassSeries] = {}
        self._counts: RequestCounts | None = None
        self.tokenizers: dict[str, str] = {}
        """Model -> the prompt token source in use (`qlm:tokenizer_info`), set when the gateway starts."""

    def series(self, model: str, slo_class: str) -> ClassSeries:
        s = self._series.get((model, slo_class))
        if s is None:
            s = self._series[(model, slo_class)] = ClassSeries()
        return s

    def attach(self, counts: RequestCounts) -> None:
        """Export the gauges of waiting and running requests from `counts`."""
        self._counts = counts

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        lab = ["model_name", "slo_class"]
        keys = sorted(self._series)

        def hist(name: str, doc: str, attr: str) -> HistogramMetricFamily:
            m = HistogramMetricFamily(name, doc, labels=lab)
            for k in keys:
                h: WeightedHistogram = getattr(self._series[k], attr)
                m.add_metric(list(k), h.buckets(), h.sum)
            return m

        def counter(name: str, doc: str, attr: str) -> CounterMetricFamily:
            m = CounterMetricFamily(name, doc, labels=lab)
            for k in keys:
                m.add_metric(list(k), getattr(self._series[k], attr))
            return m

        yield hist("qlm:request_queue_time_seconds",
                   "Time a request waited in the gateway's (QLM's) queues before its first dispatch, s.", "queue")
        yield hist("qlm:time_to_first_token_seconds",
                   "Time to first token at the gateway (arrival to the first token sent to the client), s.", "ttft")
        yield hist("qlm:inter_token_latency_seconds",
                   "Gaps between output tokens sent to the client (tokens sent together share the gap), s.", "itl")
        yield hist("qlm:request_time_per_output_token_seconds",
                   "Time per output token of each completed request: (e2e - TTFT) / (output tokens - 1), s.",
                   "tpot")
        yield hist("qlm:e2e_request_latency_seconds",
                   "End-to-end latency of completed requests at the gateway (arrival to last token), s.", "e2e")
        yield counter("qlm:prompt_tokens", "Prompt tokens of requests that reached an engine (the engine's count).",
                      "prompt_tokens")
        yield counter("qlm:generation_tokens", "Output tokens sent to clients.", "generation_tokens")
        m = CounterMetricFamily("qlm:request_success", "Requests ended, by vLLM's finished_reason "
                                "(abort: the client went away; error: the gateway answered an error).",
                                labels=[*lab, "finished_reason"])
        for k in keys:
            for reason, v in self._series[k].success.items():
                m.add_metric([*k, reason], v)
        yield m
        m = CounterMetricFamily("qlm:request_outcome", "Requests ended, by SLO outcome "
                                "(slo_met, slo_missed, error, cancelled): attainment = slo_met / all.",
                                labels=[*lab, "outcome"])
        for k in keys:
            for outcome, v in self._series[k].outcomes.items():
                m.add_metric([*k, outcome], v)
        yield m
        counts = self._counts() if self._counts is not None else {}
        waiting = GaugeMetricFamily("qlm:num_requests_waiting", "Requests waiting in the gateway's queues.",
                                    labels=lab)
        running = GaugeMetricFamily("qlm:num_requests_running", "Requests the gateway has on an engine.", labels=lab)
        for k in sorted(set(counts) | set(keys)):
            w, r = counts.get(k, (0, 0))
            waiting.add_metric(list(k), w)
            running.add_metric(list(k), r)
        yield waiting
        yield running
        info = GaugeMetricFamily("qlm:tokenizer_info", "The source of the gateway's prompt token counts per model "
                                 "(hf:<path>, engine, words).", labels=["model_name", "source"])
        for model, source in sorted(self.tokenizers.items()):
            info.add_metric([model, source], 1.0)
        yield info
