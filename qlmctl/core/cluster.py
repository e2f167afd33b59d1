"""The seam between the QLM core and a cluster: what the scheduler sees, and what it may decide.

The simulator backend and the live backend both implement `ClusterView`; policies read it and
return `Decision`s, which the backend carries out on its own clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from qlmctl.core.request import Request
from simulator.profile import EngineProfile


class InstanceView(Protocol):
    """What the scheduler may know of one serving instance (a vLLM engine)."""

    @property
    def instance_id(self) -> int: ...

    @property
    def model(self) -> str | None:
        """The model loaded now (None while nothing is loaded)."""
        ...

    @property
    def swapping(self) -> bool:
        """True while a model swap is under way; the instance serves nothing then."""
        ...

    @property
    def healthy(self) -> bool: ...

    @property
    def profile(self) -> EngineProfile | None:
        """Timing profile of the loaded model on this instance's GPU."""
        ...

    @property
    def num_running(self) -> int:
        """Requests in the engine's running batch."""
        ...

    @property
    def num_waiting(self) -> int:
        """Requests handed to the engine but not yet running (its internal queue)."""
        ...

    @property
    def free_kv_blocks(self) -> int:
        """KV blocks neither used by running requests nor promised to waiting ones."""
        ...

    @property
    def pending_prefill_tokens(self) -> int:
        """Prompt tokens (with any output to recompute) handed to the engine and not prefilled yet: queued
        in it, on their way to it, and what its prefilling requests have left. Under chunked prefill this,
        not batch slots, is what a new request waits behind."""
        ...

    @property
    def scheduling_policy(self) -> str:
        """The engine's own queue discipline: "fcfs" or "priority" (vLLM's --scheduling-policy)."""
        ...

    def running_requests(self) -> Sequence[Request]:
        """Requests dispatched to this instance and not finished (running or engine-waiting)."""
        ...

    def remaining_output_tokens(self) -> int:
        """Output tokens the dispatched requests still have to produce (their max_tokens)."""
        ...

    def profile_for(self, model: str) -> EngineProfile | None:
        """Profile this instance would have with `model` loaded (None if it cannot host it)."""
        ...

    def load_time(self, model: str) -> float:
        """Seconds to swap to `model` (warm if it sleeps in CPU memory here, else cold)."""
        ...


class ClusterView(Protocol):
    """The cluster as the scheduler sees it."""

    @property
    def instances(self) -> Sequence[InstanceView]: ...

    def now(self) -> float: ...

    # Optional (read with getattr, default False): `steps_reported`, True where an instance's state changes
    # only at moments the world reports through `Policy.on_instance_stepped` (the simulator). Live state moves
    # on its own (streams, metrics), so a policy re-reads what it needs on every call there.


@dataclass(slots=True, init=False)  # not frozen: one per request, and a frozen record's __init__ costs 3x
class Dispatch:
    """Hand `request` to instance `instance_id`'s engine now.

    `priority`, on an engine that schedules by priority, is the request's place in the engine's own queue
    and its order for preemption (vLLM's `priority` field: lower first); None leaves the request's own.
    """

    request: Request
    instance_id: int
    priority: int | None = None

    # Written out: the dataclass's generated one would be interpreted code in the compiled build.
    def __init__(self, request: Request, instance_id: int, priority: int | None = None) -> None:
        self.request = request
        self.instance_id = instance_id
        self.priority = priority


@dataclass(frozen=True, slots=True)
class Evict:
    """Preempt `request` on its instance; the backend hands it back via `Policy.on_evicted`."""

    request: Request
    instance_id: int


@dataclass(frozen=True, slots=True)
class SwapModel:
    """Load `model` on instance `instance_id` (it must have nothing running)."""

    instance_id: int
    model: str


@dataclass(frozen=True, slots=True)
class Reject:
    """Refuse `request` now (admission control): it is predicted to miss its SLO. The live gateway answers
    429 with Retry-After; the simulator counts it as rejected."""

    request: Request
    reason: str


Decision = Dispatch | Evict | SwapModel | Reject
