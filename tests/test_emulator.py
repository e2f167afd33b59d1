"""The vLLM emulator over loopback HTTP: wire format, timing, batching, metrics, sleep mode, aborts."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from qlmctl.emulator.server import create_app, start_emulator
from simulator.profile import EngineProfile


def profile(**over) -> EngineProfile:
    # Big fixed step cost so timing is measurable over HTTP; no context term so it is easy to predict.
    fields = dict(model="m", base_s=0.01, per_prefill_token_s=2e-4, per_decode_seq_s=1e-3, per_context_token_s=0.0,
                  kv_blocks=2000, block_size=16, max_num_seqs=8, max_num_batched_tokens=2048, max_model_len=4096,
                  load_cold_s=10.0, load_warm_s=2.0)
    fields.update(over)
    return EngineProfile(**fields)


@pytest.fixture
def emu():
    with start_emulator(profile(), "m", speedup=10) as h:
        yield h


def words(n: int) -> str:
    """A text prompt of n words, w1 .. wn: n + 1 prompt tokens with the BOS token."""
    return " ".join(f"w{i}" for i in range(1, n + 1))


def sse_events(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


def metrics(url: str) -> dict[str, float]:
    """Samples by name, summed over labels (for histograms: _sum and _count too)."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in fam.samples:
            key = s.name if "finished_reason" not in s.labels else f"{s.name}:{s.labels['finished_reason']}"
            out[key] = out.get(key, 0.0) + s.value
    return out


def state(url: str) -> dict:
    return httpx.get(url + "/emulator/state").json()


def wait_for(pred, timeout_s: float = 3.0) -> bool:
    t = time.monotonic() + timeout_s
    while time.monotonic() < t:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def test_stream_yields_exactly_max_tokens_then_done(emu):
    body = {"model": "m", "prompt": words(5), "max_tokens": 7, "stream": True,
            "stream_options": {"include_usage": True}}
    r = httpx.post(emu.url + "/v1/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    ev = sse_events(r.text)
    assert ev[-1] == "[DONE]"
    chunks = [json.loads(e) for e in ev[:-1]]
    toks = [c for c in chunks if c["choices"]]
    assert [c["choices"][0]["text"] for c in toks] == [f" w{6 + j}" for j in range(7)]
    assert [c["choices"][0]["finish_reason"] for c in toks] == [None] * 6 + ["length"]
    assert all(c["object"] == "text_completion" and c["model"] == "m" and c["id"].startswith("cmpl-") for c in toks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": 6, "completion_tokens": 7, "total_tokens": 13}


def test_nonstream_usage_and_token_ids_prompt(emu):
    r = httpx.post(emu.url + "/v1/completions", json={"prompt": [3, 1, 4, 1], "max_tokens": 3})
    assert r.status_code == 200
    d = r.json()
    assert d["object"] == "text_completion"
    assert d["choices"][0]["text"] == " w4 w5 w6" and d["choices"][0]["finish_reason"] == "length"
    assert d["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7,
                          "prompt_tokens_details": None}
    # Default max_tokens is 16, like vLLM.
    assert httpx.post(emu.url + "/v1/completions", json={"prompt": "a b"}).json()["usage"]["completion_tokens"] == 16


def test_chat_stream_and_full(emu):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there you"}]
    r = httpx.post(emu.url + "/v1/chat/completions", json={"messages": msgs, "max_tokens": 3, "stream": True})
    chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    # Llama 3 template: BOS + (4 + 2) + (4 + 3) + 3 = 17 prompt tokens.
    assert [c["choices"][0]["delta"]["content"] for c in chunks[1:]] == [" w17", " w18", " w19"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    d = httpx.post(emu.url + "/v1/chat/completions", json={"messages": msgs, "max_completion_tokens": 2}).json()
    assert d["choices"][0]["message"]["content"] == " w17 w18"
    assert d["usage"]["prompt_tokens"] == 17


def test_ttft_matches_prefill_time():
    p = profile()
    speed = 2.0
    expect = p.prefill_time(1001) / speed  # 0.105 s wall (1000 words + BOS)
    with start_emulator(p, "m", speedup=speed) as h, httpx.Client(base_url=h.url) as c:
        c.get("/health")  # open the connection first
        t0 = time.perf_counter()
        with c.stream("POST", "/v1/completions",
                      json={"prompt": words(1000), "max_tokens": 2, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    ttft = time.perf_counter() - t0
                    break
        m = metrics(h.url)
    assert expect * 0.95 <= ttft <= expect + 0.3  # the upper margin is for busy CI machines
    # The server's own histogram records the model's exact value.
    assert m["vllm:time_to_first_token_seconds_count"] == 1
    assert m["vllm:time_to_first_token_seconds_sum"] == pytest.approx(expect, abs=0.01)


@pytest.mark.asyncio
async def test_concurrent_requests_batch():
    p = profile()
    body = {"prompt": words(10), "max_tokens": 50, "stream": True}
    with start_emulator(p, "m", speedup=10) as h:
        async with httpx.AsyncClient(base_url=h.url) as c:

            async def one() -> float:
                t0 = time.perf_counter()
                r = await c.post("/v1/completions", json=body)
                assert sse_events(r.text)[-1] == "[DONE]"
                assert len(sse_events(r.text)) == 51
                return time.perf_counter() - t0

            single = await one()
            t0 = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(8)))
            together = time.perf_counter() - t0
    # Alone: 50 steps of 11 ms sim = 55 ms wall; 8 batched: 50 steps of 18 ms = 90 ms, not 8 x 55.
    assert single >= 0.05
    assert together < 0.5 * 8 * single


def test_metrics_running_waiting_under_load():
    p = profile(max_num_seqs=4)
    with start_emulator(p, "m", speedup=10) as h:
        m0 = metrics(h.url)
        assert m0["vllm:num_requests_running"] == 0 and m0["vllm:kv_cache_usage_perc"] == 0
        info = [s for f in text_string_to_metric_families(httpx.get(h.url + "/metrics").text)
                if f.name == "vllm:cache_config_info" for s in f.samples]
        assert info[0].labels["num_gpu_blocks"] == "2000" and info[0].labels["block_size"] == "16"

        async def load() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=h.url, timeout=30) as c:
                return await asyncio.gather(*(
                    c.post("/v1/completions", json={"prompt": words(100), "max_tokens": 500}) for _ in range(6)))

        results: list = []
        t = threading.Thread(target=lambda: results.extend(asyncio.run(load())))
        t.start()
        # Submissions join the engine at its next step end: wait until all six are there.
        snap: dict[str, float] = {}

        def full() -> bool:
            snap.update(metrics(h.url))
            return snap["vllm:num_requests_running"] == 4 and snap["vllm:num_requests_waiting"] == 2

        assert wait_for(full), snap
        assert 0 < snap["vllm:kv_cache_usage_perc"] <= 1
        t.join(30)
        assert [r.status_code for r in results] == [200] * 6
        m = metrics(h.url)
    assert m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0
    assert m["vllm:request_success_total:length"] == 6
    assert m["vllm:prompt_tokens_total"] == 606 and m["vllm:generation_tokens_total"] == 3000
    assert m["vllm:e2e_request_latency_seconds_count"] == 6
    assert m["vllm:inter_token_latency_seconds_count"] == 6 * 499
    # Decode steps of 2 to 4 sequences take 12 to 14 ms sim = 1.2 to 1.4 ms wall.
    assert m["vllm:inter_token_latency_seconds_sum"] / (6 * 499) == pytest.approx(0.0013, rel=0.25)


def test_preemption_keeps_streams_exact():
    # 40 blocks = 640 tokens of KV; 3 sequences of 150 + 250 tokens need 75 blocks at the end.
    p = profile(kv_blocks=40, max_model_len=640)
    with start_emulator(p, "m", speedup=20) as h:

        async def run() -> list[str]:
            async with httpx.AsyncClient(base_url=h.url, timeout=30) as c:
                rs = await asyncio.gather(*(
                    c.post("/v1/completions", json={"prompt": words(150), "max_tokens": 250, "stream": True})
                    for _ in range(3)))
                return [r.text for r in rs]

        texts = asyncio.run(run())
        m = metrics(h.url)
    for t in texts:
        toks = [json.loads(e)["choices"][0]["text"] for e in sse_events(t)[:-1]]
        assert toks == [f" w{151 + j}" for j in range(250)]
    assert m["vllm:num_preemptions_total"] >= 1
    assert m["vllm:request_success_total:length"] == 3


def test_sleep_wake_and_is_sleeping():
    p = profile(load_warm_s=2.0)
    with start_emulator(p, "m", speedup=10, sleep_s=3.0) as h, httpx.Client(base_url=h.url, timeout=10) as c:
        assert c.get("/is_sleeping").json() == {"is_sleeping": False}
        t0 = time.perf_counter()
        assert c.post("/sleep", params={"level": 1}).status_code == 200
        assert 0.29 <= time.perf_counter() - t0 < 0.6  # sleep_s / speedup
        assert c.get("/is_sleeping").json() == {"is_sleeping": True}
        assert c.get("/health").status_code == 200
        assert metrics(h.url)["vllm:engine_sleep_state"] == 1
        states = {s.labels["sleep_state"]: s.value for f in text_string_to_metric_families(c.get("/metrics").text)
                  if f.name == "vllm:engine_sleep_state" for s in f.samples}
        assert states == {"awake": 0, "weights_offloaded": 1, "discard_all": 0}
        r = c.post("/v1/completions", json={"prompt": "a b", "max_tokens": 2})
        assert r.status_code == 503 and "wake_up" in r.json()["error"]["message"]
        t0 = time.perf_counter()
        assert c.post("/wake_up").status_code == 200
        assert 0.19 <= time.perf_counter() - t0 < 0.5  # load_warm_s / speedup
        assert c.get("/is_sleeping").json() == {"is_sleeping": False}
        assert c.post("/v1/completions", json={"prompt": "a b", "max_tokens": 2}).status_code == 200


def test_sleep_aborts_requests_in_flight(emu):
    # As vLLM 0.24: /sleep ends running requests with finish_reason "abort" and counts them.
    with httpx.Client(base_url=emu.url, timeout=10) as c:
        with c.stream("POST", "/v1/completions", json={"prompt": "a", "max_tokens": 2000, "stream": True}) as r:
            lines = r.iter_lines()  # keep a reference: a dropped iterator closes the response
            assert next(lines).startswith("data: ")
            assert c.post("/sleep").status_code == 200
            events = [ln[len("data: "):] for ln in lines if ln.startswith("data: ")]
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])["choices"][0]
        assert last["finish_reason"] == "abort"
        assert all(json.loads(e)["choices"][0]["finish_reason"] is None for e in events[:-2])
        m = metrics(emu.url)
        assert m["vllm:request_success_total:abort"] == 1 and m["vllm:num_requests_running"] == 0
        assert state(emu.url)["used_blocks"] == 0


@pytest.mark.asyncio
async def test_nonstream_aborted_by_sleep_and_held_while_asleep():
    with start_emulator(profile(load_warm_s=1.0), "m", speedup=10, sleep_s=0.5, hold_while_asleep=True) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as c:
            long = asyncio.create_task(c.post("/v1/completions", json={"prompt": "a", "max_tokens": 3000}))
            await asyncio.sleep(0.2)
            assert (await c.post("/sleep")).status_code == 200
            d = (await long).json()
            assert d["choices"][0]["finish_reason"] == "abort"
            assert 0 < d["usage"]["completion_tokens"] < 3000
            # Held until /wake_up (vLLM 0.24 queues requests sent to a sleeping engine).
            held = asyncio.create_task(c.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}))
            await asyncio.sleep(0.2)
            assert not held.done()
            assert (await c.post("/wake_up")).status_code == 200
            r = await held
            assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


def test_errors_like_vllm(emu):
    r = httpx.post(emu.url + "/v1/completions", json={"prompt": words(4000), "max_tokens": 100})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "BadRequestError" and err["code"] == 400
    assert err["param"] == "input_tokens"
    assert "maximum context length is 4096 tokens" in err["message"]
    assert "you requested 100 output tokens" in err["message"] and "at least 3997 input tokens" in err["message"]
    r = httpx.post(emu.url + "/v1/completions", json={"prompt": list(range(4000)), "max_tokens": 100})
    assert "your prompt contains 4000 input tokens, for a total of 4100 tokens" in r.json()["error"]["message"]
    r = httpx.post(emu.url + "/v1/completions", json={"prompt": words(5000)})
    assert r.status_code == 400
    r = httpx.post(emu.url + "/v1/completions", json={"model": "x", "prompt": "a"})
    assert r.status_code == 404 and r.json()["error"]["message"] == "The model `x` does not exist."
    r = httpx.post(emu.url + "/v1/completions", json={"prompt": "a", "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    # vLLM 0.24 accepts `priority` under fcfs and ignores it.
    assert httpx.post(emu.url + "/v1/completions", json={"prompt": "a", "priority": 1}).status_code == 200
    r = httpx.post(emu.url + "/v1/completions", content=b"{not json")
    assert r.status_code == 400


def test_models_health_version(emu):
    d = httpx.get(emu.url + "/v1/models").json()
    assert d["object"] == "list" and d["data"][0]["id"] == "m" and d["data"][0]["max_model_len"] == 4096
    assert httpx.get(emu.url + "/health").status_code == 200
    assert "version" in httpx.get(emu.url + "/version").json()


def test_stream_disconnect_aborts(emu):
    with httpx.Client(base_url=emu.url, timeout=10) as c:
        with c.stream("POST", "/v1/completions", json={"prompt": "a b", "max_tokens": 3000, "stream": True}) as r:
            lines = r.iter_lines()  # keep a reference: a dropped iterator closes the response
            assert next(lines).startswith("data: ")
            assert metrics(emu.url)["vllm:num_requests_running"] == 1
            assert state(emu.url)["used_blocks"] > 0
    # Closing the response closes the connection: the sequence leaves the engine.
    assert wait_for(lambda: metrics(emu.url)["vllm:num_requests_running"] == 0)
    st = state(emu.url)
    assert st["aborted"] == 1 and st["in_flight"] == 0 and st["used_blocks"] == 0


@pytest.mark.asyncio
async def test_nonstream_and_queued_disconnect_abort():
    with start_emulator(profile(max_num_seqs=1), "m", speedup=10) as h:
        async with httpx.AsyncClient(base_url=h.url, timeout=10) as c:
            body = {"prompt": "a b", "max_tokens": 3000}
            tasks = [asyncio.create_task(c.post("/v1/completions", json=body)) for _ in range(2)]
            for _ in range(300):
                st = (await c.get("/emulator/state")).json()
                if st["running"] == 1 and st["waiting"] == 1:
                    break
                await asyncio.sleep(0.01)
            assert st["running"] == 1 and st["waiting"] == 1
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for _ in range(300):
                st = (await c.get("/emulator/state")).json()
                if st["in_flight"] == 0 and st["running"] == 0 and st["waiting"] == 0:
                    break
                await asyncio.sleep(0.01)
    assert st["in_flight"] == 0 and st["running"] == 0 and st["waiting"] == 0 and st["aborted"] == 2


def test_openai_client():
    openai = pytest.importorskip("openai")
    with start_emulator(profile(), "m", speedup=20) as h:
        client = openai.OpenAI(base_url=h.url + "/v1", api_key="none", max_retries=0)
        r = client.completions.create(model="m", prompt="w1 w2 w3", max_tokens=4)
        assert r.choices[0].text == " w4 w5 w6 w7" and r.usage.completion_tokens == 4
        stream = client.completions.create(model="m", prompt="w1 w2 w3", max_tokens=4, stream=True,
                                           stream_options={"include_usage": True})
        parts = list(stream)
        assert "".join(p.choices[0].text for p in parts if p.choices) == " w4 w5 w6 w7"
        assert parts[-1].usage.total_tokens == 8
        chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=2, stream=True)
        assert "".join(p.choices[0].delta.content or "" for p in chat) == " w9 w10"
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="m", prompt=words(4090), max_tokens=10)
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="other", prompt="a", max_tokens=1)
        client.close()


@pytest.mark.asyncio
async def test_hundreds_of_streams():
    # A bare asyncio HTTP/1.1 client: httpx would spend more CPU than the server under test.
    p = profile(max_num_seqs=256, base_s=0.02, per_decode_seq_s=1e-5)
    body = json.dumps({"prompt": "a b c", "max_tokens": 40, "stream": True}).encode()
    with start_emulator(p, "m", speedup=10) as h:
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()

        async def one() -> bytes:
            r, w = await asyncio.open_connection(h.host, h.port)
            w.write(head + body)
            data = await r.read()
            w.close()
            return data

        t0 = time.perf_counter()
        replies = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(300))), 30)
        elapsed = time.perf_counter() - t0
        m = metrics(h.url)
    assert all(r.count(b"data: ") == 41 and b"data: [DONE]" in r for r in replies)
    assert m["vllm:request_success_total:length"] == 300 and m["vllm:generation_tokens_total"] == 300 * 40
    assert elapsed < 15


def test_request_id_and_priority_policy():
    with start_emulator(profile(), "m", speedup=20, policy="priority") as h:
        r = httpx.post(h.url + "/v1/completions", json={"prompt": "a", "max_tokens": 1, "priority": 3},
                       headers={"X-Request-Id": "abc"})
        assert r.status_code == 200 and r.json()["id"] == "cmpl-abc"


def test_create_app_rejects_kv_smaller_than_context():
    with pytest.raises(ValueError, match="KV cache"):
        create_app(profile(kv_blocks=10, max_model_len=4096), "m")


@pytest.mark.asyncio
async def test_scheduled_time_is_the_engines_admission():
    from qlmctl.emulator.core import EmulatedEngine

    # One batch slot: the second request is admitted when the first finishes, the first when it arrives.
    eng = EmulatedEngine(profile(max_num_seqs=1), "m", speedup=50)
    try:
        a = eng.submit(10, 5, stream=False)
        b = eng.submit(10, 5, stream=False)
        for req in (a, b):
            while req.finish_s is None:
                await asyncio.wait_for(req.event.wait(), 5.0)
                req.event.clear()
    finally:
        await eng.aclose()
    assert a.scheduled_s == a.arrival_s and b.scheduled_s == a.finish_s
    assert a.scheduled_s < a.first_token_s and b.arrival_s < b.scheduled_s < b.first_token_s


def test_sleep_takes_the_profiles_sleep_s_and_wake_up_its_load_warm_s():
    p = profile(load_warm_s=1.0, sleep_s=4.0)
    with start_emulator(p, "m", speedup=10) as h, httpx.Client(base_url=h.url, timeout=10) as c:
        t0 = time.perf_counter()
        assert c.post("/sleep", params={"level": 1}).status_code == 200
        assert 0.39 <= time.perf_counter() - t0 < 0.7  # sleep_s / speedup
        t0 = time.perf_counter()
        assert c.post("/wake_up").status_code == 200
        assert 0.09 <= time.perf_counter() - t0 < 0.35  # load_warm_s / speedup


def _hold_emulators(port_file: str) -> None:
    """A parent that starts emulators in a process of their own, writes their port, then waits to be killed."""
    from qlmctl.emulator.testing import process_emulators
    with process_emulators([(profile(), "m")]) as emus:
        with open(port_file, "w") as f:
            f.write(str(emus[0].port))
        time.sleep(600)


def test_process_emulators_serve_and_stop_with_their_parent(tmp_path):
    import multiprocessing

    from qlmctl.emulator.testing import process_emulators

    with process_emulators([(profile(), "m"), (profile(model="n"), "n")], speedup=10) as emus:
        assert [e.model for e in emus] == ["m", "n"] and emus[0].port != emus[1].port
        r = httpx.post(emus[1].url + "/v1/completions", json={"model": "n", "prompt": "a b c", "max_tokens": 3},
                       timeout=10)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        url = emus[0].url
    with pytest.raises(httpx.TransportError):  # stopped on exit
        httpx.get(url + "/health", timeout=2)
    # One that cannot start: the error says why.
    with pytest.raises(RuntimeError, match="did not start: ValueError.*KV cache"):
        with process_emulators([(profile(), "m"), (profile(kv_blocks=10), "bad")]):
            pass

    # A parent killed outright (no exit handler runs): its emulators' process sees the pipe close and stops.
    port_file = tmp_path / "port"
    parent = multiprocessing.get_context("spawn").Process(target=_hold_emulators, args=(str(port_file),))
    parent.start()
    deadline = time.monotonic() + 60
    while not (port_file.exists() and port_file.read_text()):
        assert time.monotonic() < deadline and parent.is_alive()
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port_file.read_text()}"
    assert httpx.get(url + "/health", timeout=5).status_code == 200
    parent.kill()
    parent.join()
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(url + "/health", timeout=1)
        except httpx.TransportError:
            break
        assert time.monotonic() < deadline, "the emulators outlived their killed parent"
        time.sleep(0.1)
