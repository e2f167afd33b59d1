"""Completions whose prompt is token ids, served in every resume mode: an evicted request resumes from the
engine's returned token ids (vLLM's `return_token_ids`) and its answer is the uninterrupted one."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from qlmctl.emulator.testing import live_scenario_spec, local_emulators
from qlmctl.gateway.server import Gateway
from qlmctl.scenario import Scenario, ScenarioSpec
from simulator.profile import EngineProfile

PROFILE = dict(base_s=0.01, per_prefill_token_s=1e-4, per_decode_seq_s=1e-3, per_context_token_s=0.0,
               kv_blocks=1000, block_size=16, max_num_seqs=4, max_num_batched_tokens=1024, max_model_len=2048,
               load_cold_s=1.0, load_warm_s=0.5)
PROMPT = [11, 12, 13, 14, 15, 16, 17]
N_OUT, EVICT_AT = 120, 25


@pytest.fixture(scope="module")
def engine():
    with local_emulators([(EngineProfile(model="m", **PROFILE), "m")], speedup=4) as engines:
        yield engines[0]


def scenario(url: str, resume: str) -> Scenario:
    return Scenario(ScenarioSpec.model_validate(live_scenario_spec(PROFILE, [("g0", "m", url)], speedup=4,
                                                                   resume=resume)))


def generated(url: str) -> float:
    """The engine's vllm:generation_tokens_total."""
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in fam.samples:
            if s.name == "vllm:generation_tokens_total":
                return s.value
    raise AssertionError("no vllm:generation_tokens_total")


async def evict_once_at(gw: Gateway, sent: int) -> bool:
    while True:
        for lr in list(gw.cluster.instances[0].inflight.values()):
            if lr.sent >= sent:
                return gw.cluster.evict(lr.req.request_id)
        await asyncio.sleep(0.002)


async def stream(c: httpx.AsyncClient, body: dict) -> tuple[str, list[int], list[dict]]:
    text, ids, chunks = "", [], []
    async with c.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                         "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                ev = json.loads(line[6:])
                chunks.append(ev)
                for ch in ev["choices"]:
                    text += ch.get("text") or ""
                    ids += ch.get("token_ids") or []
    return text, ids, chunks


@pytest.mark.asyncio
@pytest.mark.parametrize("resume", ["continue", "restart"])
@pytest.mark.parametrize("streamed", [True, False])
async def test_evicted_token_id_prompt_resumes_from_the_engines_ids(engine, resume, streamed):
    body = {"model": "m", "prompt": PROMPT, "max_tokens": N_OUT}
    async with Gateway(scenario(engine.url, resume), "qlm", port=0) as gw, \
            httpx.AsyncClient(base_url=gw.url, timeout=60) as c:
        direct = (await c.post(engine.url + "/v1/completions", json=body)).json()["choices"][0]["text"]
        before = generated(engine.url)
        evict = asyncio.ensure_future(evict_once_at(gw, EVICT_AT))
        if streamed:
            text, ids, chunks = await stream(c, body)
            assert ids == [] and all(ch["choices"][0].get("token_ids") is None for ch in chunks if ch["choices"])
            usage = chunks[-1]["usage"]
        else:
            r = await c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            text, usage = r.json()["choices"][0]["text"], r.json()["usage"]
            assert "token_ids" not in r.json()["choices"][0]  # the client did not ask for them
        assert await evict is True
        after = generated(engine.url)
    assert text == direct  # the same answer as uninterrupted, each token once
    assert usage["completion_tokens"] == N_OUT and usage["prompt_tokens"] == len(PROMPT)
    (rec,) = gw.cluster.records
    assert rec.num_evictions == 1 and rec.error is None and rec.generated_tokens == N_OUT
    # Resumed from the ids sent, not regenerated: the engine made the answer once, plus the few tokens it had
    # produced beyond what reached the client when the eviction cut the first attempt (a restart: >= N + 25).
    assert N_OUT <= after - before < N_OUT + EVICT_AT


@pytest.mark.asyncio
async def test_client_that_asks_for_token_ids_gets_the_answers_ids_once(engine):
    body = {"model": "m", "prompt": PROMPT, "max_tokens": N_OUT, "return_token_ids": True}
    async with Gateway(scenario(engine.url, "continue"), "qlm", port=0) as gw, \
            httpx.AsyncClient(base_url=gw.url, timeout=60) as c:
        direct = (await c.post(engine.url + "/v1/completions", json=body)).json()["choices"][0]
        evict = asyncio.ensure_future(evict_once_at(gw, EVICT_AT))
        text, ids, chunks = await stream(c, body)
        assert await evict is True
    assert text == direct["text"] and ids == direct["token_ids"] and len(ids) == N_OUT
    prompt_ids = [ch["choices"][0]["prompt_token_ids"] for ch in chunks
                  if ch["choices"] and ch["choices"][0].get("prompt_token_ids") is not None]
    assert prompt_ids == [PROMPT]  # the client's prompt, once; not the resumed attempt's longer one
