"""A Prometheus histogram kept as plain numbers, and vLLM V1's bucket bounds.

The emulator's and the gateway's /metrics record a batch of k tokens as one observation of weight k,
which prometheus_client's own Histogram cannot do; they keep `WeightedHistogram`s and turn them into
metric families only when scraped.
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client.utils import floatToGoString

# vLLM V1's bucket bounds (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS: tuple[float, ...] = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
    960.0, 1920.0, 7680.0)


def one_two_five_buckets(max_value: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `max_value` (vLLM's token-count histogram buckets)."""
    out: list[float] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return tuple(out)
            out.append(float(m * scale))
        scale *= 10


class WeightedHistogram:
    """Bucket counts, sum and count; `observe(v, n)` adds n observations of v."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect_left(self.bounds, value)] += n
        self.sum += value * n
        self.count += n

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative (le, count) pairs, `+Inf` last, as Prometheus exposes them."""
        out: list[tuple[str, float]] = []
        acc = 0
        for b, c in zip(self.bounds, self.counts):
            acc += c
            out.append((floatToGoString(b), acc))
        out.append(("+Inf", self.count))
        return out
