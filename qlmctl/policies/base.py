"""The policy interface: every scheduler, QLM and baselines alike, sees a ClusterView and emits Decisions."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from qlmctl.core.cluster import ClusterView, Decision
from qlmctl.core.request import Request
from simulator.profile import EngineProfile

if TYPE_CHECKING:
    from qlmctl.scenario import Scenario


@dataclass(frozen=True, slots=True)
class SLOClass:
    """What a policy knows of an SLO class."""

    ttft_s: float
    tpot_s: float | None = None
    weight: float = 1.0
    rank: int = 0
    """0 for the tightest TTFT deadline, then 1, ... (ties share a rank)."""


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
    slo_classes: dict[str, SLOClass] = field(default_factory=dict)
    objective: str = "most"
    """"most", "weighted" or "strict" (scheduler.objective)."""
    admission: str = "off"
    """"off" or "reject" (scheduler.admission)."""
    prefill_lookahead_steps: float = 2.0
    realtime: bool = False
    """The clock is the wall clock (the live gateway): time spent in `schedule` delays everything else, so a
    policy with slow work (qlm-lp's solver) does it off the caller's thread."""

    @classmethod
    def from_scenario(cls, scenario: "Scenario", *, realtime: bool = False) -> "PolicyContext":
        """The context a scenario's `scheduler` section and models give, in either world."""
        s = scenario.spec.scheduler
        ttfts = sorted({c.ttft_s for c in scenario.spec.slo_classes.values()})
        classes = {name: SLOClass(c.ttft_s, c.tpot_s, c.weight, ttfts.index(c.ttft_s))
                   for name, c in scenario.spec.slo_classes.items()}
        return cls(
            profiles={m: scenario.profile(m) for m in scenario.models},
            slo_bucket_s=s.slo_bucket_s,
            percentile=s.percentile,
            reschedule_interval_s=s.reschedule_interval_s,
            dispatch_limit=s.dispatch_limit,
            enable_eviction=s.enable_eviction,
            enable_swap=s.enable_swap,
            seed=scenario.spec.seed,
            params=dict(s.params),
            solver=s.solver,
            solver_time_limit_s=s.solver_time_limit_s,
            gurobi=s.gurobi,
            slo_classes=classes,
            objective=s.objective,
            admission=s.admission,
            prefill_lookahead_steps=s.prefill_lookahead_steps,
            realtime=realtime,
        )


class Policy(ABC):
    """A scheduling policy.

    The driver (`qlmctl.core.driver`) calls `add_request` when a request arrives, the `on_*` hooks as
    requests progress, and `schedule` after any change (arrival, completion, swap end, a wake-up the policy
    asked for); it then carries out the returned decisions in order, by the rules its module states. A
    policy never reads a clock of its own.
    """

    name: ClassVar[str]
    label: ClassVar[str | None] = None
    """How tables and figures name the policy, where that differs from `name` (see `display_name`)."""
    engine_policy: ClassVar[str] = "fcfs"
    """Engine-side queue discipline the backend should use ("fcfs" or "priority")."""
    through_gateway: ClassVar[bool] = True
    """Whether the requests reach the engines through `qlmctl serve` (every policy but `direct`): simulated, the
    engines' API servers then carry the gateway's requests' costs (`frontend_usage_cpu_per_token_s`)."""
    takes_evictions: ClassVar[bool] = False
    """Whether the policy emits `Evict` and takes evicted requests back through `on_evicted`. A policy that
    sets it must override `on_evicted`."""
    wakes: ClassVar[bool] = False
    """Whether the class overrides `next_wakeup` (set for each subclass): the driver skips the call otherwise."""

    def __init__(self, ctx: PolicyContext) -> None:
        self.ctx = ctx
        self.stats: Any = None
        """The policy's own counters, a dataclass instance (None: none); `stats_dict` reports them."""

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        cls.wakes = cls.next_wakeup is not Policy.next_wakeup
        if cls.takes_evictions and cls.on_evicted is Policy.on_evicted:
            raise TypeError(f"{cls.__name__} sets takes_evictions but does not override on_evicted")

    @classmethod
    def display_name(cls) -> str:
        return cls.label or cls.name

    def stats_dict(self) -> dict[str, Any]:
        """The policy's counters for summary.json (`policy_stats`)."""
        return asdict(self.stats) if self.stats is not None else {}

    @abstractmethod
    def add_request(self, request: Request, now: float) -> None:
        """A new request has arrived and waits in the policy's queues."""

    def on_first_token(self, request: Request, now: float) -> None:
        """The request produced its first token."""

    def on_finished(self, request: Request, now: float) -> None:
        """The request finished (all output tokens produced)."""

    def on_instance_changed(self, instance_id: int) -> None:
        """An instance's capacity or model changed (swap done, health change)."""

    def on_preempted(self, request: Request, now: float) -> None:
        """The engine preempted `request` (it waits there to resume, as vLLM does): its KV blocks are free again.
        Reported by a world that reports steps (`steps_reported`); live, the engine keeps this to itself."""

    def on_instance_stepped(self, instance_id: int) -> None:
        """The instance's engine moved on: what the view reports of it (running and waiting counts, free KV
        blocks, prefill backlog) may differ from the last look. A world whose instances change only at such
        moments says so (`steps_reported`: the simulator, at each engine event) and calls this every time;
        there, a policy may keep what it read of an instance until told. Live, state moves on its own."""

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

    def queue_groups(self) -> dict[tuple[str, str], int]:
        """Waiting requests per (model, group label) as the policy holds them (for /metrics); policies
        without groups report one group per model."""
        return {}
