"""The gateway's vLLM-style /metrics (`qlm:` names, model_name and slo_class labels) against emulated engines:
the counts and sums scraped match the requests sent."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from qlmctl.emulator.testing import live_scenario_spec, local_emulators
from qlmctl.gateway.server import Gateway
from qlmctl.scenario import Scenario, ScenarioSpec
from simulator.profile import EngineProfile

PROFILE = dict(base_s=0.01, per_prefill_token_s=1e-4, per_decode_seq_s=1e-3, per_context_token_s=0.0,
               kv_blocks=1000, block_size=16, max_num_seqs=2, max_num_batched_tokens=1024, max_model_len=2048,
               load_cold_s=1.0, load_warm_s=0.5)
VLLM_TWINS = ("request_queue_time_seconds", "time_to_first_token_seconds", "inter_token_latency_seconds",
              "request_time_per_output_token_seconds", "e2e_request_latency_seconds", "prompt_tokens",
              "generation_tokens", "request_success")
"""The gateway's `qlm:` families that are vLLM's under another prefix."""


@pytest.fixture(scope="module")
def engine():
    with local_emulators([(EngineProfile(model="m", **PROFILE), "m")], speedup=4) as engines:
        yield engines[0]


def scrape(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.mark.asyncio
async def test_vllm_style_metrics_count_what_was_sent(engine):
    sc = Scenario(ScenarioSpec.model_validate(live_scenario_spec(PROFILE, [("g0", "m", engine.url)], speedup=4)))
    # (class, max_tokens, streamed): more than the engine's 2 slots, so some wait in the gateway's queue.
    plan = [("interactive", 40, True), ("interactive", 25, False), ("interactive", 1, True),
            ("batch", 60, True), ("batch", 30, False), ("batch", 45, True)]
    async with Gateway(sc, "qlm", port=0) as gw, httpx.AsyncClient(base_url=gw.url, timeout=60) as c:
        async def one(cls: str, n: int, stream: bool) -> int:
            body = {"model": "m", "prompt": " ".join(f"w{j}" for j in range(7 + n % 5)), "max_tokens": n}
            if stream:
                body.update(stream=True, stream_options={"include_usage": True})
                usage = None
                async with c.stream("POST", "/v1/completions", json=body, headers={"x-slo-class": cls}) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: {") and '"usage"' in line and '"choices":[]' in line:
                            usage = json.loads(line[6:])["usage"]
                assert usage is not None and usage["completion_tokens"] == n
                return usage["prompt_tokens"]
            r = await c.post("/v1/completions", json=body, headers={"x-slo-class": cls})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == n
            return r.json()["usage"]["prompt_tokens"]

        prompts = await asyncio.gather(*(one(*p) for p in plan))
        samples = scrape((await c.get("/metrics")).text)
    sent: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for (cls, n, _), p in zip(plan, prompts):
        sent[cls]["requests"] += 1
        sent[cls]["output"] += n
        sent[cls]["prompt"] += p
        sent[cls]["gaps"] += n - 1
    for cls, want in sent.items():
        lab = {"model_name": "m", "slo_class": cls}
        k = want["requests"]
        assert value(samples, "qlm:request_success_total", finished_reason="length", **lab) == k
        assert value(samples, "qlm:request_success_total", finished_reason="error", **lab) == 0
        assert sum(value(samples, "qlm:request_outcome_total", outcome=o, **lab)
                   for o in ("slo_met", "slo_missed", "error", "cancelled")) == k
        assert value(samples, "qlm:generation_tokens_total", **lab) == want["output"]
        assert value(samples, "qlm:prompt_tokens_total", **lab) == want["prompt"]  # the engine's counts
        for h in ("request_queue_time_seconds", "time_to_first_token_seconds", "e2e_request_latency_seconds"):
            assert value(samples, f"qlm:{h}_count", **lab) == k, h
        # One TPOT per request of more than one token; one gap per token after the first.
        assert value(samples, "qlm:request_time_per_output_token_seconds_count", **lab) == \
            sum(1 for c, n, _ in plan if c == cls and n > 1)
        assert value(samples, "qlm:inter_token_latency_seconds_count", **lab) == want["gaps"]
        assert value(samples, "qlm:inter_token_latency_seconds_bucket", le="+Inf", **lab) == want["gaps"]
        queue = value(samples, "qlm:request_queue_time_seconds_sum", **lab)
        ttft = value(samples, "qlm:time_to_first_token_seconds_sum", **lab)
        e2e = value(samples, "qlm:e2e_request_latency_seconds_sum", **lab)
        itl = value(samples, "qlm:inter_token_latency_seconds_sum", **lab)
        assert 0 <= queue <= ttft < e2e
        # The gaps of a request add up to its first-to-last-token span: within e2e - TTFT.
        assert 0 < itl <= (e2e - ttft) + 0.05
        assert value(samples, "qlm:num_requests_waiting", **lab) == 0
        assert value(samples, "qlm:num_requests_running", **lab) == 0
    # Six requests on two slots: the later ones waited in the gateway for a slot.
    assert sum(value(samples, "qlm:request_queue_time_seconds_sum", model_name="m", slo_class=c)
               for c in sent) > 0.05
    # The old families are still there.
    assert sum(v for (n, _), v in samples.items() if n == "qlm_requests_total") == len(plan)


@pytest.mark.asyncio
async def test_waiting_and_running_gauges_while_requests_queue(engine):
    sc = Scenario(ScenarioSpec.model_validate(live_scenario_spec(PROFILE, [("g0", "m", engine.url)], speedup=4)))
    async with Gateway(sc, "qlm", port=0) as gw, httpx.AsyncClient(base_url=gw.url, timeout=60) as c:
        body = {"model": "m", "prompt": "w1 w2", "max_tokens": 400}
        tasks = [asyncio.ensure_future(c.post("/v1/completions", json=body, headers={"x-slo-class": "batch"}))
                 for _ in range(5)]
        for _ in range(500):
            if gw.cluster.num_active() == 5 and not any(t.done() for t in tasks):
                break
            await asyncio.sleep(0.01)
        samples = scrape((await c.get("/metrics")).text)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    lab = {"model_name": "m", "slo_class": "batch"}
    waiting = value(samples, "qlm:num_requests_waiting", **lab)
    running = value(samples, "qlm:num_requests_running", **lab)
    assert waiting + running == 5 and running <= 2 and waiting >= 3  # 2 engine slots, no dispatch beyond them


def test_gateway_families_are_vllms_under_the_qlm_prefix(engine):
    vllm = {f.name for f in text_string_to_metric_families(httpx.get(engine.url + "/metrics").text)}
    for name in VLLM_TWINS:
        assert f"vllm:{name}" in vllm, name  # the emulator exports vLLM 0.24's names


def test_weighted_histogram_buckets_are_cumulative():
    from qlmctl.histogram import WeightedHistogram

    h = WeightedHistogram((0.1, 1.0))
    h.observe(0.05, 3)
    h.observe(0.5)
    h.observe(5.0, 2)
    assert h.buckets() == [("0.1", 3), ("1.0", 4), ("+Inf", 6)]
    assert h.count == 6 and h.sum == pytest.approx(0.15 + 0.5 + 10.0)
