"""The policy interface: every scheduler, QLM and baselines alike, sees a ClusterView and emits Decisions."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

from qlmctl.core.cluster import ClusterView, Decision
from qlmctl.core.request import Request
from simulator.profile import EngineProfile


@dataclass(slots=True)
class PolicyContext:
    """What a policy is told at construction: scheduler settings and the known models."""

    profiles: dict[str, EngineProfile]
    """Default profile per model (priors for the estimator)."""
    slo_bucket_s: float = 10.0
    percentile: float = 0.9
    reschedule_interval_s: float = 1.0
    dispatch_limit: int = 0
    enable_eviction: bool = True
    enable_swap: bool = True
    seed: int = 0
    params: dict[str, object] = field(default_factory=dict)
    solver: str = "auto"
    solver_time_limit_s: float = 0.5
    gurobi: dict[str, str] | None = None


class Policy(ABC):
    """A scheduling policy.

    The backend calls `add_request` when a request arrives, the `on_*` hooks as requests progress, and
    `schedule` after any change (arrival, completion, swap end, a wake-up the policy asked for); it then
    carries out the returned decisions in order. A policy never reads a clock of its own.
    """

    name: ClassVar[str]
    #: Engine-side queue discipline the backend should use ("fcfs" or "priority").
    engine_policy: ClassVar[str] = "fcfs"

    def __init__(self, ctx: PolicyContext) -> None:
        self.ctx = ctx

    @abstractmethod
    def add_request(self, request: Request, now: float) -> None:
        """A new request has arrived and waits in the policy's queues."""

    def on_first_token(self, request: Request, now: float) -> None:
        """The request produced its first token."""

    def on_finished(self, request: Request, now: float) -> None:
        """The request finished (all output tokens produced)."""

    def on_instance_changed(self, instance_id: int) -> None:
        """An instance's capacity or model changed (swap done, health change, engine preemption)."""

    def on_evicted(self, request: Request, now: float) -> None:
        """An Evict was carried out: the request is back in the policy's hands (head of its queue)."""
        raise NotImplementedError(f"{self.name} does not evict")

    @abstractmethod
    def schedule(self, cluster: ClusterView) -> list[Decision]:
        """Decide what to do now. Must be cheap: it runs after every change."""

    @abstractmethod
    def num_queued(self) -> int:
        """Requests waiting in the policy (not yet dispatched)."""

    def next_wakeup(self, now: float) -> float | None:
        """Time at which `schedule` should run again even if nothing changes (None: no need)."""
        return None

    def queue_depths(self) -> dict[str, int]:
        """Waiting requests per SLO class (for metrics and plots)."""
        return {}
