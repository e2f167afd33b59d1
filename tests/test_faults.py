"""Engine faults under the live gateway: kill, hang, error rate, slowdown, restart, no engine left.

Emulated engines on loopback threads with fault injection (`qlmctl.emulator.faults`), a gateway in this
test's loop. Every client request must end in exactly one complete answer (every token once, in
order: the emulator's answer is a known function of the prompt) or one clear error; none lost.
"""

from __future__ import annotations

import asyncio
from contextlib import ExitStack

import httpx
import pytest

from qlmctl.client.outcomes import Outcome, Tally, call
from qlmctl.emulator.faults import Faults
from qlmctl.emulator.server import start_emulator
from qlmctl.emulator.testing import live_scenario_spec
from qlmctl.engines.http import Pool
from qlmctl.gateway.server import Gateway
from qlmctl.scenario import Scenario, ScenarioSpec
from simulator.profile import EngineProfile

# 11 ms (simulated) per decode step; at speed-up 4 a 120-token answer streams for about 0.35 s.
PROFILE = dict(base_s=0.01, per_prefill_token_s=1e-4, per_decode_seq_s=1e-3, per_context_token_s=0.0,
               kv_blocks=2000, block_size=16, max_num_seqs=8, max_num_batched_tokens=2048, max_model_len=2048,
               load_cold_s=1.0, load_warm_s=0.5)
SPEEDUP = 4
# Short timeouts and fast probes, so that faults show within a second of wall time.
FAST = dict(max_retries=2, first_token_timeout_s=1.0, inter_token_timeout_s=0.5, metrics_interval_s=0.1,
            probe_interval_s=0.1, probe_timeout_s=0.3, unavailable_timeout_s=1.0, unhealthy_after=3)


def scenario(urls: list[str], **live) -> Scenario:
    spec = live_scenario_spec(PROFILE, [(f"g{i}", "m", u) for i, u in enumerate(urls)], speedup=SPEEDUP,
                              **{**FAST, **live})
    return Scenario(ScenarioSpec.model_validate(spec))


def emulators(stack: ExitStack, n: int, faults: list[Faults | None] | None = None) -> list:
    prof = EngineProfile(model="m", **PROFILE)
    return [stack.enter_context(start_emulator(prof, "m", speedup=SPEEDUP, faults=(faults or [None] * n)[i]))
            for i in range(n)]


def words(first: int, n: int) -> str:
    return "".join(f" w{first + j}" for j in range(n))


def body(i: int, n_out: int, stream: bool, chat: bool = False) -> tuple[str, dict]:
    prompt = " ".join(f"w{j}" for j in range(5 + i % 7))
    if chat:
        b = {"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": n_out}
    else:
        b = {"model": "m", "prompt": prompt, "max_tokens": n_out}
    if stream:
        b.update(stream=True, stream_options={"include_usage": True})
    return ("/v1/chat/completions" if chat else "/v1/completions"), b


def check_exact(o: Outcome, n_out: int) -> None:
    """A completed answer holds every token once, in order, under one id."""
    assert o.completion_tokens == n_out, o
    assert o.text == words(o.prompt_tokens, n_out), (o.prompt_tokens, o.text[:80])
    assert len(o.ids) == 1


async def run_requests(gw: Gateway, n: int, n_out: int, *, during=None, chat: bool = False,
                       timeout_s: float = 60.0) -> list[Outcome]:
    """Send n requests at once (half streamed); `during(outcomes_so_far)` runs once they are under way."""
    pool = Pool(gw.url, max_idle=n)
    try:
        tasks = [asyncio.ensure_future(call(pool, *body(i, n_out, stream=i % 2 == 0, chat=chat),
                                            headers={"x-request-id": str(i)}, timeout_s=timeout_s))
                 for i in range(n)]
        if during is not None:
            await during()
        outs = list(await asyncio.gather(*tasks))
        # With relay workers the core hears of each end a moment after the client has its answer.
        await wait_until(lambda: gw.cluster.num_active() == 0, 5)
        return outs
    finally:
        await pool.aclose()


async def wait_until(pred, timeout_s: float = 10.0, step: float = 0.02) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while loop.time() < end:
        if pred():
            return True
        await asyncio.sleep(step)
    return pred()


def tally(outs: list[Outcome]) -> Tally:
    t = Tally()
    for o in outs:
        t.add(o)
    return t


def engine(gw: Gateway, i: int):
    return gw.cluster.instances[i].engines["m"]


def failures(gw: Gateway) -> dict[str, float]:
    """The gateway's qlm_engine_failures_total by kind."""
    out: dict[str, float] = {}
    for m in gw.metrics.registry.collect():
        for smp in m.samples:
            if smp.name == "qlm_engine_failures_total":
                out[smp.labels["kind"]] = out.get(smp.labels["kind"], 0) + smp.value
    return out


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
# fcfs takes failed requests back without on_evicted; workers 2: the relays in processes of their own
@pytest.mark.parametrize("policy,workers", [("qlm", 1), ("fcfs", 1), ("qlm", 2)])
async def test_engine_killed_mid_stream_requests_resume_elsewhere(policy, workers):
    with ExitStack() as stack:
        e0, e1 = emulators(stack, 2)
        async with Gateway(scenario([e0.url, e1.url]), policy, port=0, workers=workers) as gw:
            # Answers of ~1.7 s: the kill lands mid-answer even when a busy machine delays it by a second.
            n, n_out = 12, 600

            async def kill_g0_mid_answer():
                # Both engines are streaming answers when g0 dies.
                assert await wait_until(lambda: all(lr.sent >= 10 for lr in gw.cluster.instances[0].inflight.values())
                                        and gw.cluster.instances[0].inflight, 10)
                await asyncio.to_thread(e0.set_faults, Faults(kill_after_s=0))

            outs = await run_requests(gw, n, n_out, during=kill_g0_mid_answer)
            t = tally(outs)
            assert (t.completed, t.failed, t.lost) == (n, 0, 0), [o for o in outs if o.kind != "completed"]
            for o in outs:
                check_exact(o, n_out)
            assert gw.cluster.num_retries >= 1
            assert not engine(gw, 0).healthy and engine(gw, 1).healthy
            retried = [r for r in gw.cluster.records if r.instance_id == 1 and r.error is None]
            assert len(retried) == n
            assert [k for _, k, *_ in gw.cluster.timeline if k == "unhealthy"] == ["unhealthy"]

            # Healed, it is probed and used again.
            await asyncio.to_thread(e0.set_faults, Faults())
            assert await wait_until(lambda: engine(gw, 0).healthy, 10)
            outs = await run_requests(gw, 8, 20)
            assert tally(outs).completed == 8
            assert any(r.instance_id == 0 for r in gw.cluster.records[-8:])


@pytest.mark.asyncio
@pytest.mark.parametrize("workers", [1, 2])
async def test_engine_hangs_streams_time_out_and_resume(workers):
    with ExitStack() as stack:
        e0, e1 = emulators(stack, 2)
        async with Gateway(scenario([e0.url, e1.url]), "qlm", port=0, workers=workers) as gw:
            n, n_out = 10, 600  # ~1.7 s answers: the hang lands mid-answer on a busy machine too

            async def hang_g0():
                assert await wait_until(lambda: gw.cluster.instances[0].inflight, 10)
                await asyncio.sleep(0.05)
                await asyncio.to_thread(e0.set_faults, Faults(hang_after_s=0))

            outs = await run_requests(gw, n, n_out, during=hang_g0)
            assert tally(outs).completed == n, [o for o in outs if o.kind != "completed"]
            for o in outs:
                check_exact(o, n_out)
            assert gw.cluster.num_retries >= 1
            assert not engine(gw, 0).healthy
            assert set(failures(gw)) & {"stalled", "first_token_timeout"}
            # Probes of a hung engine time out: it stays out until healed.
            await asyncio.sleep(0.5)
            assert not engine(gw, 0).healthy
            await asyncio.to_thread(e0.set_faults, Faults())
            assert await wait_until(lambda: engine(gw, 0).healthy, 10)


@pytest.mark.asyncio
@pytest.mark.parametrize("workers", [1, 2])
async def test_error_rate_every_request_has_one_outcome_within_budget(workers):
    with ExitStack() as stack:
        e0, e1 = emulators(stack, 2, [Faults(error_rate=0.6, seed=3), None])
        async with Gateway(scenario([e0.url, e1.url]), "qlm", port=0, workers=workers) as gw:
            n, n_out = 40, 30
            outs = await run_requests(gw, n, n_out)
            t = tally(outs)
            assert t.lost == 0 and t.completed + t.failed == n
            assert t.completed >= n // 2  # g1 is sound: most requests get there within their budget
            for o in outs:
                if o.kind == "completed":
                    check_exact(o, n_out)
                else:
                    assert o.status == 502 and "retry budget" in o.error["message"], o
            status = await asyncio.to_thread(lambda: httpx.get(e0.url + "/emulator/faults").json())
            # Every injected 500 was either retried or ended its request (the last of its budget).
            assert status["errors_injected"] == gw.cluster.num_retries + t.failed
            assert status["errors_injected"] == failures(gw)["status"] and gw.cluster.num_retries >= 1
            assert sum(r.error is not None for r in gw.cluster.records) == t.failed


@pytest.mark.asyncio
@pytest.mark.parametrize("workers", [1, 2])
async def test_retry_budget_spent_is_one_clear_error(workers):
    with ExitStack() as stack:
        (e0,) = emulators(stack, 1, [Faults(error_rate=1.0)])
        async with Gateway(scenario([e0.url], unhealthy_after=100), "qlm", port=0, workers=workers) as gw:
            outs = await run_requests(gw, 6, 10)
            assert tally(outs).failed == 6
            for o in outs:
                assert o.status == 502 and o.error["type"] == "BadGatewayError"
                assert "retry budget 2 spent" in o.error["message"] and "http://" not in o.error["message"]
            status = await asyncio.to_thread(lambda: httpx.get(e0.url + "/emulator/faults").json())
            assert status["errors_injected"] == 6 * (FAST["max_retries"] + 1)  # each request tried 3 times
            assert all(r.error is not None for r in gw.cluster.records)


@pytest.mark.asyncio
@pytest.mark.parametrize("workers", [1, 2])
async def test_stream_that_failed_after_tokens_ends_with_one_error_event(workers):
    """Budget 0: a stream cut mid-answer cannot resume; the client gets an error event, then [DONE]."""
    with ExitStack() as stack:
        (e0,) = emulators(stack, 1)
        async with Gateway(scenario([e0.url], max_retries=0), "fcfs", port=0, workers=workers) as gw:
            async def kill():
                assert await wait_until(lambda: any(lr.sent > 5 for lr in gw.cluster.instances[0].inflight.values()))
                await asyncio.to_thread(e0.set_faults, Faults(kill_after_s=0))

            outs = await run_requests(gw, 2, 400, during=kill)
            stream, plain = outs
            assert stream.kind == "failed" and stream.status == 200 and stream.error_events == 1
            assert stream.text and stream.done_events == 1 and stream.error["code"] == 502
            assert plain.kind == "failed" and plain.status == 502


@pytest.mark.asyncio
async def test_slow_engine_still_serves_exactly():
    with ExitStack() as stack:
        e0, e1 = emulators(stack, 2, [Faults(slowdown=3.0), None])
        async with Gateway(scenario([e0.url, e1.url], inter_token_timeout_s=5.0), "qlm", port=0) as gw:
            outs = await run_requests(gw, 12, 60, chat=True)
            assert tally(outs).completed == 12
            for o in outs:
                assert o.completion_tokens == 60 and len(o.ids) == 1
            assert gw.cluster.num_retries == 0
            assert {r.instance_id for r in gw.cluster.records} == {0, 1}


@pytest.mark.asyncio
async def test_engine_process_restart_on_same_port():
    """A real stop (connections refused), then a new server on the same address: unhealthy, then used again."""
    prof = EngineProfile(model="m", **PROFILE)
    with ExitStack() as stack:
        e0, e1 = emulators(stack, 2)
        async with Gateway(scenario([e0.url, e1.url]), "qlm", port=0) as gw:
            await asyncio.to_thread(e0.stop)
            outs = await run_requests(gw, 10, 20)
            assert tally(outs).completed == 10
            assert await wait_until(lambda: not engine(gw, 0).healthy, 5)
            again = await asyncio.to_thread(start_emulator, prof, "m", port=e0.port, speedup=SPEEDUP)
            stack.callback(again.stop)
            assert await wait_until(lambda: engine(gw, 0).healthy, 10)
            outs = await run_requests(gw, 10, 20)
            assert tally(outs).completed == 10
            assert any(r.instance_id == 0 for r in gw.cluster.records[-10:])


@pytest.mark.asyncio
async def test_no_healthy_engine_for_too_long_fails_queued_and_new_requests():
    with ExitStack() as stack:
        (e0,) = emulators(stack, 1)
        async with Gateway(scenario([e0.url]), "qlm", port=0) as gw:
            await asyncio.to_thread(e0.set_faults, Faults(kill_after_s=0))
            outs = await run_requests(gw, 4, 10, timeout_s=30)
            t = tally(outs)
            assert t.failed == 4 and t.lost == 0
            for o in outs:
                assert o.status in (502, 503), o
            # Past the timeout, new requests are refused at once.
            o = (await run_requests(gw, 1, 10))[0]
            assert o.status == 503 and "no healthy engine" in o.error["message"] and o.retry_after == "1"
            assert (await asyncio.to_thread(httpx.get, gw.url + "/health")).status_code == 503
            await asyncio.to_thread(e0.set_faults, Faults())
            assert await wait_until(lambda: engine(gw, 0).healthy, 10)
            assert await wait_until(lambda: not gw.cluster.health.unavailable, 5)
            assert tally(await run_requests(gw, 3, 10)).completed == 3


@pytest.mark.asyncio
@pytest.mark.parametrize("workers", [1, 2])
async def test_stop_ends_queued_and_running_requests_with_one_error_each(workers):
    with ExitStack() as stack:
        (e0,) = emulators(stack, 1)
        gw = Gateway(scenario([e0.url], first_token_timeout_s=60, inter_token_timeout_s=60), "qlm", port=0,
                     workers=workers)
        await gw.start()
        pool = Pool(gw.url, max_idle=32)
        reqs = [asyncio.ensure_future(call(pool, *body(i, 2000, stream=i % 2 == 0))) for i in range(12)]
        assert await wait_until(lambda: len(gw.cluster.instances[0].inflight) == PROFILE["max_num_seqs"]
                                and gw.cluster.queued_by_class.get("batch") == 4)
        await asyncio.to_thread(e0.set_faults, Faults(hang_after_s=0))
        t0 = asyncio.get_running_loop().time()
        await gw.stop()
        outs = await asyncio.gather(*reqs)
        assert asyncio.get_running_loop().time() - t0 < 5
        t = tally(outs)
        assert (t.failed, t.lost) == (12, 0)
        assert all(o.error["code"] == 503 for o in outs)
        await pool.aclose()


# ---------------------------------------------------------------------------------------------------------------
# SIGTERM: stop intake, drain or fail what is queued, flush results, exit 0; a restart starts afresh


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(tmp_path, url: str, port: int, *args: str, **live):
    import subprocess
    import sys

    import yaml

    spec = live_scenario_spec(PROFILE, [("g0", "m", url)], speedup=SPEEDUP, metrics_interval_s=0.2, port=port,
                              **live)
    spec["scheduler"] = {"gurobi": {"WLSSECRET": "gurobi-secret-in-scenario"}}
    spec["workload"] = {"synthetic": {"rate_rps": 40, "num_requests": 400, "prompt_tokens": 8, "output_tokens": 60},
                        "slo_class": {"constant": "interactive"}}
    path = tmp_path / f"serve-{port}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return subprocess.Popen([sys.executable, "-m", "qlmctl.cli", "serve", "-s", str(path), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)


async def _up(port: int, proc, timeout_s: float = 30.0) -> None:
    async with httpx.AsyncClient() as c:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while loop.time() < end:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if (await c.get(f"http://127.0.0.1:{port}/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError("gateway did not come up")


async def _gateway_holds(url: str, engine_url: str, running: int, queued: int, timeout_s: float = 30.0) -> bool:
    """Wait until the engine runs `running` requests and the gateway at `url` queues `queued` (its
    qlm_queue_depth summed over classes)."""
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient() as c:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while loop.time() < end:
            state = (await c.get(engine_url + "/emulator/state")).json()
            text = (await c.get(url + "/metrics")).text
            depth = sum(smp.value for f in text_string_to_metric_families(text) if f.name == "qlm_queue_depth"
                        for smp in f.samples)
            if state["in_flight"] == running and depth == queued:
                return True
            await asyncio.sleep(0.02)
    return False


async def _exit_code(proc, timeout_s: float = 30.0) -> int:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while proc.poll() is None and loop.time() < end:
        await asyncio.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
    return proc.wait()


@pytest.mark.asyncio
@pytest.mark.parametrize("drain_s,workers", [(20.0, 1), (0.3, 1), (20.0, 2), (0.3, 2)])
async def test_sigterm_drains_or_fails_cleanly_and_a_restart_starts_afresh(tmp_path, drain_s, workers):
    import signal

    with ExitStack() as stack:
        (e0,) = emulators(stack, 1)
        port = _free_port()
        proc = _serve(tmp_path, e0.url, port, "--policy", "qlm", "--workers", str(workers), drain_timeout_s=drain_s)
        try:
            await _up(port, proc)
            url = f"http://127.0.0.1:{port}"
            pool = Pool(url, max_idle=32)
            # 8 batch slots: 8 stream (about a second each), 4 wait in the gateway.
            long = [asyncio.ensure_future(call(pool, *body(i, 400, stream=i % 2 == 0), timeout_s=60))
                    for i in range(12)]
            # Every one of them taken in (8 on the engine, 4 queued) before the signal: after a fixed 0.3 s, on
            # a busy machine one could still be on its way and meet the stopped intake instead.
            assert await _gateway_holds(url, e0.url, running=8, queued=4), "the 12 requests did not arrive"
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.15)
            late = await call(pool, *body(0, 5, stream=False))
            assert late.status == 503 and "shutting down" in late.error["message"]  # intake stopped
            outs = await asyncio.gather(*long)
            code = await _exit_code(proc)
            output = proc.stdout.read()
            await pool.aclose()
        finally:
            if proc.poll() is None:
                proc.kill()
        assert code == 0, output
        t = tally(outs)
        assert t.lost == 0 and t.sent == 12
        if drain_s > 5:
            assert t.completed == 12
            for o in outs:
                check_exact(o, 400)
        else:
            assert t.failed >= 4  # the queued ones at least; each with one clear 503
            for o in outs:
                if o.kind == "failed":
                    assert o.error["code"] == 503 and "shut down" in o.error["message"]
        assert "drained" in output and "gurobi-secret-in-scenario" not in output
        if workers > 1:
            assert f"{workers} relay workers" in output
        # The engine holds nothing of the old gateway's.
        assert await wait_until(lambda: httpx.get(e0.url + "/emulator/state").json()["in_flight"] == 0, 5)

        # Restart on the same port at once: a fresh gateway (new counters, nothing queued).
        proc = _serve(tmp_path, e0.url, port, "--policy", "qlm", "--workers", str(workers))
        try:
            await _up(port, proc)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
                metrics = (await c.get("/metrics")).text
                assert "qlm_requests_total{" not in metrics
                r = await c.post("/v1/completions", json={"model": "m", "prompt": "w1", "max_tokens": 3})
                assert r.status_code == 200 and r.json()["id"] in {f"cmpl-qlm-{w}" for w in range(workers)}
            proc.send_signal(signal.SIGTERM)
            assert await _exit_code(proc) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


@pytest.mark.asyncio
async def test_sigterm_during_replay_flushes_results(tmp_path):
    import signal

    from qlmctl.report import read_results

    with ExitStack() as stack:
        (e0,) = emulators(stack, 1)
        proc = _serve(tmp_path, e0.url, 0, "--replay", "--policy", "fcfs,qlm", "-o", str(tmp_path / "out"),
                      drain_timeout_s=5.0)
        try:
            loop = asyncio.get_running_loop()
            end = loop.time() + 30
            while loop.time() < end and not (tmp_path / "out").exists() and proc.poll() is None:
                await asyncio.sleep(0.05)
                if httpx.get(e0.url + "/emulator/state").json()["steps"] > 50:
                    break
            await asyncio.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            code = await _exit_code(proc)
            output = proc.stdout.read()
        finally:
            if proc.poll() is None:
                proc.kill()
    assert code == 0, output
    summary, frame = read_results(tmp_path / "out" / "fcfs")
    assert len(frame) == 400  # every request of the workload has its row
    not_sent = frame["error"].astype(str).str.startswith("not sent").sum()
    done = frame["error"].isna().sum()
    assert done > 0 and not_sent > 0  # some had finished; those not yet due were never sent
    assert summary["num_requests"] == 400
    assert not (tmp_path / "out" / "qlm").exists() and "policy qlm not run" in output
    secrets = [p.read_text(errors="replace") for p in (tmp_path / "out").rglob("*") if p.suffix in (".json", ".yaml", ".csv")]
    assert secrets and not any("gurobi-secret-in-scenario" in s for s in [*secrets, output])


# ---------------------------------------------------------------------------------------------------------------
# the emulator's side


def test_emulator_socket_is_tcp_so_asyncio_sets_nodelay():
    import socket

    from qlmctl.emulator.server import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP  # asyncio's _set_nodelay checks exactly this
    finally:
        sock.close()


def test_faults_are_validated():
    for bad in ({"error_rate": 1.5}, {"slowdown": 0}, {"kill_after_s": -1}, {"seed": "x"}, {"hang": 1}, [1]):
        with pytest.raises(ValueError):
            Faults.from_json(bad)
    assert Faults.from_json({}) == Faults()


@pytest.mark.asyncio
async def test_emulate_cli_fault_flags(tmp_path):
    import subprocess
    import sys

    import yaml

    prof = tmp_path / "p.yaml"
    prof.write_text(yaml.safe_dump(PROFILE))
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qlmctl.cli", "emulate", "--profile", str(prof), "--model", "m",
                             "--port", str(port), "--fault-error-rate", "1", "--fault-slowdown", "2",
                             "--fault-kill-after", "30"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        await _up(port, proc)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
            r = await c.post("/v1/completions", json={"prompt": "w1", "max_tokens": 2})
            assert r.status_code == 500 and r.json()["error"]["type"] == "InternalServerError"
            st = (await c.get("/emulator/faults")).json()
            assert st["faults"]["slowdown"] == 2 and st["faults"]["kill_after_s"] == 30 and st["state"] == "ok"
            assert (await c.get("/emulator/state")).json()["speedup"] == 0.5
            r = await c.post("/emulator/faults", json={"error_rate": 7})
            assert r.status_code == 400 and "error_rate" in r.json()["error"]["message"]
            assert (await c.post("/emulator/faults", json={})).json()["state"] == "ok"
            assert (await c.post("/v1/completions", json={"prompt": "w1", "max_tokens": 2})).status_code == 200
    finally:
        proc.terminate()
        proc.wait(10)


# ---------------------------------------------------------------------------------------------------------------
# the relay's stall timer


@pytest.mark.asyncio
async def test_watchdog_inter_token_deadline_moves_from_the_first_token():
    """A stream that stalls after its first token is caught at inter_s, not at the first-token limit."""
    from qlmctl.engines.base import FailureKind
    from qlmctl.gateway.relay import Watchdog

    class Scope:
        fired_at = None

        def reschedule(self, when):
            self.fired_at = when

    loop = asyncio.get_running_loop()
    scope = Scope()
    t0 = loop.time()
    wd = Watchdog(scope, first_s=30.0, inter_s=0.2)
    await asyncio.sleep(0.05)
    wd.progress()  # the first token
    for _ in range(3):  # a few more, then silence
        await asyncio.sleep(0.05)
        wd.progress()
    last = loop.time()
    assert await wait_until(lambda: scope.fired_at is not None, 10)
    assert wd.fired is FailureKind.STALLED
    # Caught one inter-token limit after the last token (plus scheduling delay), far from first_s.
    assert scope.fired_at - last >= 0.2 - 1e-3 and scope.fired_at - t0 < 10

    scope2 = Scope()
    wd2 = Watchdog(scope2, first_s=0.2, inter_s=30.0)  # no token at all: the first-token limit
    assert await wait_until(lambda: scope2.fired_at is not None, 10)
    assert wd2.fired is FailureKind.FIRST_TOKEN_TIMEOUT


# ---------------------------------------------------------------------------------------------------------------
# retries go elsewhere; outlier ejection


@pytest.mark.asyncio
@pytest.mark.parametrize("policy", ["qlm", "fcfs"])
async def test_retries_avoid_the_engine_that_failed_them_and_an_erroring_engine_is_ejected(policy):
    with ExitStack() as stack:
        e0, e1 = emulators(stack, 2, [Faults(error_rate=0.3, seed=1), None])
        sc = scenario([e0.url, e1.url], unhealthy_after=100, outlier_error_rate=0.2, outlier_min_requests=10,
                      outlier_ejection_s=60)
        async with Gateway(sc, policy, port=0) as gw:
            placed: list[tuple[int, int]] = []
            failed_on: dict[int, int] = {}
            for inst in gw.cluster.instances:
                real_add = inst.add

                def add(lr, now, real_add=real_add, iid=inst.instance_id):
                    placed.append((lr.req.request_id, iid))
                    return real_add(lr, now)

                inst.add = add
            real_retry = gw.cluster.retry

            def retry(lr, eng, kind):
                failed_on[lr.req.request_id] = failed_on.get(lr.req.request_id, 0) + 1
                return real_retry(lr, eng, kind)

            gw.cluster.retry = retry
            n = 60
            outs = await run_requests(gw, n, 30)
            t = tally(outs)
            assert (t.completed, t.failed, t.lost) == (n, 0, 0), [o for o in outs if o.kind != "completed"]
            for o in outs:
                check_exact(o, 30)
            status = await asyncio.to_thread(lambda: httpx.get(e0.url + "/emulator/faults").json())
            assert status["errors_injected"] >= 1 and status["errors_injected"] == gw.cluster.num_retries
            # Every attempt after a failure went to the other engine: each request failed at most once.
            assert failed_on and set(failed_on.values()) == {1}
            for rid in failed_on:
                where = [iid for r, iid in placed if r == rid]
                assert where == [0, 1], (rid, where)
            retried_on_0 = [t_ for t_ in gw.cluster.timeline if t_[1] == "retry" and t_[2] == 0]
            assert len(retried_on_0) == gw.cluster.num_retries
            # Erroring on a fifth or more of its attempts, it was ejected (it answers /health: probes alone
            # would take it back at once), and stays out for outlier_ejection_s.
            assert not engine(gw, 0).healthy and engine(gw, 1).healthy
            before = status["errors_injected"]
            outs = await run_requests(gw, 20, 10)
            assert tally(outs).completed == 20
            after = (await asyncio.to_thread(lambda: httpx.get(e0.url + "/emulator/faults").json()))["errors_injected"]
            assert after == before and all(r.instance_id == 1 for r in gw.cluster.records[-20:])


def test_outlier_detector_window_rate_and_doubling():
    from qlmctl.gateway.outlier import OutlierDetector, OutlierPolicy

    d = OutlierDetector(OutlierPolicy(error_rate=0.25, min_requests=8, interval_s=10.0, ejection_s=5.0))
    t = 100.0
    for _ in range(6):
        assert d.observe("a", t, failed=False) is None
    assert d.observe("a", t, failed=True) is None  # 7 attempts: too few to judge
    assert d.observe("a", t, failed=True) == 5.0  # 2 of 8 failed: 25 %
    assert d.rate("a", t) == (8, 2)
    d.readmitted("a", t)
    assert d.rate("a", t) == (0, 0)
    for _ in range(6):
        d.observe("a", t + 1, failed=False)
    assert d.observe("a", t + 1, failed=True) is None
    assert d.observe("a", t + 1, failed=True) == 10.0  # ejected again in a row: doubled
    # Old attempts leave the window: failures 20 s ago do not count now.
    d.readmitted("a", t + 1)
    for _ in range(3):
        d.observe("b", t, failed=True)
    for _ in range(8):
        assert d.observe("b", t + 30, failed=False) is None
    assert d.rate("b", t + 30) == (8, 0)
    for _ in range(8):
        d.observe("a", t + 40, failed=False)  # a clean window: the doubling starts over
    res = [d.observe("a", t + 40, failed=True) for _ in range(3)]
    assert res == [None, None, 5.0]  # 3 of 11 failed: ejected, for ejection_s again


# ---------------------------------------------------------------------------------------------------------------
# serve --launch: engines die with the gateway; a relaunch does not talk to processes it did not start


def _launch_spec(tmp_path, ports: list[int], **live) -> object:
    import yaml

    prof = tmp_path / "p.yaml"
    prof.write_text(yaml.safe_dump(PROFILE))
    spec = live_scenario_spec(PROFILE, [(f"g{i}", "m", f"http://127.0.0.1:{p}") for i, p in enumerate(ports)],
                              speedup=SPEEDUP, **live)
    spec["live"]["launch"] = {"command": f"{{python}} -m qlmctl.cli emulate --profile {prof} --model {{model}} "
                                         "--port {port} --speedup {speedup}", "health_timeout_s": 60}
    path = tmp_path / "launch.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _serve_launch(tmp_path, path, port: int):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "qlmctl.cli", "serve", "-s", str(path), "--launch", "--port",
                             str(port), "--policy", "fcfs", "--engine-logs", str(tmp_path / "logs")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)


@pytest.mark.asyncio
async def test_sigkill_of_serve_launch_takes_its_engines_down(tmp_path):
    import os
    import signal

    from qlmctl.gateway.launchstate import EngineRecord, port_in_use

    ports = [_free_port(), _free_port()]
    port = _free_port()
    proc = _serve_launch(tmp_path, _launch_spec(tmp_path, ports), port)
    try:
        await _up(port, proc, 90)
        records = [EngineRecord.read(p) for p in ports]
        assert all(r is not None and r.gateway_pid == proc.pid for r in records)
        assert all(port_in_use("127.0.0.1", p) for p in ports)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # Nothing of the engines is left: their groups are gone and their ports free.
        assert await wait_until(lambda: not any(port_in_use("127.0.0.1", p) for p in ports), 30)

        def group_gone(pgid: int) -> bool:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return True
            return False

        assert await wait_until(lambda: all(group_gone(r.pgid) for r in records), 30)
    finally:
        if proc.poll() is None:
            proc.kill()

    # The records they left are a dead gateway's: a relaunch on the same ports starts afresh.
    proc = _serve_launch(tmp_path, _launch_spec(tmp_path, ports), port)
    try:
        await _up(port, proc, 90)
        assert all(EngineRecord.read(p).gateway_pid == proc.pid for p in ports)
        proc.send_signal(signal.SIGTERM)
        assert await _exit_code(proc) == 0
        assert all(EngineRecord.read(p) is None for p in ports)  # stopped on purpose: no record left
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.asyncio
async def test_relaunch_refuses_a_port_held_by_a_process_it_did_not_start_and_stops_an_orphan(tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys

    from qlmctl.gateway.launchstate import EngineRecord, port_in_use, start_time

    ports = [_free_port(), _free_port()]
    port = _free_port()
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", ports[1]))
    squatter.listen()
    try:
        proc = _serve_launch(tmp_path, _launch_spec(tmp_path, ports), port)
        code = await _exit_code(proc, 60)
        out = proc.stdout.read()
        assert code != 0 and f"port {ports[1]}" in out and "did not start" in out and f"pid {os.getpid()}" in out
        assert not port_in_use("127.0.0.1", ports[0])  # it started nothing
    finally:
        squatter.close()

    # An engine whose gateway and reaper both died (killed together): the next launch stops it first.
    orphan = subprocess.Popen([sys.executable, "-m", "qlmctl.cli", "emulate", "--profile", str(tmp_path / "p.yaml"),
                               "--model", "m", "--port", str(ports[0])], start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    EngineRecord(ports[0], orphan.pid, start_time(orphan.pid), dead.pid, None, ["emulate"]).write()
    try:
        assert await wait_until(lambda: port_in_use("127.0.0.1", ports[0]), 30)
        proc = _serve_launch(tmp_path, _launch_spec(tmp_path, ports), port)
        await _up(port, proc, 90)
        assert orphan.poll() is not None  # stopped by the launch
        assert EngineRecord.read(ports[0]).gateway_pid == proc.pid
        proc.send_signal(signal.SIGTERM)
        assert await _exit_code(proc) == 0
    finally:
        for p in (orphan, proc):
            if p.poll() is None:
                p.kill()


@pytest.mark.asyncio
@pytest.mark.parametrize("policy", ["qlm", "fcfs"])
async def test_requests_ended_while_queued_do_not_wedge_the_policy(policy):
    """Requests whose clients left while they were queued stay in the policy's queue until dispatched, and
    the world ends them there; the policy must not keep counting them on the instance (it once did: with
    nothing else happening, the instance looked full for ever and new requests waited unanswered)."""
    with ExitStack() as stack:
        (e0,) = emulators(stack, 1)
        async with Gateway(scenario([e0.url]), policy, port=0) as gw:
            pool = Pool(gw.url, max_idle=64)
            slots = PROFILE["max_num_seqs"]
            running = [asyncio.ensure_future(call(pool, *body(i, 300, stream=True))) for i in range(slots)]
            assert await wait_until(lambda: len(gw.cluster.instances[0].inflight) == slots)
            waiting = [asyncio.ensure_future(call(pool, *body(i, 10, stream=True))) for i in range(2 * slots)]
            assert await wait_until(lambda: gw.cluster.queued_by_class.get("batch", 0) == 2 * slots)
            for t in waiting:
                t.cancel()  # their clients go away while they wait
            await asyncio.gather(*waiting, return_exceptions=True)
            assert await wait_until(lambda: gw.cluster.queued_by_class.get("batch", 0) == 0)
            assert [o.kind for o in await asyncio.gather(*running)] == ["completed"] * slots
            await asyncio.sleep(0.3)  # the ended requests were dispatched (and ended) as the slots freed
            outs = await run_requests(gw, 4, 10, timeout_s=30)
            assert tally(outs).completed == 4, [o for o in outs if o.kind != "completed"]
            await pool.aclose()
