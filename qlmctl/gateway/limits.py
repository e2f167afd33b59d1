"""Admission control of the live gateway: queue limits per SLO class (backpressure) and body size.

A request is admitted while fewer than its class's limit wait in the gateway (`live.queue_limits`
per class, else `live.queue_limit`; no limit when neither is set). Beyond it the gateway answers 429
with `Retry-After` and an OpenAI-style body at once, before reading the request into a queue, so a
client flood costs the gateway one small answer per request and no queue memory. Requests already
admitted that go back to their queue (evictions, retries after engine faults) are never refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter

from qlmctl.scenario import LiveSpec


@dataclass(slots=True)
class QueueLimits:
    """Most requests waiting per SLO class; `default` for classes not listed (None: unlimited)."""

    default: int | None = None
    per_class: dict[str, int] = field(default_factory=dict)
    retry_after_s: int = 1

    @classmethod
    def from_live(cls, live: LiveSpec | None) -> "QueueLimits":
        if live is None:
            return cls()
        return cls(live.queue_limit, dict(live.queue_limits), live.retry_after_s)

    def limit(self, slo_class: str) -> int | None:
        return self.per_class.get(slo_class, self.default)

    def full(self, slo_class: str, queued: int) -> bool:
        """Whether a new request of `slo_class` must be refused with `queued` of its class waiting."""
        n = self.per_class.get(slo_class, self.default)
        return n is not None and queued >= n


class AdmissionMetrics:
    """Requests refused before they reached a queue, by SLO class and reason."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.rejected = Counter(
            "qlm_rejected_requests", "Requests answered at once with an error, by reason (queue_full: 429, "
            "draining or unavailable: 503, unauthorized: 401, forbidden: 403, bad_request: 4xx, too_large: 413, "
            "client_bodies: 429 and bodies: 503 for request bodies held).", ["slo_class", "reason"],
            registry=registry)
