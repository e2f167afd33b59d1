"""Shortest job first with known output lengths: an oracle bound, not a deployable policy.

A real server does not know how many tokens a request will generate before it runs; a replayed trace
does (`Request.output_tokens`, the max_tokens sent with ignore_eos). Serving the shortest jobs first
minimises mean completion time for a given amount of work, so this policy bounds what any
length-predicting scheduler could gain on throughput-like metrics. It ignores SLOs entirely, so it
is no bound on SLO attainment: long requests with tight deadlines starve under load.
"""

from __future__ import annotations

from qlmctl.core.request import Request
from qlmctl.policies.baselines import QueuePolicy


class SJFOraclePolicy(QueuePolicy):
    """Shortest job first by the trace's output length (oracle: output lengths known in advance)."""

    name = "sjf-oracle"
    label = "sjf-oracle (oracle)"
    """How tables and figures name it, so that no reader mistakes it for a deployable policy."""

    def key(self, r: Request) -> tuple[float, ...]:
        # Ties (same length) in arrival order, so the order is deterministic and FCFS-fair.
        return (float(r.output_tokens), r.arrival_s)
