"""The one loop that drives a policy, in simulated time and in real time.

A *world* (the simulator backend, the live gateway's cluster) owns a clock, a timer and its instances; the
`Driver` owns what happens between a change and the next wake-up: it passes events to the policy, calls
`schedule`, carries out the decisions by the rules below, and arms the wake-up the policy asks for. The two
worlds differ only in `World`'s methods, as SimPy's `RealtimeEnvironment` differs from `Environment` only in
how it waits.

Rules for decisions, the same in both worlds (tests/test_conformance.py holds both to them):

- `Dispatch` to an instance that does not serve the request's model now (another model, no model, swapping,
  unhealthy) is a policy error: the request fails with an error that says so, the policy is told
  `on_finished`, and `DriverStats.policy_errors` counts it. Nothing is raised and nothing is lost.
- `Dispatch` of a request the world has already ended (its client went away while it was queued) ends it
  there: the policy is told `on_finished`.
- `Evict` of a request that is not on that instance (it finished, failed, or was never there) is ignored; the
  request goes back to the policy through `on_evicted` once the world has stopped it.
- `Evict` from a policy that does not take evictions (`Policy.takes_evictions`) is a policy error, ignored.
- `SwapModel` to a model the instance cannot host is a policy error, ignored.
- `SwapModel` to the model the instance already serves (not swapping): nothing to do; the policy is told
  `on_instance_changed` at once, as it would be after a swap.
- `SwapModel` on an instance that is swapping is ignored: the swap under way finishes and the policy is told.
- `SwapModel` on an instance with requests on it: the instance stops taking dispatches at once (it reports
  `swapping`), lets its requests finish, then loads.
- A wake-up sooner than one clock tick (`World.resolution_s`) from `now` is moved to one tick from now, so a
  policy that asks for "now" (or for a moment just past it, read off a clock that moved on) cannot spin.
- What a rule tells the policy at once (a failed or ended dispatch's `on_finished`, a swap-to-loaded's
  `on_instance_changed`) is a change like any other: the policy is scheduled again one tick later.
- `Dispatch.priority` reaches engines that schedule by priority; others ignore it.
- `Reject`: the policy has taken the request out of its queues; the world ends it as refused (429 with
  Retry-After live, counted as rejected in simulation). The policy is not told again.
- A request an engine failed goes back to the policy as an eviction would (`requeue`); a policy that does
  not take evictions is told it finished and gets it again as a new arrival, in its own order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from qlmctl.core.cluster import ClusterView, Decision, Dispatch, Evict, Reject, SwapModel
from qlmctl.core.request import Request

if TYPE_CHECKING:  # the core names the policy contract; policies import the core, not the other way round
    from qlmctl.policies.base import Policy

log = logging.getLogger("qlmctl.driver")


class World(ClusterView, Protocol):
    """What the driver needs of a world beyond the scheduler's view: its clock tick, timer and operations."""

    @property
    def resolution_s(self) -> float:
        """One tick of the clock, in scenario seconds: the shortest wake-up delay."""
        ...

    def holds(self, request: Request, instance_id: int) -> bool:
        """Whether `request` is on instance `instance_id` now (dispatched there and not ended or evicted)."""
        ...

    def dispatch(self, request: Request, instance_id: int, now: float, priority: int | None) -> bool:
        """Hand `request` to the instance's engine (which serves its model), with `priority` for an engine
        that schedules by priority (None: the request's own); False if the request has ended."""
        ...

    def preempt(self, request: Request, instance_id: int, now: float) -> None:
        """Stop `request` on its instance; the world calls `Driver.evicted` once it has stopped."""
        ...

    def load_model(self, instance_id: int, model: str, now: float) -> None:
        """Begin loading `model` (after the instance drains); the world calls `Driver.instance_changed` at the end."""
        ...

    def fail_request(self, request: Request, error: str, now: float) -> None:
        """End `request` with `error` (the driver tells the policy)."""
        ...

    def reject(self, request: Request, now: float) -> None:
        """End `request` as refused at admission (`request.error` says why)."""
        ...

    def applied(self, now: float) -> None:
        """A batch of decisions has been carried out (the simulator advances the engines it touched)."""
        ...


@dataclass(slots=True)
class DriverStats:
    schedules: int = 0
    """Calls of `Policy.schedule`."""
    decisions: int = 0
    policy_errors: int = 0
    """Decisions the rules refused (see the module docstring)."""


class Driver:
    """Drives one policy against one world: events in, decisions out, the next wake-up armed."""

    def __init__(self, policy: Policy, world: World) -> None:
        self.policy = policy
        self.world = world
        self.stats = DriverStats()
        self._told = False  # a rule told the policy something during this schedule call
        # Events the world reports go straight to the policy: bound once, as they are on the simulator's hot path.
        self.arrived = policy.add_request
        self.first_token = policy.on_first_token
        self.finished = policy.on_finished
        self.instance_changed = policy.on_instance_changed
        self.stepped = policy.on_instance_stepped
        self.evicted = policy.on_evicted
        self.preempted = policy.on_preempted
        # None where the policy keeps the base class's (no wake-ups): a call saved on every event.
        self._next_wakeup = policy.next_wakeup if getattr(policy, "wakes", True) else None

    def requeue(self, request: Request, now: float) -> None:
        """An engine failed `request`'s attempt: it waits in the policy again (see the module docstring)."""
        if self.policy.takes_evictions:
            self.policy.on_evicted(request, now)  # the head of its group
        else:
            self.policy.on_finished(request, now)  # frees its place, then queued again by its own key
            self.policy.add_request(request, now)

    def schedule(self, now: float) -> float | None:
        """Run the policy once at `now`, carry out its decisions; return the wake-up it asks for (None: none)."""
        self.stats.schedules += 1
        self._told = False
        decisions = self.policy.schedule(self.world)
        if decisions:
            self.apply(decisions, now)
        wake = self._next_wakeup(now) if self._next_wakeup is not None else None
        if self._told:
            wake = now if wake is None else min(wake, now)
        if wake is not None:
            tick = now + self.world.resolution_s
            if wake < tick:
                wake = tick
        return wake

    def apply(self, decisions: list[Decision], now: float) -> None:
        world = self.world
        insts = world.instances
        self.stats.decisions += len(decisions)
        for d in decisions:
            if isinstance(d, Dispatch):
                r = d.request
                inst = insts[d.instance_id]
                if inst.model != r.model or inst.swapping or not inst.healthy:
                    state = "swapping" if inst.swapping else ("unhealthy" if not inst.healthy else inst.model)
                    self._policy_error(f"dispatched request {r.request_id} ({r.model}) to instance "
                                       f"{d.instance_id}, which serves {state}")
                    world.fail_request(r, f"policy error: dispatched to an instance serving {state}, not {r.model}", now)
                    self.policy.on_finished(r, now)
                    self._told = True
                    continue
                if not world.dispatch(r, d.instance_id, now, d.priority):
                    self.policy.on_finished(r, now)
                    self._told = True
                    continue
                if r.dispatch_s is None:
                    r.dispatch_s = now
                r.instance_id = d.instance_id
            elif isinstance(d, Evict):
                if not self.policy.takes_evictions:
                    self._policy_error(f"{self.policy.name} evicted request {d.request.request_id} but does not "
                                       "take evicted requests back")
                    continue
                if world.holds(d.request, d.instance_id):
                    world.preempt(d.request, d.instance_id, now)
            elif isinstance(d, Reject):
                r = d.request
                r.rejected = True
                r.error = f"rejected: {d.reason}"
                world.reject(r, now)
            elif isinstance(d, SwapModel):
                inst = insts[d.instance_id]
                if inst.profile_for(d.model) is None:
                    self._policy_error(f"asked instance {d.instance_id} to load {d.model}, which it cannot host")
                elif inst.swapping:
                    continue
                elif inst.model == d.model:
                    self.policy.on_instance_changed(d.instance_id)
                    self._told = True
                else:
                    world.load_model(d.instance_id, d.model, now)
        world.applied(now)

    def _policy_error(self, what: str) -> None:
        self.stats.policy_errors += 1
        log.error("policy %s: %s", self.policy.name, what)
