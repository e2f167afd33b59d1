"""Bad input, backpressure and security at the live gateway: 4xx with OpenAI-style bodies, and it keeps serving.

Also: 429 with Retry-After past a class's queue limit, 413 past the body limit, the optional API key,
and no secret (Gurobi licence settings, the API key) in logs, /metrics, results or error messages.
"""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest

from qlmctl.client.outcomes import call
from qlmctl.emulator.faults import Faults
from qlmctl.emulator.server import start_emulator
from qlmctl.emulator.testing import live_scenario_spec
from qlmctl.engines.http import Pool
from qlmctl.gateway.server import Gateway
from qlmctl.scenario import Scenario, ScenarioSpec
from simulator.profile import EngineProfile

PROFILE = dict(base_s=0.01, per_prefill_token_s=1e-4, per_decode_seq_s=1e-3, per_context_token_s=0.0,
               kv_blocks=1000, block_size=16, max_num_seqs=4, max_num_batched_tokens=1024, max_model_len=256,
               load_cold_s=1.0, load_warm_s=0.5)
SPEEDUP = 8
GUROBI = {"WLSACCESSID": "acc-5f3e9b1d-secret", "WLSSECRET": "wls-7a1c2e-secret", "LICENSEID": "987654321"}
API_KEY = "sk-qlm-test-4b8e1f"


def scenario(url: str, **live) -> Scenario:
    spec = live_scenario_spec(PROFILE, [("g0", "m", url)], speedup=SPEEDUP, metrics_interval_s=0.1,
                              probe_interval_s=0.1, **live)
    return Scenario(ScenarioSpec.model_validate(spec))


@pytest.fixture(scope="module")
def emu():
    with start_emulator(EngineProfile(model="m", **PROFILE), "m", speedup=SPEEDUP) as e:
        yield e


def assert_openai_error(r: httpx.Response, status: int, param: str | None = "*") -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    if param != "*":
        assert err["param"] == param, err
    return err


LONG_PROMPT = " ".join(f"w{j}" for j in range(300))  # over max_model_len 256

BAD_BODIES: list[tuple[str, bytes | dict, dict, int, str | None]] = [
    # (path, body, headers, status, param)
    ("/v1/completions", b"{not json", {}, 400, None),
    ("/v1/completions", b"", {}, 400, None),
    ("/v1/completions", b"[1, 2]", {}, 400, None),
    ("/v1/completions", b'"a string"', {}, 400, None),
    ("/v1/completions", b"\xff\xfe\x00garbage", {}, 400, None),
    ("/v1/completions", {"model": "m", "prompt": LONG_PROMPT, "max_tokens": 4}, {}, 400, "prompt"),
    ("/v1/completions", {"model": "m", "prompt": "w1", "max_tokens": 5000}, {}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": LONG_PROMPT}]}, {}, 400,
     "messages"),
    ("/v1/completions", {"model": "nope", "prompt": "w1"}, {}, 404, "model"),
    ("/v1/completions", {"model": ["m"], "prompt": "w1"}, {}, 400, "model"),
    ("/v1/completions", {"model": "m", "prompt": "w1"}, {"x-slo-class": "gold"}, 400, "slo_class"),
    ("/v1/completions", {"model": "m", "prompt": "w1", "slo_class": ["batch"]}, {}, 400, "slo_class"),
    ("/v1/completions", {"model": "m", "prompt": "w1", "slo_class": {"a": 1}}, {}, 400, "slo_class"),
    ("/v1/completions", {"model": "m", "prompt": "w1"}, {"x-slo-ttft-s": "soon"}, 400, "slo_ttft_s"),
    ("/v1/completions", {"model": "m", "prompt": "w1"}, {"x-slo-ttft-s": "-3"}, 400, "slo_ttft_s"),
    ("/v1/completions", {"model": "m", "prompt": "w1"}, {"x-slo-ttft-s": "nan"}, 400, "slo_ttft_s"),
    ("/v1/completions", {"model": "m", "prompt": "w1"}, {"x-slo-ttft-s": "inf"}, 400, "slo_ttft_s"),
    ("/v1/completions", {"model": "m", "prompt": "w1", "slo_ttft_s": True}, {}, 400, "slo_ttft_s"),
    ("/v1/completions", {"model": "m", "prompt": "w1", "slo_ttft_s": [1]}, {}, 400, "slo_ttft_s"),
    ("/v1/completions", {"model": "m", "prompt": "w1", "slo_ttft_s": "1e999"}, {}, 400, "slo_ttft_s"),
    ("/v1/completions", {"model": "m", "prompt": "w1", "max_tokens": "8"}, {}, 400, "max_tokens"),
    ("/v1/completions", {"model": "m", "prompt": "w1", "max_tokens": True}, {}, 400, "max_tokens"),
    ("/v1/completions", {"model": "m", "prompt": "w1", "max_tokens": 0}, {}, 400, "max_tokens"),
    ("/v1/completions", {"model": "m", "prompt": "w1", "max_tokens": 2.5}, {}, 400, "max_tokens"),
    ("/v1/completions", {"model": "m", "prompt": "w1", "min_tokens": "x"}, {}, 400, "min_tokens"),
    ("/v1/completions", {"model": "m", "prompt": "w1", "stream": "yes"}, {}, 400, "stream"),
    ("/v1/completions", {"model": "m", "prompt": "w1", "stream": True, "stream_options": 3}, {}, 400,
     "stream_options"),
    ("/v1/completions", {"model": "m", "prompt": "w1", "n": 2}, {}, 400, "n"),
    ("/v1/completions", {"model": "m", "prompt": "w1", "n": "1"}, {}, 400, "n"),
    ("/v1/completions", {"model": "m", "prompt": ["w1", "w2"]}, {}, 400, "prompt"),
    ("/v1/completions", {"model": "m", "prompt": [[1, 2], [3]]}, {}, 400, "prompt"),  # a batch of token-id prompts
    ("/v1/completions", {"model": "m", "prompt": [True, 2]}, {}, 400, "prompt"),
    ("/v1/completions", {"model": "m", "prompt": None}, {}, 400, "prompt"),
    ("/v1/completions", {"model": "m"}, {}, 400, "prompt"),
    ("/v1/chat/completions", {"model": "m", "messages": []}, {}, 400, "messages"),
    ("/v1/chat/completions", {"model": "m", "messages": "hello"}, {}, 400, "messages"),
    ("/v1/chat/completions", {"model": "m", "messages": [1, 2]}, {}, 400, "messages"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"content": "w1"}]}, {}, 400, "messages"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": 5}]}, {}, 400, "messages"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": [{"text": 5}]}]}, {}, 400,
     "messages"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "w1"}],
                              "max_completion_tokens": "many"}, {}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "w1"}],
                              "max_tokens": -1}, {}, 400, "max_tokens"),
]


@pytest.mark.asyncio
async def test_bad_requests_get_4xx_openai_errors_and_the_gateway_keeps_serving(emu):
    async with Gateway(scenario(emu.url), "qlm", port=0) as gw, httpx.AsyncClient(base_url=gw.url) as c:
        for path, body, headers, status, param in BAD_BODIES:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = await c.post(path, content=content, headers={"content-type": "application/json", **headers})
            assert_openai_error(r, status, param)
        r = await c.post("/v1/completions", json={"model": "m", "prompt": "w1 w2", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert (await c.get("/nowhere")).status_code == 404
        assert (await c.delete("/v1/completions")).status_code == 404
        # None of them reached a queue or an engine.
        assert len(gw.cluster.records) == 1 and gw.cluster.num_active() == 0
        assert httpx.get(emu.url + "/emulator/state").json()["in_flight"] == 0


@pytest.mark.asyncio
async def test_body_over_the_limit_is_413(emu):
    async with Gateway(scenario(emu.url, max_body_bytes=1000), "fcfs", port=0) as gw, \
            httpx.AsyncClient(base_url=gw.url) as c:
        r = await c.post("/v1/completions", json={"model": "m", "prompt": "w1 " * 600, "max_tokens": 1})
        assert_openai_error(r, 413)
        assert (await c.post("/v1/completions", json={"model": "m", "prompt": "w1", "max_tokens": 1})).status_code == 200


@pytest.mark.asyncio
async def test_queue_limit_per_class_answers_429_with_retry_after():
    with start_emulator(EngineProfile(model="m", **PROFILE), "m", speedup=SPEEDUP) as e:
        # A hung engine keeps everything dispatched on it; limits count what waits in the gateway.
        sc = scenario(e.url, queue_limit=5, queue_limits={"interactive": 2}, retry_after_s=3,
                      first_token_timeout_s=60, probe_timeout_s=5, unhealthy_after=1000)
        async with Gateway(sc, "fcfs", port=0) as gw:
            await asyncio.to_thread(e.set_faults, Faults(hang_after_s=0))
            pool = Pool(gw.url, max_idle=64)
            body = {"model": "m", "prompt": "w1", "max_tokens": 2}
            loop = asyncio.get_running_loop()

            def send(n: int, cls: str) -> list[asyncio.Future]:
                return [asyncio.ensure_future(call(pool, "/v1/completions", body, {"x-slo-class": cls}))
                        for _ in range(n)]

            waiting = send(PROFILE["max_num_seqs"], "batch")  # dispatched to the engine, where they hang
            end = loop.time() + 10
            while len(gw.cluster.instances[0].inflight) < PROFILE["max_num_seqs"] and loop.time() < end:
                await asyncio.sleep(0.01)
            waiting += send(5, "batch")  # these wait in the gateway
            end = loop.time() + 10
            while gw.cluster.queued_by_class.get("batch", 0) < 5 and loop.time() < end:
                await asyncio.sleep(0.01)
            assert gw.cluster.queued_by_class["batch"] == 5
            over = await call(pool, "/v1/completions", body, {"x-slo-class": "batch"})
            assert over.status == 429 and over.retry_after == "3" and over.error["type"] == "RateLimitError"
            assert "batch" in over.error["message"]
            inter = send(2, "interactive")
            end = loop.time() + 10
            while gw.cluster.queued_by_class.get("interactive", 0) < 2 and loop.time() < end:
                await asyncio.sleep(0.01)
            over = await call(pool, "/v1/completions", body, {"x-slo-class": "interactive"})
            assert over.status == 429  # its own, lower limit
            metrics = (await asyncio.to_thread(httpx.get, gw.url + "/metrics")).text
            assert 'qlm_rejected_requests_total{reason="queue_full",slo_class="batch"} 1.0' in metrics
            # Healed, every admitted request completes.
            await asyncio.to_thread(e.set_faults, Faults())
            outs = await asyncio.gather(*waiting, *inter)
            assert [o.kind for o in outs] == ["completed"] * len(outs)
            await pool.aclose()


@pytest.mark.asyncio
async def test_api_key_required_when_set(emu, monkeypatch):
    monkeypatch.delenv("QLMCTL_API_KEY", raising=False)
    async with Gateway(scenario(emu.url, api_key=API_KEY), "fcfs", port=0) as gw, \
            httpx.AsyncClient(base_url=gw.url) as c:
        body = {"model": "m", "prompt": "w1", "max_tokens": 2}
        err = assert_openai_error(await c.post("/v1/completions", json=body), 401)
        assert err["type"] == "AuthenticationError"
        for bad in (f"Bearer {API_KEY}x", API_KEY, f"bearer {API_KEY}", "Bearer", f"Basic {API_KEY}"):
            r = await c.post("/v1/completions", json=body, headers={"authorization": bad})
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        for path in ("/v1/models", "/metrics", "/openapi.json"):
            assert (await c.get(path)).status_code == 401
        assert (await c.get("/health")).status_code == 200  # open to load balancers
        ok = {"authorization": f"Bearer {API_KEY}"}
        assert (await c.post("/v1/completions", json=body, headers=ok)).status_code == 200
        assert (await c.get("/v1/models", headers=ok)).status_code == 200
        assert API_KEY not in (await c.get("/metrics", headers=ok)).text
    monkeypatch.setenv("QLMCTL_API_KEY", "from-env-1234")
    async with Gateway(scenario(emu.url), "fcfs", port=0) as gw, httpx.AsyncClient(base_url=gw.url) as c:
        assert (await c.get("/v1/models")).status_code == 401
        assert (await c.get("/v1/models", headers={"authorization": "Bearer from-env-1234"})).status_code == 200


BATCH_KEY, FAST_KEY = "sk-batch-only-91c2", "sk-fast-custom-3d7a"


@pytest.mark.asyncio
async def test_each_api_key_may_use_only_its_slo_classes_and_deadlines(emu, monkeypatch):
    monkeypatch.delenv("QLMCTL_API_KEY", raising=False)
    keys = [{"key": BATCH_KEY, "name": "batch-jobs", "slo_classes": ["batch"], "min_ttft_s": 60},
            {"key": FAST_KEY, "slo_classes": ["interactive", "custom"], "min_ttft_s": 1.0,
             "default_slo_class": "interactive"}]
    sc = scenario(emu.url, api_key=API_KEY, api_keys=keys)  # classes: interactive (5 s), batch (600 s)
    async with Gateway(sc, "fcfs", port=0) as gw, httpx.AsyncClient(base_url=gw.url) as c:
        body = {"model": "m", "prompt": "w1", "max_tokens": 2}

        async def post(key: str, **headers: str) -> httpx.Response:
            return await c.post("/v1/completions", json=body, headers={"authorization": f"Bearer {key}", **headers})

        assert (await post(BATCH_KEY)).status_code == 200  # the default class, batch, is its
        assert (await post(BATCH_KEY, **{"x-slo-class": "batch"})).status_code == 200
        err = assert_openai_error(await post(BATCH_KEY, **{"x-slo-class": "interactive"}), 403, "slo_class")
        assert err["type"] == "PermissionDeniedError" and "may use batch" in err["message"]
        for ttft in ("5e-324", "5", "100"):  # its own deadline, however loose: not for this key
            assert_openai_error(await post(BATCH_KEY, **{"x-slo-ttft-s": ttft}), 403, "slo_ttft_s")
        # Tightening its class's deadline is a deadline of its own too.
        assert_openai_error(await post(BATCH_KEY, **{"x-slo-class": "batch", "x-slo-ttft-s": "0.001"}), 403)
        r = await c.post("/v1/completions", json={**body, "slo_ttft_s": 1e-300},
                         headers={"authorization": f"Bearer {BATCH_KEY}"})
        assert_openai_error(r, 403)

        assert (await post(FAST_KEY)).status_code == 200  # its own default: interactive
        assert gw.cluster.records[-1].slo_class == "interactive"
        assert (await post(FAST_KEY, **{"x-slo-ttft-s": "2"})).status_code == 200
        assert gw.cluster.records[-1].slo_class == "custom"
        err = assert_openai_error(await post(FAST_KEY, **{"x-slo-ttft-s": "5e-324"}), 403, "slo_ttft_s")
        assert "tightest TTFT deadline is 1 s" in err["message"]
        assert_openai_error(await post(FAST_KEY, **{"x-slo-class": "batch"}), 403, "slo_class")

        assert (await post(API_KEY, **{"x-slo-ttft-s": "0.01"})).status_code == 200  # live.api_key: no limits
        assert_openai_error(await post("sk-not-a-key-0000"), 401)
        metrics = (await c.get("/metrics", headers={"authorization": f"Bearer {API_KEY}"})).text
        assert 'reason="forbidden"' in metrics
        for secret in (BATCH_KEY, FAST_KEY):
            assert secret not in metrics and secret not in json.dumps(sc.dump()) and secret not in repr(sc.spec)
    assert gw.api_key == API_KEY


def test_api_keys_are_validated(emu):
    from pydantic import ValidationError

    for keys, bad in (([{"key": "short"}], "at least 8"),
                      ([{"key": BATCH_KEY, "slo_classes": ["nope"]}], "unknown SLO class"),
                      ([{"key": BATCH_KEY, "slo_classes": ["interactive"]}], "default SLO class 'batch'"),
                      ([{"key": BATCH_KEY, "min_ttft_s": 1000}], "default SLO class 'batch'"),
                      ([{"key": BATCH_KEY}, {"key": BATCH_KEY}], "twice")):
        with pytest.raises(ValidationError, match=bad):
            scenario(emu.url, api_keys=keys)
    sc = scenario(emu.url, api_keys=[{"key": BATCH_KEY, "slo_classes": ["interactive"],
                                      "default_slo_class": "interactive"}])
    assert Gateway(sc, "fcfs").api_key == BATCH_KEY  # a replay sends the first key when there is no api_key


def test_gateway_binds_loopback_by_default(emu):
    sc = scenario(emu.url)
    assert Gateway(sc, "fcfs").host == "127.0.0.1"


@pytest.mark.asyncio
async def test_no_secret_in_logs_metrics_results_or_errors(emu, tmp_path, caplog):
    from qlmctl.client.replay import save_live
    from qlmctl.gateway.run import run_live
    from qlmctl.workload import build_requests

    spec = live_scenario_spec(PROFILE, [("g0", "m", emu.url)], speedup=SPEEDUP, metrics_interval_s=0.1,
                              api_key=API_KEY, workload={"synthetic": {"rate_rps": 50, "num_requests": 10,
                                                                       "prompt_tokens": 8, "output_tokens": 8},
                                                        "slo_class": {"constant": "interactive"}})
    spec["scheduler"] = {"gurobi": dict(GUROBI)}
    sc = Scenario(ScenarioSpec.model_validate(spec))
    assert API_KEY not in repr(sc.spec) and GUROBI["WLSSECRET"] not in repr(sc.spec)
    caplog.set_level(logging.DEBUG)
    requests, _ = build_requests(sc)
    run = await run_live(sc, "qlm", requests)
    assert sum(r.error is None for r in run.requests) == 10
    out = save_live(run, sc, tmp_path)
    texts = [p.read_bytes().decode(errors="replace") for p in tmp_path.rglob("*") if p.is_file()]
    assert texts
    async with Gateway(sc, "qlm", port=0) as gw, httpx.AsyncClient(base_url=gw.url) as c:
        auth = {"authorization": f"Bearer {API_KEY}"}
        texts.append((await c.get("/metrics", headers=auth)).text)
        texts.append((await c.get("/openapi.json", headers=auth)).text)
        texts.append((await c.post("/v1/completions", json={"model": "m", "prompt": LONG_PROMPT},
                                   headers=auth)).text)
        texts.append((await c.post("/v1/completions", json={"model": "m", "prompt": "w1"})).text)
        texts.append((await c.post("/v1/completions", content=b"{", headers=auth)).text)
        # Engine faults, logged as warnings.
        await asyncio.to_thread(emu.set_faults, Faults(error_rate=1.0))
        try:
            texts.append((await c.post("/v1/completions", json={"model": "m", "prompt": "w1"}, headers=auth)).text)
        finally:
            await asyncio.to_thread(emu.set_faults, Faults())
    texts.append(caplog.text)
    texts.append(json.dumps(sc.dump()))
    for text in texts:
        for secret in (*GUROBI.values(), API_KEY):
            assert secret not in text
    assert out is not None
