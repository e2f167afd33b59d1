"""The driver's rules for decisions (qlmctl/core/driver.py), held against both worlds.

Each case is a scripted policy that makes one kind of awkward decision; it runs once against the simulated
cluster and once against the live gateway in front of emulated engines, and both must end the same way:
the same requests complete or fail, the same swaps happen, the same policy errors are counted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import httpx
import pytest

from qlmctl.backends.sim import SimulatedCluster
from qlmctl.core.cluster import ClusterView, Decision, Dispatch, Evict, SwapModel
from qlmctl.core.request import Request
from qlmctl.emulator.testing import live_scenario_spec, local_emulators
from qlmctl.gateway.server import Gateway
from qlmctl.policies.base import Policy, PolicyContext
from qlmctl.scenario import Scenario, ScenarioSpec
from simulator.profile import EngineProfile

PROFILE = dict(base_s=0.01, per_prefill_token_s=1e-4, per_decode_seq_s=1e-3, per_context_token_s=0.0,
               kv_blocks=1000, block_size=16, max_num_seqs=8, max_num_batched_tokens=1024, max_model_len=2048,
               load_cold_s=0.3, load_warm_s=0.3)
SPEEDUP = 8.0
# Instance 0 ("a") hosts m1 (awake) and m2 (asleep); instance 1 ("b") hosts m2.
ENGINES = [("a", "m1"), ("a", "m2"), ("b", "m2")]


@dataclass
class Outcome:
    """How a run ended, in terms both worlds share."""

    done: dict[str, int] = field(default_factory=dict)
    """Per model: requests that completed."""
    errors: list[str] = field(default_factory=list)
    swaps: int = 0
    evictions: int = 0
    policy_errors: int = 0
    models: list[str | None] = field(default_factory=list)
    """Model of each instance at the end."""


class Scripted(Policy):
    """Queues every request; `script(policy, cluster, now)` decides what to do with them."""

    name: ClassVar[str] = "scripted"
    takes_evictions: ClassVar[bool] = True

    def __init__(self, ctx: PolicyContext, script: Callable[["Scripted", ClusterView, float], list[Decision]]) -> None:
        super().__init__(ctx)
        self.script = script
        self.queue: list[Request] = []
        self.finished: list[Request] = []
        self.changed: list[int] = []
        self.calls: list[float] = []
        self.wake: float | None = None
        self.state: dict[str, object] = {}

    def add_request(self, request: Request, now: float) -> None:
        self.queue.append(request)

    def on_finished(self, request: Request, now: float) -> None:
        self.finished.append(request)

    def on_evicted(self, request: Request, now: float) -> None:
        self.queue.insert(0, request)

    def on_instance_changed(self, instance_id: int) -> None:
        self.changed.append(instance_id)

    def num_queued(self) -> int:
        return len(self.queue)

    def next_wakeup(self, now: float) -> float | None:
        w, self.wake = self.wake, None
        return w

    def schedule(self, cluster: ClusterView) -> list[Decision]:
        now = cluster.now()
        self.calls.append(now)
        return self.script(self, cluster, now)

    def take(self, model: str | None = None) -> list[Request]:
        """Queued requests (of `model`), removed from the queue."""
        got = [r for r in self.queue if model is None or r.model == model]
        self.queue = [r for r in self.queue if r not in got]
        return got


def _scenario() -> Scenario:
    spec = live_scenario_spec(PROFILE, [(i, m, "http://127.0.0.1:1") for i, m in ENGINES], speedup=SPEEDUP)
    return Scenario(ScenarioSpec.model_validate(spec))


def _requests(models: list[str], output_tokens: int) -> list[Request]:
    return [Request(i, 0.0, m, "interactive", 60.0, 8, output_tokens) for i, m in enumerate(models)]


def _outcome(records: list[Request], swaps: int, evictions: int, policy_errors: int,
             models: list[str | None]) -> Outcome:
    out = Outcome(swaps=swaps, evictions=evictions, policy_errors=policy_errors, models=models)
    for r in sorted(records, key=lambda r: r.request_id):
        if r.error is None and r.generated_tokens == r.output_tokens:
            out.done[r.model] = out.done.get(r.model, 0) + 1
        else:
            out.errors.append(r.error or "incomplete")
    return out


def run_sim(policy: Scripted, models: list[str], output_tokens: int) -> Outcome:
    reqs = _requests(models, output_tokens)
    cluster = SimulatedCluster(_scenario(), policy, reqs)
    res = cluster.run()
    return _outcome(res.requests, res.num_swaps, res.num_evictions, res.policy_errors,
                    [i.model for i in cluster.instances])


def run_live(policy: Scripted, models: list[str], output_tokens: int) -> Outcome:
    async def go() -> Outcome:
        profiles = [(EngineProfile(model=m, **PROFILE), m) for _, m in ENGINES]
        with local_emulators(profiles, speedup=SPEEDUP) as emus:
            # Prompt tokens by words, as the simulated world has them (8; the engine's count adds a BOS), and
            # with no /tokenize call before a request queues: requests sent together arrive together.
            spec = live_scenario_spec(PROFILE, [(i, m, e.url) for (i, m), e in zip(ENGINES, emus)], speedup=SPEEDUP,
                                      tokenizer="words")
            sc = Scenario(ScenarioSpec.model_validate(spec))
            async with Gateway(sc, policy, port=0) as gw, httpx.AsyncClient(base_url=gw.url, timeout=60) as c:
                async def ask(m: str) -> None:
                    await c.post("/v1/completions", headers={"x-slo-class": "interactive"},
                                 json={"model": m, "prompt": "w0 w1 w2 w3 w4 w5 w6 w7", "max_tokens": output_tokens,
                                       "ignore_eos": True})

                await asyncio.gather(*(ask(m) for m in models))
                cl = gw.cluster
                return _outcome(list(cl.records), cl.num_swaps, cl.num_evictions, cl.driver.stats.policy_errors,
                                [i.model for i in cl.instances])

    return asyncio.run(go())


WORLDS = {"sim": run_sim, "live": run_live}


def _ctx() -> PolicyContext:
    return PolicyContext.from_scenario(_scenario())


@pytest.fixture(params=list(WORLDS))
def world(request):
    return request.param


def test_dispatch_to_an_instance_serving_another_model_fails_that_request(world):
    def script(p: Scripted, cluster: ClusterView, now: float) -> list[Decision]:
        return [Dispatch(r, 0) for r in p.take()]  # instance 0 serves m1 only

    pol = Scripted(_ctx(), script)
    out = WORLDS[world](pol, ["m1", "m2", "m1"], 4)
    assert out.done == {"m1": 2}
    assert len(out.errors) == 1 and out.errors[0].startswith("policy error: dispatched to an instance serving m1")
    assert out.policy_errors == 1
    assert {r.model for r in pol.finished} == {"m1", "m2"}  # the policy is told the failed one ended


def test_evicting_a_finished_request_is_ignored(world):
    def script(p: Scripted, cluster: ClusterView, now: float) -> list[Decision]:
        out: list[Decision] = [Dispatch(r, 0) for r in p.take("m1")]
        out += [Evict(r, 0) for r in p.finished]  # every request that finished, again and again
        return out

    out = WORLDS[world](Scripted(_ctx(), script), ["m1", "m1"], 4)
    assert out.done == {"m1": 2} and out.errors == []
    assert out.evictions == 0 and out.policy_errors == 0


def test_swap_while_swapping_is_ignored_and_the_policy_is_told_when_it_ends(world):
    def script(p: Scripted, cluster: ClusterView, now: float) -> list[Decision]:
        inst = cluster.instances[0]
        if not p.state.get("asked"):
            p.state["asked"] = True
            return [SwapModel(0, "m2"), SwapModel(0, "m2")]
        if inst.swapping:
            return [SwapModel(0, "m2")]  # again while it is under way
        if inst.model == "m2":
            return [Dispatch(r, 0) for r in p.take("m2")]
        return []

    pol = Scripted(_ctx(), script)
    out = WORLDS[world](pol, ["m2", "m2"], 4)
    assert out.swaps == 1 and out.done == {"m2": 2} and out.policy_errors == 0
    assert out.models[0] == "m2"
    assert pol.changed.count(0) >= 1


def test_swap_to_the_loaded_model_is_a_change_at_once_not_a_swap(world):
    def script(p: Scripted, cluster: ClusterView, now: float) -> list[Decision]:
        if not p.state.get("asked"):
            p.state["asked"] = True
            return [SwapModel(0, "m1")]
        return [Dispatch(r, 0) for r in p.take("m1")]

    pol = Scripted(_ctx(), script)
    out = WORLDS[world](pol, ["m1"], 4)
    assert out.swaps == 0 and out.done == {"m1": 1}
    assert pol.changed[:1] == [0]


def test_swap_with_requests_on_the_instance_waits_for_them(world):
    def script(p: Scripted, cluster: ClusterView, now: float) -> list[Decision]:
        inst = cluster.instances[0]
        if not p.state.get("started"):
            first = p.take("m1")
            if not first:
                return []
            p.state["started"] = True
            p.state["swapping_seen"] = False
            return [*(Dispatch(r, 0) for r in first), SwapModel(0, "m2")]
        p.state["swapping_seen"] = p.state["swapping_seen"] or inst.swapping
        if inst.model == "m2":
            return [Dispatch(r, 0) for r in p.take("m2")]
        return []

    pol = Scripted(_ctx(), script)
    out = WORLDS[world](pol, ["m1", "m1", "m2"], 40)
    assert out.done == {"m1": 2, "m2": 1} and out.errors == [] and out.evictions == 0
    assert out.swaps == 1 and out.models[0] == "m2"
    m1_finish = max(r.finish_s for r in pol.finished if r.model == "m1")
    m2_first = min(r.dispatch_s for r in pol.finished if r.model == "m2")
    assert m2_first >= m1_finish  # the swap waited for the m1 requests to finish


def test_swap_to_a_model_the_instance_cannot_host_is_a_policy_error(world):
    def script(p: Scripted, cluster: ClusterView, now: float) -> list[Decision]:
        return [SwapModel(1, "no-such-model"), *(Dispatch(r, 1) for r in p.take("m2"))]

    out = WORLDS[world](Scripted(_ctx(), script), ["m2"], 4)
    assert out.policy_errors >= 1 and out.swaps == 0 and out.done == {"m2": 1}
    assert out.models[1] == "m2"


def test_a_wakeup_at_now_comes_one_tick_later(world):
    spin_s = 0.2  # scenario seconds during which the policy asks to run again "now" on every call

    def script(p: Scripted, cluster: ClusterView, now: float) -> list[Decision]:
        p.state.setdefault("tick", cluster.resolution_s)  # type: ignore[attr-defined]
        t0 = p.state.setdefault("t0", now)
        if now < t0 + spin_s:  # type: ignore[operator]
            p.wake = now
            return []
        return [Dispatch(r, 0) for r in p.take("m1")]

    pol = Scripted(_ctx(), script)
    out = WORLDS[world](pol, ["m1"], 2)
    assert out.done == {"m1": 1}
    tick = pol.state["tick"]
    spinning = [t for t in pol.calls if t < pol.calls[0] + spin_s]
    # At most one call a tick (plus a few for other events): the loop waited, it did not spin.
    assert 1 <= len(spinning) <= spin_s / tick * 1.01 + 20
