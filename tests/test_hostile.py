"""The gateway against careless and hostile clients: half-open connections, slow bodies, too many
connections, big bodies, fields the engines do not know, SLO classes a key may not use.

Emulated engines on loopback threads, a gateway in this test's loop, raw sockets for the clients that
misbehave. Timeouts are short and every wait is for a behaviour (a closed socket, a status), with
bounds far above what it should take, so that the tests hold on a busy machine.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import ExitStack

import httpx
import pytest

from qlmctl.emulator.server import start_emulator
from qlmctl.emulator.testing import live_scenario_spec
from qlmctl.gateway.server import Gateway
from qlmctl.scenario import Scenario, ScenarioSpec
from simulator.profile import EngineProfile

PROFILE = dict(base_s=0.01, per_prefill_token_s=1e-4, per_decode_seq_s=1e-3, per_context_token_s=0.0,
               kv_blocks=2000, block_size=16, max_num_seqs=8, max_num_batched_tokens=2048, max_model_len=2048,
               load_cold_s=1.0, load_warm_s=0.5)
SPEEDUP = 4


def scenario(urls: list[str], **live) -> Scenario:
    spec = live_scenario_spec(PROFILE, [(f"g{i}", "m", u) for i, u in enumerate(urls)], speedup=SPEEDUP,
                              metrics_interval_s=0.1, **live)
    return Scenario(ScenarioSpec.model_validate(spec))


def emulators(stack: ExitStack, n: int) -> list:
    prof = EngineProfile(model="m", **PROFILE)
    return [stack.enter_context(start_emulator(prof, "m", speedup=SPEEDUP)) for _ in range(n)]


async def closed_by_peer(reader: asyncio.StreamReader, timeout_s: float) -> bytes | None:
    """What the server sent before closing the connection; None if it is still open after `timeout_s`."""
    data = b""
    try:
        async with asyncio.timeout(timeout_s):
            while chunk := await reader.read(65536):
                data += chunk
    except TimeoutError:
        return None
    except ConnectionError:
        pass
    return data


async def connect(gw: Gateway):
    return await asyncio.open_connection("127.0.0.1", gw.port)


def completion(client: httpx.AsyncClient, **kw):
    body = {"model": "m", "prompt": "w1 w2 w3", "max_tokens": 4, **kw}
    return client.post("/v1/completions", json=body)


# ---------------------------------------------------------------------------------------------------------------
# connections


@pytest.mark.asyncio
async def test_half_open_connections_are_closed_at_the_header_timeout():
    with ExitStack() as stack:
        (e0,) = emulators(stack, 1)
        async with Gateway(scenario([e0.url], header_timeout_s=0.5), "fcfs", port=0) as gw:
            silent = [await connect(gw) for _ in range(5)]
            partial = [await connect(gw) for _ in range(5)]
            for _, w in partial:
                w.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-le")
            got = await asyncio.gather(*(closed_by_peer(r, 20) for r, _ in silent + partial))
            assert all(g is not None for g in got), "a half-open connection was left open"
            assert all(g == b"" for g in got[:5])  # nothing sent: closed without an answer
            assert all(g.startswith(b"HTTP/1.1 408 ") and b"connection: close" in g for g in got[5:])
            assert gw.connections.closed["header_timeout"] == 10 and gw.connections.open == 0
            for _, w in silent + partial:
                w.close()
            async with httpx.AsyncClient(base_url=gw.url) as c:
                assert (await completion(c)).status_code == 200


@pytest.mark.asyncio
async def test_slow_body_gets_408_and_the_connection_is_closed():
    with ExitStack() as stack:
        (e0,) = emulators(stack, 1)
        async with Gateway(scenario([e0.url], body_timeout_s=0.5), "fcfs", port=0) as gw:
            r, w = await connect(gw)
            w.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                    b"content-length: 100\r\n\r\n{\"model\": ")
            got = await closed_by_peer(r, 20)
            assert got is not None and got.startswith(b"HTTP/1.1 408 "), got
            assert gw.connections.closed["body_timeout"] == 1
            assert gw.cluster.num_active() == 0
            w.close()


@pytest.mark.asyncio
async def test_kept_alive_connection_is_closed_when_idle_and_may_not_dribble_its_next_request():
    with ExitStack() as stack:
        (e0,) = emulators(stack, 1)
        async with Gateway(scenario([e0.url], idle_timeout_s=0.5, header_timeout_s=0.5), "fcfs", port=0) as gw:
            r, w = await connect(gw)
            w.write(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            head = await r.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            assert await closed_by_peer(r, 20) is not None  # idle after its answer: closed
            assert gw.connections.closed["idle_timeout"] == 1
            w.close()
            # One byte of a next request does not keep a connection for ever (uvicorn's keep-alive timer
            # stops at the first byte): the header timeout takes over.
            r, w = await connect(gw)
            w.write(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\nG")
            await r.readuntil(b"\r\n\r\n")
            assert await closed_by_peer(r, 20) is not None
            assert gw.connections.closed["header_timeout"] == 1
            w.close()


@pytest.mark.asyncio
async def test_at_the_connection_limit_new_clients_displace_half_open_ones(caplog):
    caplog.set_level(logging.WARNING, logger="qlmctl.gateway")
    with ExitStack() as stack:
        (e0,) = emulators(stack, 1)
        async with Gateway(scenario([e0.url], max_client_connections=20, header_timeout_s=30, log_interval_s=0.2),
                           "fcfs", port=0) as gw:
            assert gw.connections.max_connections == 20
            hostile = [await connect(gw) for _ in range(60)]
            for _, w in hostile:
                w.write(b"GET /health HTTP/1.1\r\n")
            await asyncio.sleep(0.2)
            assert gw.connections.open <= 20
            async with httpx.AsyncClient(base_url=gw.url, limits=httpx.Limits(max_keepalive_connections=0)) as c:
                assert (await c.get("/health")).status_code == 200
                outs = await asyncio.gather(*(completion(c) for _ in range(10)))
                assert [o.status_code for o in outs] == [200] * 10
            # The oldest half-open ones were closed to admit the others; the rest wait for their timeout.
            got = await asyncio.gather(*(closed_by_peer(r, 0.5) for r, _ in hostile[:40]))
            assert all(g is not None for g in got)
            assert gw.connections.closed["displaced"] >= 40 and gw.connections.open <= 20
            await asyncio.sleep(0.5)
            for _, w in hostile:
                w.close()
            lines = [r for r in caplog.records if "client connections in the last" in r.getMessage()]
            assert 1 <= len(lines) <= 10  # one line of totals per interval, not one per connection
            assert "displaced" not in lines[0].getMessage() and "half-open" in lines[0].getMessage()


@pytest.mark.asyncio
async def test_when_every_connection_is_busy_a_new_one_gets_503():
    with ExitStack() as stack:
        (e0,) = emulators(stack, 1)
        async with Gateway(scenario([e0.url], max_client_connections=2), "fcfs", port=0) as gw:
            async with httpx.AsyncClient(base_url=gw.url, timeout=60) as c:
                long = [asyncio.ensure_future(completion(c, max_tokens=1500)) for _ in range(2)]
                while len(gw.cluster.instances[0].inflight) < 2:
                    await asyncio.sleep(0.02)
                r, w = await connect(gw)
                got = await closed_by_peer(r, 20)
                assert got is not None and got.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in got
                assert gw.connections.closed["refused"] == 1
                w.close()
                assert [o.status_code for o in await asyncio.gather(*long)] == [200, 200]


@pytest.mark.asyncio
async def test_out_of_file_descriptors_is_not_an_engine_fault(monkeypatch):
    import errno

    import qlmctl.engines.http as http

    with ExitStack() as stack:
        e0, e1 = emulators(stack, 2)
        async with Gateway(scenario([e0.url, e1.url], unhealthy_after=1), "qlm", port=0) as gw:
            async def emfile(*a, **k):
                raise OSError(errno.EMFILE, "Too many open files")

            monkeypatch.setattr(http.asyncio, "open_connection", emfile)
            for inst in gw.cluster.instances:
                inst.engines["m"].server._pool._idle.clear()  # every request and poll needs a new connection
            async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
                r = await completion(c)
                assert r.status_code == 503 and "out of resources" in r.json()["error"]["message"]
                await asyncio.sleep(0.5)  # several /metrics polls fail the same way
                assert all(inst.healthy for inst in gw.cluster.instances)
                assert (await c.get("/health")).status_code == 200
                monkeypatch.undo()
                assert (await completion(c)).status_code == 200
            text = gw.metrics.render().decode()
            assert "qlm_engine_failures_total{" not in text and 'healthy="0"' not in text


# ---------------------------------------------------------------------------------------------------------------
# bodies: what the gateway holds, what it forwards, what counting them costs


def long_prompt(n_words: int, width: int = 30) -> str:
    """n words of `width` characters each (few tokens, many bytes)."""
    return " ".join("w" + str(j).rjust(width - 1, "0") for j in range(n_words))


@pytest.mark.asyncio
async def test_bodies_in_flight_are_bounded_in_total_and_per_client():
    body = {"model": "m", "prompt": long_prompt(300), "max_tokens": 1500}  # ~9 KB, held as ~18 KB
    with ExitStack() as stack:
        (e0,) = emulators(stack, 1)
        sc = scenario([e0.url], max_body_bytes=16_000, max_client_body_bytes_in_flight=40_000,
                      max_body_bytes_in_flight=60_000)
        async with Gateway(sc, "fcfs", port=0) as gw:
            budget = gw.app.bodies
            one = httpx.AsyncClient(base_url=gw.url, timeout=60)
            other = httpx.AsyncClient(base_url=gw.url, timeout=60,
                                      transport=httpx.AsyncHTTPTransport(local_address="127.0.0.2"))
            async with one, other:
                held = [asyncio.ensure_future(one.post("/v1/completions", json=body)) for _ in range(2)]
                while gw.cluster.num_active() < 2:
                    await asyncio.sleep(0.01)
                assert 36_000 <= budget.held <= 40_000 and set(budget.by_client) == {"127.0.0.1"}
                r = await one.post("/v1/completions", json=body)  # its client's share is taken
                assert r.status_code == 429 and r.headers["retry-after"] == "1" and "this client" in r.text
                held.append(asyncio.ensure_future(other.post("/v1/completions", json=body)))
                while gw.cluster.num_active() < 3:
                    await asyncio.sleep(0.01)
                r = await other.post("/v1/completions", json=body)  # the gateway's total is taken
                assert r.status_code == 503 and r.headers["retry-after"] == "1"
                r = await one.post("/v1/completions", json={**body, "prompt": long_prompt(600)})
                assert r.status_code == 413 and r.headers["connection"] == "close"  # over max_body_bytes
                assert [x.status_code for x in await asyncio.gather(*held)] == [200] * 3
            assert budget.held == 0 and budget.by_client == {}
            assert budget.peak <= 60_000


@pytest.mark.asyncio
async def test_only_the_engines_fields_are_forwarded_and_the_client_is_told(monkeypatch):
    from qlmctl.engines.openai import OpenAIServer

    sent: list[dict] = []
    real = OpenAIServer.stream

    def spy(self, api, body):
        sent.append(dict(body))
        return real(self, api, body)

    monkeypatch.setattr(OpenAIServer, "stream", spy)
    with ExitStack() as stack:
        (e0,) = emulators(stack, 1)
        async with Gateway(scenario([e0.url], forward_fields=["my_extension"]), "fcfs", port=0) as gw:
            async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
                r = await completion(c, temperature=0, ignore_eos=True, stop=["x"], junk="y" * 100_000,
                                     priority=-5, request_id="mine", my_extension={"a": 1}, slo_class="batch")
                assert r.status_code == 200
                assert r.headers["x-qlm-ignored-fields"] == "junk, priority, request_id"
                r = await completion(c, stream=True)
                assert r.status_code == 200 and "x-qlm-ignored-fields" not in r.headers
                msgs = [{"role": "user", "content": "w1"}]
                r = await c.post("/v1/chat/completions", json={"model": "m", "messages": msgs, "max_tokens": 2,
                                                               "chat_template_kwargs": {}, "prompt": "not chat"})
                assert r.status_code == 200 and r.headers["x-qlm-ignored-fields"] == "prompt"
    first = sent[0]
    assert {"temperature", "ignore_eos", "stop", "my_extension"} <= set(first)
    assert not {"junk", "priority", "request_id", "slo_class"} & set(first)
    assert "chat_template_kwargs" in sent[-1] and "prompt" not in sent[-1]


@pytest.mark.asyncio
async def test_counting_a_long_prompt_is_bounded_and_lets_other_work_run():
    from qlmctl.gateway.tokens import MAX_CHARS_PER_TOKEN, SLICE_CHARS, count_tokens, estimate_tokens

    import random

    rng = random.Random(1)
    for _ in range(50):  # the sliced count is the plain count, wherever the slices cut words
        text = "".join(rng.choice(["w1", " ", "  ", "abc", "\n", "x" * 40]) for _ in range(rng.randint(0, 60_000)))
        assert await count_tokens(text, 10**9) == estimate_tokens(text)
    assert estimate_tokens("x" * 3200) == 3200 // MAX_CHARS_PER_TOKEN  # one long "word" is many tokens

    ticks = 0
    stop = False

    async def ticker():
        nonlocal ticks
        while not stop:
            ticks += 1
            await asyncio.sleep(0)

    t = asyncio.ensure_future(ticker())
    await asyncio.sleep(0)
    few_words = (" " * 30 + "w") * (200 * SLICE_CHARS // 31)  # 200 slices to count, few tokens
    assert await count_tokens(few_words, 10**9) == estimate_tokens(few_words)
    assert ticks >= 100  # other tasks ran between the slices
    many = "w1 " * 5_000_000
    assert await count_tokens(many, 4096) >= 4096  # stops at the limit: no need to count 5 M words
    huge = "x" * (4096 * MAX_CHARS_PER_TOKEN)
    assert await count_tokens(huge, 4096) >= 4096  # over the limit by its length alone
    stop = True
    await t


@pytest.mark.asyncio
async def test_a_huge_prompt_is_refused_without_pausing_other_streams():
    with ExitStack() as stack:
        (e0,) = emulators(stack, 1)
        async with Gateway(scenario([e0.url]), "fcfs", port=0) as gw, httpx.AsyncClient(base_url=gw.url,
                                                                                       timeout=60) as c:
            r = await completion(c, prompt="w1 " * 3_000_000)  # 9 MB, far over the model's 2048 tokens
            assert r.status_code == 400 and "maximum context length" in r.text
            r = await completion(c, prompt="w" * 3_000_000)  # one "word", as long
            assert r.status_code == 400 and "maximum context length" in r.text
            assert gw.app.bodies.held == 0


@pytest.mark.asyncio
async def test_a_client_that_reads_nothing_of_its_stream_is_disconnected():
    import json as _json
    import socket

    with ExitStack() as stack:
        (e0,) = emulators(stack, 1)
        async with Gateway(scenario([e0.url], send_timeout_s=0.5), "fcfs", port=0) as gw:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the gateway backs up
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gw.port))
            body = _json.dumps({"model": "m", "messages": [{"role": "user", "content": "w1"}], "max_tokens": 1900,
                                "logprobs": True, "top_logprobs": 20, "stream": True}).encode()
            sock.send(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                      b"content-length: %d\r\n\r\n" % len(body) + body)
            try:
                loop = asyncio.get_running_loop()
                end = loop.time() + 60
                while gw.connections.closed["send_timeout"] == 0 and loop.time() < end:
                    await asyncio.sleep(0.05)
                assert gw.connections.closed["send_timeout"] == 1
                while gw.cluster.num_active() and loop.time() < end:
                    await asyncio.sleep(0.05)
                (r,) = gw.cluster.records
                assert r.error == "client disconnected" and r.generated_tokens < 1900
            finally:
                sock.close()
