"""A cluster frozen in one state, as the scheduler sees it: for planning benchmarks and tests that drive a
policy's plan without running engines."""

from __future__ import annotations

from dataclasses import dataclass, field

from qlmctl.core.request import Request
from simulator.profile import EngineProfile


@dataclass
class FrozenInstance:
    """An `InstanceView` whose state is set by hand: what it runs, what is loaded, nothing free."""

    instance_id: int
    model: str | None
    profiles: dict[str, EngineProfile]
    running: list[Request] = field(default_factory=list)
    swapping: bool = False
    healthy: bool = True
    warm: set[str] = field(default_factory=set)
    """Models this instance loads warm (asleep in CPU memory); others load cold."""
    free_kv_blocks: int = 0
    pending_prefill_tokens: int = 0
    scheduling_policy: str = "fcfs"

    @property
    def profile(self) -> EngineProfile | None:
        return None if self.swapping or self.model is None else self.profiles[self.model]

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return 0

    def running_requests(self) -> list[Request]:
        return list(self.running)

    def remaining_output_tokens(self) -> int:
        return sum(r.output_tokens for r in self.running)

    def profile_for(self, model: str) -> EngineProfile | None:
        return self.profiles.get(model)

    def load_time(self, model: str) -> float:
        p = self.profiles[model]
        return p.load_warm_s if model in self.warm else p.load_cold_s


@dataclass
class FrozenCluster:
    """A `ClusterView` of frozen instances at time `t`."""

    instances: list[FrozenInstance]
    t: float = 0.0

    def now(self) -> float:
        return self.t
