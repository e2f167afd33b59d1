"""The gateway's prompt token counts (`live.tokenizer`): the engine's /tokenize, a Hugging Face tokenizer off
the event loop, the word count as the fallback; which one is in use is said in /metrics and the log."""

from __future__ import annotations

import sys
import threading
import types

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from qlmctl.emulator.testing import live_scenario_spec, local_emulators
from qlmctl.engines.base import EngineError
from qlmctl.errors import UserError
from qlmctl.gateway.server import Gateway
from qlmctl.gateway.tokenizer import EngineCounter, resolve
from qlmctl.scenario import Scenario, ScenarioSpec
from simulator.profile import EngineProfile

PROFILE = dict(base_s=0.01, per_prefill_token_s=1e-4, per_decode_seq_s=1e-3, per_context_token_s=0.0,
               kv_blocks=1000, block_size=16, max_num_seqs=4, max_num_batched_tokens=1024, max_model_len=2048,
               load_cold_s=1.0, load_warm_s=0.5)
CHAT = [{"role": "system", "content": "w5 w6 w7"}, {"role": "user", "content": "w1 w2"}]


@pytest.fixture(scope="module")
def engine():
    with local_emulators([(EngineProfile(model="m", **PROFILE), "m")], speedup=4) as engines:
        yield engines[0]


def scenario(url: str, **live) -> Scenario:
    return Scenario(ScenarioSpec.model_validate(live_scenario_spec(PROFILE, [("g0", "m", url)], speedup=4, **live)))


async def send(gw: Gateway, c: httpx.AsyncClient) -> tuple[list[int], list[int]]:
    """A completion (twice) and a chat request; (the gateway's prompt counts, the engine's)."""
    engine_counts = []
    for _ in range(2):
        r = await c.post("/v1/completions", json={"model": "m", "prompt": "w1 w2 w3", "max_tokens": 2})
        engine_counts.append(r.json()["usage"]["prompt_tokens"])
    r = await c.post("/v1/chat/completions", json={"model": "m", "messages": CHAT, "max_tokens": 2})
    engine_counts.append(r.json()["usage"]["prompt_tokens"])
    return [rec.prompt_tokens for rec in gw.cluster.records], engine_counts


def tokenizer_info(text: str) -> dict[str, str]:
    return {s.labels["model_name"]: s.labels["source"] for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "qlm:tokenizer_info" and s.value == 1}


@pytest.mark.asyncio
@pytest.mark.parametrize("setting", ["auto", "engine"])
async def test_engine_tokenize_gives_the_engines_own_counts_with_the_chat_template(engine, setting, caplog):
    caplog.set_level("INFO", logger="qlmctl.gateway")
    async with Gateway(scenario(engine.url, tokenizer=setting), "fcfs", port=0) as gw, \
            httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
        ours, theirs = await send(gw, c)
        info = tokenizer_info((await c.get("/metrics")).text)
    assert ours == theirs == [4, 4, 17]  # BOS + 3 words; BOS, 4 per message, 3 for the reply header, 5 words
    assert gw.tokenizers == {"m": "engine"} and info == {"m": "engine"}
    counter = gw.app.counters["m"]
    assert (counter.misses, counter.hits) == (2, 1)  # the repeated prompt came from the cache
    assert "prompt tokens of model m: engine" in caplog.text


@pytest.mark.asyncio
async def test_words_on_request(engine):
    async with Gateway(scenario(engine.url, tokenizer="words"), "fcfs", port=0) as gw, \
            httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
        ours, theirs = await send(gw, c)
        info = tokenizer_info((await c.get("/metrics")).text)
    assert ours == [3, 3, 5] and theirs == [4, 4, 17]  # no BOS, no template
    assert info == {"m": "words"}


class FakeTokenizer:
    """`tokenizers.Tokenizer`'s shape: one token per character, plus a BOS with special tokens."""

    threads: list[int] = []

    @classmethod
    def from_file(cls, path: str) -> "FakeTokenizer":
        return cls()

    def encode(self, text: str, add_special_tokens: bool = True) -> types.SimpleNamespace:
        FakeTokenizer.threads.append(threading.get_ident())
        return types.SimpleNamespace(ids=[0] * (len(text) + (1 if add_special_tokens else 0)))


@pytest.mark.asyncio
async def test_a_tokenizer_file_counts_in_a_worker_thread(engine, tmp_path, monkeypatch):
    (tmp_path / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails: tokenizers is used
    monkeypatch.setitem(sys.modules, "tokenizers", types.SimpleNamespace(Tokenizer=FakeTokenizer))
    FakeTokenizer.threads.clear()
    async with Gateway(scenario(engine.url, tokenizer=str(tmp_path)), "fcfs", port=0) as gw, \
            httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
        ours, _ = await send(gw, c)
    # "w1 w2 w3": 8 characters + BOS. Chat, without a template: 4 per message + 4, around the contents.
    assert ours == [9, 9, (4 + 8) + (4 + 5) + 4]
    assert gw.tokenizers == {"m": f"hf:{tmp_path}"}
    assert FakeTokenizer.threads and threading.get_ident() not in FakeTokenizer.threads  # off the event loop


@pytest.mark.asyncio
async def test_a_tokenizer_path_without_the_library_is_a_clear_error(engine, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(UserError, match="pip install tokenizers"):
        async with Gateway(scenario(engine.url, tokenizer=str(tmp_path)), "fcfs", port=0):
            pass


def test_tokenizer_setting_is_validated(engine):
    with pytest.raises(ValidationError, match="tokenizer must be auto, words, engine"):
        scenario(engine.url, tokenizer="/no/such/tokenizer")
    assert scenario(engine.url, tokenizer="/models/{model}").spec.live.tokenizer == "/models/{model}"


class Failing:
    url = "http://engine"

    async def tokenize(self, body, timeout_s=2.0):
        raise EngineError("POST /tokenize failed: connection refused")


@pytest.mark.asyncio
async def test_engine_failure_counts_by_words_and_explicit_engine_must_work_at_start():
    counter = EngineCounter("m", [Failing()])
    assert await counter.count("w1 w2 w3", 100) == 3 and counter.failures == 1
    with pytest.raises(ValueError, match="POST /tokenize failed"):
        await resolve("engine", "m", [Failing()])
    with pytest.raises(ValueError, match="no engine of model 'm' has POST /tokenize"):
        await resolve("engine", "m", [object()])
    assert (await resolve("auto", "m", [Failing()])).source == "words"  # auto falls back
