"""The live gateway against emulated vLLM engines on loopback: API, SLO parsing, metrics, eviction, swaps, launch."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time

import httpx
import numpy as np
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from qlmctl.emulator.testing import live_scenario_spec, local_emulators
from qlmctl.engines.totals import engine_totals_delta
from qlmctl.engines.vllm import parse_vllm_metrics, parse_vllm_totals
from qlmctl.gateway.launcher import Launcher
from qlmctl.gateway.server import Gateway
from qlmctl.scenario import Scenario, ScenarioSpec, load_scenario
from simulator.profile import EngineProfile

# 11 ms (simulated) per decode step: at speed-up 4 a 200-token answer streams for about half a second.
PROFILE = dict(base_s=0.01, per_prefill_token_s=1e-4, per_decode_seq_s=1e-3, per_context_token_s=0.0,
               kv_blocks=1000, block_size=16, max_num_seqs=4, max_num_batched_tokens=1024, max_model_len=2048,
               load_cold_s=1.0, load_warm_s=0.5)


def profile(model: str) -> EngineProfile:
    return EngineProfile(model=model, **PROFILE)


def scenario(engines: list[tuple[str, str, str]], speedup: float, **live) -> Scenario:
    return Scenario(ScenarioSpec.model_validate(live_scenario_spec(PROFILE, engines, speedup=speedup, **live)))


def words(first: int, n: int) -> str:
    """The emulator's answer of n tokens to a prompt of `first` tokens (as the engine counts them)."""
    return "".join(f" w{first + j}" for j in range(n))


def prompt(n: int) -> str:
    return " ".join(f"w{j}" for j in range(n))


@pytest.fixture(scope="module")
def one_engine():
    with local_emulators([(profile("m"), "m")], speedup=4) as engines:
        yield engines[0]


async def _stream_text(client: httpx.AsyncClient, path: str, body: dict, on_tokens=None,
                       headers: dict | None = None) -> tuple[str, dict | None, list[dict]]:
    """Stream a request; returns (text, usage, chunks). `on_tokens(n)` runs after each chunk with text."""
    text, usage, chunks = "", None, []
    async with client.stream("POST", path, json=body, headers=headers or {}) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            chunks.append(ev)
            if ev.get("usage") and not ev["choices"]:
                usage = ev["usage"]
            for c in ev["choices"]:
                piece = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
                if piece:
                    text += piece
                    if on_tokens is not None:
                        await on_tokens(len(text.split()))
    return text, usage, chunks


# ---------------------------------------------------------------------------------------------------------------
# The OpenAI API


@pytest.mark.asyncio
async def test_openai_client_works_unchanged(one_engine):
    sc = scenario([("g0", "m", one_engine.url)], speedup=4)
    async with Gateway(sc, "qlm", port=0) as gw:
        client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
        models = await client.models.list()
        assert [m.id for m in models.data] == ["m"]

        done = await client.completions.create(model="m", prompt=prompt(5), max_tokens=7)
        assert done.choices[0].text == words(done.usage.prompt_tokens, 7)
        assert done.usage.completion_tokens == 7 and done.usage.prompt_tokens in (5, 6)  # 6: with a BOS token
        assert done.choices[0].finish_reason == "length"

        stream = await client.completions.create(model="m", prompt=prompt(3), max_tokens=6, stream=True,
                                                 stream_options={"include_usage": True})
        pieces, usage, ids = [], None, set()
        async for chunk in stream:
            ids.add(chunk.id)
            if chunk.choices:
                pieces.append(chunk.choices[0].text)
            if chunk.usage is not None:
                usage = chunk.usage
        assert usage is not None and usage.completion_tokens == 6
        assert "".join(pieces) == words(usage.prompt_tokens, 6) and len(ids) == 1

        chat = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": prompt(4)}], max_tokens=5,
            extra_headers={"x-slo-class": "interactive"})
        assert chat.choices[0].message.content == words(chat.usage.prompt_tokens, 5)
        assert chat.choices[0].message.role == "assistant"

        chat_stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": prompt(2)}], max_tokens=4, stream=True,
            stream_options={"include_usage": True})
        chunks = [c async for c in chat_stream]
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert content == words(chunks[-1].usage.prompt_tokens, 4)

        with pytest.raises(openai.BadRequestError) as err:
            await client.completions.create(model="m", prompt="w1", max_tokens=2, extra_body={"slo_class": "gold"})
        assert "unknown SLO class 'gold'" in str(err.value)
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="nope", prompt="w1", max_tokens=2)
        await client.close()

        classes = [(r.slo_class, r.ttft_slo_s) for r in gw.cluster.records]
        assert ("interactive", 5.0) in classes and ("batch", 600.0) in classes  # default: the loosest class


@pytest.mark.asyncio
async def test_slo_from_headers_and_body(one_engine):
    sc = scenario([("g0", "m", one_engine.url)], speedup=4, default_slo_class="interactive")
    async with Gateway(sc, "fcfs", port=0) as gw, httpx.AsyncClient(base_url=gw.url) as c:
        body = {"model": "m", "prompt": "w1 w2", "max_tokens": 2}
        assert (await c.post("/v1/completions", json=body)).status_code == 200
        assert (await c.post("/v1/completions", json=body, headers={"x-slo-class": "batch"})).status_code == 200
        assert (await c.post("/v1/completions", json={**body, "slo_ttft_s": 2.5})).status_code == 200
        r = await c.post("/v1/completions", json=body, headers={"x-slo-ttft-s": "soon"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "slo_ttft_s"
        r = await c.post("/v1/completions", json=body, headers={"x-slo-class": "gold"})
        assert r.status_code == 400
        assert r.json()["error"] == {"message": "unknown SLO class 'gold'; known: interactive, batch",
                                     "type": "BadRequestError", "param": "slo_class", "code": 400}
        r = await c.post("/v1/completions", json={**body, "max_tokens": 5000})
        assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]
        assert (await c.post("/v1/completions", content=b"{not json")).status_code == 400
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/nowhere")).status_code == 404
    got = [(r.slo_class, r.ttft_slo_s) for r in gw.cluster.records]
    assert got == [("interactive", 5.0), ("batch", 600.0), ("custom", 2.5)]


@pytest.mark.asyncio
async def test_metrics_endpoint(one_engine):
    sc = scenario([("g0", "m", one_engine.url)], speedup=4)
    async with Gateway(sc, "qlm", port=0) as gw, httpx.AsyncClient(base_url=gw.url) as c:
        for cls in ("interactive", "batch", "batch"):
            r = await c.post("/v1/completions", json={"model": "m", "prompt": "w1", "max_tokens": 3},
                             headers={"x-slo-class": cls})
            assert r.status_code == 200
        text = (await c.get("/metrics")).text
    samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    met = {k[1]: v for k, v in samples.items() if k[0] == "qlm_requests_total"}
    assert sum(met.values()) == 3
    assert samples[("qlm_slo_met_total", (("slo_class", "batch"),))] == 2
    assert samples[("qlm_time_to_first_token_seconds_count", (("slo_class", "interactive"),))] == 1
    assert samples[("qlm_e2e_request_latency_seconds_count", (("slo_class", "batch"),))] == 2
    assert samples[("qlm_queue_depth", (("slo_class", "interactive"),))] == 0
    assert samples[("qlm_engine_awake", (("instance", "g0"), ("model", "m")))] == 1
    assert samples[("qlm_engine_healthy", (("instance", "g0"), ("model", "m")))] == 1
    assert samples[("qlm_engine_free_kv_blocks", (("instance", "g0"), ("model", "m")))] == PROFILE["kv_blocks"]


def test_vllm_metrics_parser(one_engine):
    m = parse_vllm_metrics(httpx.get(one_engine.url + "/metrics").text)
    assert m.num_gpu_blocks == PROFILE["kv_blocks"] and m.block_size == PROFILE["block_size"]
    assert m.kv_cache_usage == 0.0 and m.num_requests_running == 0
    page = (
        '# HELP vllm:num_requests_running x\n'
        'vllm:num_requests_running{engine="0",model_name="x"} 3.0\n'
        'vllm:num_requests_running{engine="1",model_name="x"} 2.0\n'
        'vllm:num_requests_waiting{model_name="x"} 7.0\n'
        'vllm:gpu_cache_usage_perc{model_name="x"} 0.25\n'
        'vllm:cache_config_info{block_size="32",num_gpu_blocks="1234",cache_dtype="auto"} 1.0\n'
        'vllm:num_requests_running_foo 9\n'
    )
    m = parse_vllm_metrics(page)
    assert (m.num_requests_running, m.num_requests_waiting, m.kv_cache_usage) == (5.0, 7.0, 0.25)
    assert (m.num_gpu_blocks, m.block_size) == (1234, 32)


def test_engine_totals_sum_label_sets_take_both_counter_spellings_and_survive_a_restart():
    page = (
        '# TYPE vllm:request_queue_time_seconds histogram\n'
        'vllm:request_queue_time_seconds_bucket{engine="0",le="0.3",model_name="x"} 2.0\n'
        'vllm:request_queue_time_seconds_bucket{engine="0",le="+Inf",model_name="x"} 3.0\n'
        'vllm:request_queue_time_seconds_count{engine="0",model_name="x"} 3.0\n'
        'vllm:request_queue_time_seconds_sum{engine="0",model_name="x"} 1.5\n'
        'vllm:request_queue_time_seconds_bucket{engine="1",le="0.3",model_name="x"} 1.0\n'
        'vllm:request_queue_time_seconds_bucket{engine="1",le="+Inf",model_name="x"} 1.0\n'
        'vllm:request_queue_time_seconds_count{engine="1",model_name="x"} 1.0\n'
        'vllm:request_queue_time_seconds_sum{engine="1",model_name="x"} 0.1\n'
        'vllm:request_queue_time_seconds_created{engine="1",model_name="x"} 1.7e9\n'
        '# TYPE vllm:iteration_tokens_total histogram\n'
        'vllm:iteration_tokens_total_bucket{le="1.0"} 4.0\n'
        'vllm:iteration_tokens_total_bucket{le="+Inf"} 5.0\n'
        'vllm:iteration_tokens_total_count 5.0\n'
        'vllm:iteration_tokens_total_sum 40.0\n'
        '# TYPE vllm:num_preemptions counter\n'      # typed: the parser's family name loses `_total`
        'vllm:num_preemptions_total{engine="0"} 2.0\n'
        'vllm:num_preemptions_total{engine="1"} 3.0\n'
        'vllm:num_preemptions_created{engine="0"} 1.7e9\n'
        'vllm:prompt_tokens_total 70.0\n'             # untyped: the name keeps it
        'vllm:generation_tokens 9.0\n'
        'vllm:request_prompt_tokens_sum 5.0\n'
    )
    t = parse_vllm_totals(page)
    q = t.histograms["vllm:request_queue_time_seconds"]
    assert (q.count, q.sum, q.buckets) == (4.0, 1.6, {"0.3": 3.0, "+Inf": 4.0})
    assert t.histograms["vllm:iteration_tokens_total"].count == 5.0
    assert t.counters == {"vllm:num_preemptions": 5.0, "vllm:prompt_tokens": 70.0, "vllm:generation_tokens": 9.0}
    assert set(t.histograms) == {"vllm:request_queue_time_seconds", "vllm:iteration_tokens_total"}

    later = parse_vllm_totals(page.replace(' 3.0\n', ' 13.0\n').replace('_sum{engine="0",model_name="x"} 1.5',
                                                                            '_sum{engine="0",model_name="x"} 4.5'))
    d = engine_totals_delta(t, later)
    qd = d["vllm:request_queue_time_seconds"]
    assert (qd["count"], qd["sum"], qd["buckets"]) == (10.0, pytest.approx(3.0), {"0.3": 0.0, "+Inf": 10.0})
    assert qd["mean"] == pytest.approx(0.3)
    assert d["vllm:iteration_tokens_total"] == {"count": 0.0, "sum": 0.0, "mean": None,
                                                "buckets": {"1.0": 0.0, "+Inf": 0.0}}
    assert d["vllm:num_preemptions"] == 10.0 and d["vllm:prompt_tokens"] == 0.0
    # The engine restarted in between (its totals went down): the later totals are the change.
    restarted = engine_totals_delta(later, t)
    assert restarted["vllm:request_queue_time_seconds"]["count"] == 4.0 and restarted["vllm:num_preemptions"] == 5.0
    json.dumps(d, allow_nan=False)


@pytest.mark.asyncio
async def test_loop_lag_is_small_when_idle_and_seen_when_the_loop_is_blocked(one_engine):
    import threading

    from qlmctl.looplag import LoopLagMonitor

    sc = scenario([("g0", "m", one_engine.url)], speedup=4)
    async with Gateway(sc, "fcfs", port=0) as gw, httpx.AsyncClient(base_url=gw.url) as c:
        lag = gw.loop_lag
        # The same monitor on an empty loop of its own, in this process at the same time: the lag any loop
        # here gets from the machine (a busy machine, another test worker, the emulators' threads), against
        # which the gateway's idle lag is judged. Both are read over the same window: the gateway's monitor
        # starts before its server does, so its first sample holds the server's start-up (60-200 ms of
        # one callback on a 2-core machine busy with other work), which is not idle lag and which the
        # reference, started later, never sees.
        ref = LoopLagMonitor()
        ref_sampling, ref_done = threading.Event(), threading.Event()

        async def reference() -> None:
            ref.start()
            while not ref.samples:  # sampling: the window starts after this
                await asyncio.sleep(0.005)
            ref_sampling.set()
            while not ref_done.is_set():
                await asyncio.sleep(0.01)
            await ref.stop()

        th = threading.Thread(target=lambda: asyncio.run(reference()))
        th.start()
        assert await asyncio.to_thread(ref_sampling.wait, 30)
        first = len(lag.samples)
        await asyncio.sleep(0.5)
        window = np.array(lag.samples[first:]) * 1e3
        ref_done.set()
        await asyncio.to_thread(th.join)
        noise_ms = ref.max_s * 1e3  # over a span that covers the gateway's window
        assert len(window) >= 10
        idle = {"p50_ms": float(np.median(window)), "max_ms": float(window.max())}
        assert idle["p50_ms"] < 10 + noise_ms, (idle, noise_ms)
        assert idle["max_ms"] < 150 + 2 * noise_ms, (idle, noise_ms)

        async def hog() -> None:
            time.sleep(0.2)  # blocks the gateway's loop, as a slow callback would

        await asyncio.ensure_future(hog())
        await asyncio.sleep(1.6)  # the 1 s timeline windows of the block and of the quiet after it close
        assert lag.max_s >= 0.15
        assert lag.summary()["gateway_loop_lag_max_ms"] >= 150
        timeline = [v for _, kind, iid, *_, v in gw.cluster.timeline if kind == "loop_lag"]
        assert timeline and all(iid == -1 for _, kind, iid, *_ in gw.cluster.timeline if kind == "loop_lag")
        assert max(timeline) >= 0.15 and min(timeline) < 0.15
        text = (await c.get("/metrics")).text
    samples = {(s.name, s.labels.get("le")): s.value for fam in text_string_to_metric_families(text)
               for s in fam.samples if s.name.startswith("qlm_gateway_event_loop_lag_seconds")}
    count = samples[("qlm_gateway_event_loop_lag_seconds_count", None)]
    assert count >= 30
    assert samples[("qlm_gateway_event_loop_lag_seconds_bucket", "0.1")] <= count - 1  # the blocked wake-up
    assert samples[("qlm_gateway_event_loop_lag_seconds_bucket", "0.01")] >= count / 2  # most are prompt


# ---------------------------------------------------------------------------------------------------------------
# Serving operations


CHAT_CONTINUE_GAP = pytest.mark.xfail(
    reason="the emulator's chat template ignores continue_final_message/add_generation_prompt (vLLM honours "
           "them), so a chat request resumed from its partial answer is 4 prompt tokens off there",
    strict=False)


@pytest.mark.asyncio
@pytest.mark.parametrize("resume", ["continue", "restart"])
@pytest.mark.parametrize("api", ["completions", "chat"])
async def test_forced_eviction_answer_complete_and_exact(one_engine, resume, api, request):
    if api == "chat" and resume == "continue":
        request.applymarker(CHAT_CONTINUE_GAP)
    sc = scenario([("g0", "m", one_engine.url)], speedup=4, resume=resume)
    n_out, evict_at = 120, 20
    async with Gateway(sc, "qlm", port=0) as gw, httpx.AsyncClient(base_url=gw.url) as c:
        evicted = []

        async def maybe_evict(seen: int) -> None:
            if seen >= evict_at and not evicted:
                (lr,) = gw.cluster.instances[0].inflight.values()
                evicted.append(gw.cluster.evict(lr.req.request_id))

        if api == "chat":
            path, body = "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": prompt(10)}]}
        else:
            path, body = "/v1/completions", {"model": "m", "prompt": prompt(10)}
        body.update(max_tokens=n_out, stream=True, stream_options={"include_usage": True})
        text, usage, chunks = await _stream_text(c, path, body, maybe_evict)
        # The forced eviction must not have raced with the end of the answer.
        assert evicted == [True]
    p = usage["prompt_tokens"]  # as the engine counts them (with its BOS and chat template)
    assert text == words(p, n_out)  # every token once, in order, across the two engine attempts
    assert usage == {"prompt_tokens": p, "completion_tokens": n_out, "total_tokens": p + n_out}
    assert len({ch["id"] for ch in chunks}) == 1
    roles = [ch["choices"][0]["delta"].get("role") for ch in chunks if api == "chat" and ch["choices"]]
    assert roles.count("assistant") == (1 if api == "chat" else 0)
    (r,) = gw.cluster.records
    assert r.num_evictions == 1 and r.generated_tokens == n_out and r.error is None
    assert gw.cluster.num_evictions == 1
    assert [t[1] for t in gw.cluster.timeline if t[1] == "evict"] == ["evict"]


@pytest.mark.asyncio
async def test_client_disconnect_aborts_upstream(one_engine):
    sc = scenario([("g0", "m", one_engine.url)], speedup=4)
    async with Gateway(sc, "fcfs", port=0) as gw, httpx.AsyncClient(base_url=gw.url) as c:
        body = {"model": "m", "prompt": "w1", "max_tokens": 1500, "stream": True}
        async with c.stream("POST", "/v1/completions", json=body) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data: "):
                    break  # leave after the first token
        for _ in range(200):
            state = httpx.get(one_engine.url + "/emulator/state").json()
            if gw.cluster.num_active() == 0 and state["in_flight"] == 0:
                break
            await asyncio.sleep(0.01)
        assert gw.cluster.num_active() == 0 and state["in_flight"] == 0
    (r,) = gw.cluster.records
    assert r.error == "client disconnected" and 0 < r.generated_tokens < 1500


@pytest.mark.asyncio
@pytest.mark.parametrize("policy", ["fcfs", "qlm"])
async def test_model_swap_by_sleep_mode(policy):
    """One GPU, two models (one server each, one asleep): requests of both complete; the GPU swapped."""
    with local_emulators([(profile("a"), "a"), (profile("b"), "b")], speedup=8) as (ea, eb):
        sc = scenario([("g0", "a", ea.url), ("g0", "b", eb.url)], speedup=8)
        async with Gateway(sc, policy, port=0) as gw, httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
            assert httpx.get(eb.url + "/is_sleeping").json()["is_sleeping"] is True  # put to sleep at start
            assert gw.cluster.instances[0].model == "a"

            async def ask(model: str, n: int) -> bool:
                r = await c.post("/v1/completions", json={"model": model, "prompt": prompt(3), "max_tokens": n})
                assert r.status_code == 200, r.text
                answer = r.json()
                return answer["choices"][0]["text"] == words(answer["usage"]["prompt_tokens"], n)

            assert await asyncio.gather(*(ask(m, 8 + i) for i, m in enumerate("abab"))) == [True] * 4
            assert gw.cluster.num_swaps >= 1
            assert [t[1] for t in gw.cluster.timeline if t[1] == "swap"]
            asleep = [httpx.get(e.url + "/is_sleeping").json()["is_sleeping"] for e in (ea, eb)]
            assert sorted(asleep) == [False, True]  # exactly one model awake on the GPU
            assert gw.cluster.instances[0].model == ("a" if asleep == [False, True] else "b")
    assert all(r.error is None and r.generated_tokens == r.output_tokens for r in gw.cluster.records)


# ---------------------------------------------------------------------------------------------------------------
# --launch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.asyncio
@pytest.mark.parametrize("sleep_mode", [True, False])
async def test_launch_engines_from_template(tmp_path, sleep_mode):
    """`qlmctl emulate` processes started from the command template; swaps by sleep mode or by restart."""
    prof_file = tmp_path / "p.yaml"
    prof_file.write_text(yaml.safe_dump(PROFILE))
    pa, pb = _free_port(), _free_port()
    spec = live_scenario_spec(PROFILE, [("g0", "a", f"http://127.0.0.1:{pa}"), ("g0", "b", f"http://127.0.0.1:{pb}")],
                              speedup=8)
    spec["live"]["launch"] = {
        "command": f"{{python}} -m qlmctl.cli emulate --profile {prof_file} --model {{model}} --port {{port}} "
                   "--speedup {speedup}",
        "sleep_mode": sleep_mode, "health_timeout_s": 60,
    }
    path = tmp_path / "live.yaml"
    path.write_text(yaml.safe_dump(spec))
    sc = load_scenario(path)
    launcher = Launcher(sc, tmp_path / "logs")
    assert launcher.procs[("g0", "a")].argv[:3] == [sys.executable, "-m", "qlmctl.cli"]
    assert launcher.procs[("g0", "a")].env["VLLM_SERVER_DEV_MODE"] == "1"
    await launcher.start()
    try:
        running = {m for (_, m), p in launcher.procs.items() if p.running}
        assert running == ({"a", "b"} if sleep_mode else {"a"})
        async with Gateway(sc, "qlm", port=0, swap_control=launcher.swap_control()) as gw:
            async with httpx.AsyncClient(base_url=gw.url, timeout=60) as c:
                r = await c.post("/v1/completions", json={"model": "b", "prompt": prompt(2), "max_tokens": 4})
                assert r.status_code == 200
                assert r.json()["choices"][0]["text"] == words(r.json()["usage"]["prompt_tokens"], 4)
            assert gw.cluster.num_swaps == 1
            running = {m for (_, m), p in launcher.procs.items() if p.running}
            assert running == ({"a", "b"} if sleep_mode else {"b"})
    finally:
        procs = [p.proc for p in launcher.procs.values() if p.proc is not None]
        await launcher.stop()
    assert all(p.poll() is not None for p in procs)


# ---------------------------------------------------------------------------------------------------------------
# The HTTP client


def test_dechunk_handles_split_chunks_and_trailers():
    from qlmctl.engines.http import _dechunk

    body = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    assert _dechunk(body) == ([b"hello", b" world"], len(body), True)
    for cut in range(1, len(body)):  # any prefix decodes only whole chunks, and never past the cut
        parts, used, done = _dechunk(body[:cut])
        assert b"".join(parts) == b"hello world"[:len(b"".join(parts))] and used <= cut and not done
    with_trailer = b"3\r\nabc\r\n0\r\nx-t: 1\r\n\r\n"
    assert _dechunk(with_trailer) == ([b"abc"], len(with_trailer), True)


@pytest.mark.asyncio
async def test_pool_reuses_connections_and_drops_abandoned_ones(one_engine):
    from qlmctl.engines.http import Pool

    pool = Pool(one_engine.url, max_idle=8)
    for _ in range(3):
        resp = await pool.request("GET", "/health")
        assert resp.status == 200 and await resp.read() == b""
        assert len(pool._idle) == 1  # one connection, back in the pool after each answer
    body = json.dumps({"model": "m", "prompt": "w1", "max_tokens": 50, "stream": True}).encode()
    resp = await pool.request("POST", "/v1/completions", body, [("content-type", "application/json")])
    async for _ in resp.chunks():
        break  # leave the stream early
    resp.close()
    assert len(pool._idle) == 0  # an abandoned stream's connection is closed, not reused
    resp = await pool.request("GET", "/health")
    assert resp.status == 200
    await resp.read()
    await pool.aclose()


# ---------------------------------------------------------------------------------------------------------------
# The scenario's live section


def test_live_section_is_validated(tmp_path):
    from qlmctl.errors import UserError

    def load(**live) -> None:
        spec = live_scenario_spec(PROFILE, [("g0", "m", "http://127.0.0.1:9")])
        spec["live"].update(live)
        path = tmp_path / "s.yaml"
        path.write_text(yaml.safe_dump(spec))
        load_scenario(path)

    load()
    with pytest.raises(UserError, match="unknown model 'x'"):
        load(engines=[{"instance": "g0", "model": "x", "url": "http://127.0.0.1:9"}])
    with pytest.raises(UserError, match="unknown SLO class 'gold'"):
        load(default_slo_class="gold")
    with pytest.raises(UserError, match="lists model 'm' twice"):
        load(engines=[{"instance": "g0", "model": "m", "url": "http://127.0.0.1:9"}] * 2)
    with pytest.raises(UserError, match="http://host:port"):
        load(engines=[{"instance": "g0", "model": "m", "url": "https://example.com"}])
    with pytest.raises(UserError, match="unknown engine kind 'sglang'; known: vllm"):
        load(engines=[{"instance": "g0", "model": "m", "url": "http://127.0.0.1:9", "kind": "sglang"}])
    with pytest.raises(UserError, match="bad launch command template"):
        load(launch={"command": "vllm serve {modle}"})
        Launcher(load_scenario(tmp_path / "s.yaml"))


@pytest.mark.asyncio
async def test_every_engine_kind_implements_the_engine_seam():
    import inspect

    from qlmctl.engines import ENGINE_KINDS, engine_kind
    from qlmctl.engines.base import EngineServer

    wanted = {name: inspect.iscoroutinefunction(f) for name, f in vars(EngineServer).items()
              if callable(f) and not name.startswith("_")}
    assert {"stream", "metrics", "run_totals", "health", "is_sleeping", "sleep", "wake_up", "aclose"} <= set(wanted)
    for name in ENGINE_KINDS:
        kind = engine_kind(name)
        assert kind.name == name
        server = kind.connect("http://127.0.0.1:9", max_connections=1)
        try:
            assert server.url == "http://127.0.0.1:9"
            for method, is_async in wanted.items():
                assert inspect.iscoroutinefunction(getattr(server, method)) == is_async, (name, method)
            assert await server.health(timeout_s=1.0) is False  # nobody listens: an answer, not an exception
        finally:
            await server.aclose()



# ---------------------------------------------------------------------------------------------------------------
# Non-streamed answers are put together as vLLM's are (logprobs, tool calls), across an eviction


async def _evict_once_at(gw: Gateway, sent: int) -> bool:
    while True:
        for lr in list(gw.cluster.instances[0].inflight.values()):
            if lr.sent >= sent:
                return gw.cluster.evict(lr.req.request_id)
        await asyncio.sleep(0.002)


@pytest.mark.asyncio
@pytest.mark.parametrize("resume", ["continue", "restart"])
async def test_non_streamed_completion_has_the_engines_logprobs_across_an_eviction(one_engine, resume):
    sc = scenario([("g0", "m", one_engine.url)], speedup=4, resume=resume)
    body = {"model": "m", "prompt": prompt(10), "max_tokens": 120, "logprobs": 3}
    async with Gateway(sc, "qlm", port=0) as gw, httpx.AsyncClient(timeout=60) as c:
        direct = (await c.post(one_engine.url + "/v1/completions", json=body)).json()["choices"][0]
        evict = asyncio.ensure_future(_evict_once_at(gw, 30))
        got = (await c.post(gw.url + "/v1/completions", json=body)).json()["choices"][0]
        assert await evict is True
    assert gw.cluster.records[0].num_evictions == 1
    assert got["text"] == direct["text"] and got["finish_reason"] == "length"
    lp, want = got["logprobs"], direct["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert lp == want  # text offsets run on from the resume point, as from one engine


@pytest.mark.asyncio
async def test_non_streamed_chat_has_the_engines_tool_calls_and_logprobs_across_an_eviction(one_engine):
    sc = scenario([("g0", "m", one_engine.url)], speedup=4)  # resume: continue; a tool call restarts and skips
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    body = {"model": "m", "messages": [{"role": "user", "content": prompt(6)}], "max_tokens": 100,
            "logprobs": True, "top_logprobs": 2, "tools": tools, "tool_choice": "auto"}
    async with Gateway(sc, "qlm", port=0) as gw, httpx.AsyncClient(timeout=60) as c:
        direct = (await c.post(one_engine.url + "/v1/chat/completions", json=body)).json()["choices"][0]
        evict = asyncio.ensure_future(_evict_once_at(gw, 30))
        got = (await c.post(gw.url + "/v1/chat/completions", json=body)).json()["choices"][0]
        assert await evict is True
        # Streamed, the client sees the same call in deltas (the id and name once, then the arguments).
        text, usage, chunks = await _stream_text(c, gw.url + "/v1/chat/completions", {**body, "stream": True})
    (call,) = got["message"]["tool_calls"]
    (want,) = direct["message"]["tool_calls"]
    assert call["function"] == want["function"] and call["type"] == "function" and call["id"].startswith("chatcmpl-tool")
    json.loads(call["function"]["arguments"])  # whole, once: not cut or doubled at the eviction
    assert got["message"]["content"] is None and got["finish_reason"] == "tool_calls"
    assert got["logprobs"] == direct["logprobs"] and len(got["logprobs"]["content"]) == 100
    deltas = [tc for ch in chunks if ch["choices"] for tc in ch["choices"][0]["delta"].get("tool_calls") or ()]
    assert "".join(d["function"]["arguments"] for d in deltas) == want["function"]["arguments"]
    assert [d["function"].get("name") for d in deltas if d["function"].get("name")] == ["lookup"]


def test_the_live_clusters_profiles_carry_the_usage_cost_as_the_simulated_gateways_do():
    """The QLM core's estimates live see the API servers the simulated gateway does: with `token_count: usage`
    the profile's `frontend_usage_cpu_per_token_s` is in the cost per token, with `chunks` it is not."""
    from qlmctl.gateway.cluster import LiveCluster
    from qlmctl.policies import make_policy
    from qlmctl.policies.base import PolicyContext
    from tests.conftest import make_scenario

    over = {"frontend_cpu_per_token_s": 1e-4, "frontend_usage_cpu_per_token_s": 2e-5}

    def per_token(token_count: str) -> float:
        kw: dict = dict(instances=1, cluster={"instances": [{"model": "m", "profile_overrides": over}]})
        name = make_scenario(**kw).instance_specs()[0][0]
        sc = make_scenario(**kw, live={"engines": [{"instance": name, "model": "m", "url": "http://127.0.0.1:9"}],
                                       "token_count": token_count})
        cluster = LiveCluster(sc, make_policy("fcfs", PolicyContext.from_scenario(sc)))
        prof = cluster.instances[0].profile_for("m")
        assert prof is not None
        return prof.frontend_cpu_per_token_s

    assert per_token("usage") == pytest.approx(1.2e-4)
    assert per_token("chunks") == pytest.approx(1e-4)
