"""Live trace replay through the gateway in front of two emulated engines: exactness, QLM vs FCFS, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from qlmctl.cli import app
from qlmctl.client.replay import replay, synthetic_prompt
from qlmctl.emulator.testing import live_scenario_spec, local_emulators
from qlmctl.gateway.run import run_live
from qlmctl.report import read_results, read_timeline
from qlmctl.scenario import load_scenario
from qlmctl.traces import write_native_csv
from qlmctl.workload import build_requests
from simulator.profile import EngineProfile

# 8 sequences a batch, ~18 ms (simulated) a decode step: a batch request holds its slot ~3.6 s.
PROFILE = dict(base_s=0.01, per_prefill_token_s=5e-5, per_decode_seq_s=1e-3, per_context_token_s=0.0,
               kv_blocks=2000, block_size=16, max_num_seqs=8, max_num_batched_tokens=1024, max_model_len=2048,
               load_cold_s=5.0, load_warm_s=0.5, mean_output_tokens=120, std_output_tokens=100)
SPEEDUP = 5.0


def mixed_trace(path, n_batch: int = 120, n_interactive: int = 80, span_s: float = 21.0, seed: int = 0) -> None:
    """Overload: a burst of long batch requests (in the first 2 s) queues ~25 s of work on the two engines;
    short interactive requests (TTFT SLO 3 s) arrive over 3..21 s, behind that backlog under FCFS."""
    rng = np.random.default_rng(seed)
    k = span_s / 21.0
    rows = [(t, "m", "batch", int(rng.integers(100, 200)), int(rng.integers(150, 250)))
            for t in np.sort(rng.uniform(0.0, 2.0 * k, n_batch))]
    rows += [(t, "m", "interactive", int(rng.integers(20, 60)), int(rng.integers(10, 30)))
             for t in np.sort(rng.uniform(3.0 * k, 21.0 * k, n_interactive))]
    frame = pd.DataFrame(sorted(rows), columns=["arrival_s", "model", "slo_class", "prompt_tokens", "output_tokens"])
    write_native_csv(frame, path)


@pytest.fixture(scope="module")
def engines():
    prof = EngineProfile(model="m", **PROFILE)
    with local_emulators([(prof, "m"), (prof, "m")], speedup=SPEEDUP) as es:
        yield es


def live_scenario(tmp_path, engines, trace) -> tuple:
    spec = live_scenario_spec(
        PROFILE, [("g0", "m", engines[0].url), ("g1", "m", engines[1].url)], speedup=SPEEDUP,
        slo_classes={"interactive": {"ttft_s": 3.0}, "batch": {"ttft_s": 600.0}},
        workload={"trace": str(trace), "model": {"column": "model"}, "slo_class": {"column": "slo_class"}},
        scheduler={"slo_bucket_s": 1.0, "reschedule_interval_s": 0.5},
    )
    path = tmp_path / "live.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, load_scenario(path)


def expected_text(prompt_tokens: int, output_tokens: int) -> str:
    """The emulator's answer: output token j of a request with P prompt tokens is " w<P+j>"."""
    return "".join(f" w{prompt_tokens + j}" for j in range(output_tokens))


@pytest.mark.asyncio
async def test_mixed_trace_exact_and_qlm_beats_fcfs(tmp_path, engines):
    trace = tmp_path / "mixed.csv"
    mixed_trace(trace)
    _, sc = live_scenario(tmp_path, engines, trace)
    requests, _ = build_requests(sc)
    assert len(requests) == 200
    attainment = {}
    for policy in ("fcfs", "qlm"):
        run = await run_live(sc, policy, requests, keep_text=True)
        got = sorted(run.requests, key=lambda r: r.request_id)
        assert [r.request_id for r in got] == list(range(200))
        for r, text, p in zip(run.requests, run.texts, run.replay.usage_prompt_tokens):
            # Every request completed, once, with exactly the tokens asked for (none lost or repeated,
            # evictions included). The engine counts the synthetic prompt's words and its BOS token.
            assert r.error is None, (policy, r.request_id, r.error)
            assert r.generated_tokens == r.output_tokens
            assert p in (r.prompt_tokens, r.prompt_tokens + 1)
            assert text == expected_text(p, r.output_tokens), (policy, r.request_id)
        assert run.replay.usage_tokens == [r.output_tokens for r in run.requests]
        assert run.summary["completed"] == 200 and run.summary["backend"] == "live"
        assert all(r.dispatch_s is not None and r.instance_id in (0, 1) for r in run.requests)
        attainment[policy] = run.summary["slo_attainment_by_class"]["interactive"]
    print("interactive SLO attainment", attainment)
    assert attainment["qlm"] > attainment["fcfs"]
    assert attainment["qlm"] >= 0.5 and attainment["fcfs"] <= 0.25, attainment


@pytest.mark.asyncio
# 2 workers: the gateway's relays in processes of their own; 2 client processes: the replay split between them
@pytest.mark.parametrize("workers, client_procs", [(1, 1), (2, 2)])
async def test_client_process_replay_exact_with_engine_metrics_and_loop_lag(tmp_path, engines, monkeypatch, workers,
                                                                           client_procs):
    trace = tmp_path / "small.csv"
    mixed_trace(trace, n_batch=24, n_interactive=16, span_s=4.0, seed=1)
    _, sc = live_scenario(tmp_path, engines, trace)
    requests, _ = build_requests(sc)
    n = len(requests)

    async def not_here(*args, **kw):
        raise AssertionError("the client ran in the gateway's process")

    # The client process imports its own `replay`; this process's must not be the one that runs.
    monkeypatch.setattr("qlmctl.client.replay.replay", not_here)
    monkeypatch.setattr("qlmctl.gateway.run.replay", not_here)
    seen: list[tuple[int, int]] = []
    run = await run_live(sc, "fcfs", requests, keep_text=True, progress=lambda d, total: seen.append((d, total)),
                         workers=workers, client_procs=client_procs)

    assert sorted(r.request_id for r in run.requests) == list(range(n))
    for r, text, p in zip(run.requests, run.texts, run.replay.usage_prompt_tokens):
        assert r.error is None, (r.request_id, r.error)
        assert r.generated_tokens == r.output_tokens
        assert text == expected_text(p, r.output_tokens), r.request_id
        # Server-side times merged onto the client's clock, in order.
        assert r.arrival_s <= r.dispatch_s <= r.first_token_s <= r.finish_s
    assert run.replay.usage_tokens == [r.output_tokens for r in run.requests]
    assert run.summary["completed"] == n
    assert seen[-1] == (n, n) and [d for d, _ in seen] == sorted(d for d, _ in seen)

    # The gateway's timeline lines up with the client's clock (time.monotonic() in both processes).
    span = run.replay.wall_s * SPEEDUP
    times = [t for t, *_ in run.timeline]
    assert min(times) > -5 * SPEEDUP and max(times) < span + 5 * SPEEDUP
    lags = [v for _, kind, *_, v in run.timeline if kind == "loop_lag"]
    assert len(lags) >= int(run.replay.wall_s) - 1
    s = run.summary
    assert 0 <= s["gateway_loop_lag_p50_ms"] <= s["gateway_loop_lag_p99_ms"] <= s["gateway_loop_lag_max_ms"]
    assert max(lags) * 1e3 <= s["gateway_loop_lag_max_ms"] + 1e-9
    # The replay client's own load, measured in its process (not the gateway's).
    assert 0 <= s["client_loop_lag_p50_ms"] <= s["client_loop_lag_p99_ms"] <= s["client_loop_lag_max_ms"]
    assert 0 < s["client_cpu_per_s"] < 4
    assert s["client_processes"] == client_procs
    assert 0 <= s["client_send_delay_p50_ms"] <= s["client_send_delay_max_ms"]
    assert set(s["gateway_tokenizer"].values()) == {"engine"}  # auto, in front of emulators: their /tokenize

    em = s["engine_metrics"]
    assert set(em) == {"g0", "g1"}
    ttft = [em[g]["vllm:time_to_first_token_seconds"] for g in em]
    assert sum(h["count"] for h in ttft) == n  # the module's engines served other tests before: deltas
    assert sum(em[g]["vllm:e2e_request_latency_seconds"]["count"] for g in em) == n
    assert sum(em[g]["vllm:generation_tokens"] for g in em) == sum(r.output_tokens for r in run.requests)
    assert sum(em[g]["vllm:prompt_tokens"] for g in em) == sum(run.replay.usage_prompt_tokens)
    for g, m in em.items():
        t = m["vllm:time_to_first_token_seconds"]
        if not t["count"]:
            continue
        assert t["buckets"]["+Inf"] == t["count"] and list(t["buckets"].values()) == sorted(t["buckets"].values())
        q, pf = m["vllm:request_queue_time_seconds"], m["vllm:request_prefill_time_seconds"]
        assert q["count"] == pf["count"] == m["vllm:request_decode_time_seconds"]["count"] == t["count"]
        # The engine's TTFT is its queueing plus its prefill (vLLM adds its frontend's latency).
        assert q["mean"] + pf["mean"] <= t["mean"] + 1e-3, (g, q["mean"], pf["mean"], t["mean"])
        assert q["mean"] + pf["mean"] == pytest.approx(t["mean"], abs=2e-3)
        inference = m["vllm:request_inference_time_seconds"]["mean"]
        assert inference == pytest.approx(pf["mean"] + m["vllm:request_decode_time_seconds"]["mean"], rel=1e-6)
    json.dumps(s, allow_nan=False)  # summary.json stays plain JSON


@pytest.mark.asyncio
async def test_replay_reports_its_own_loop_lag_and_cpu(tmp_path, engines):
    """A client that is late to read its streams is late in the TTFT it measures: the replay says how late."""
    import asyncio
    import time

    trace = tmp_path / "small.csv"
    mixed_trace(trace, n_batch=4, n_interactive=6, span_s=2.0, seed=2)
    _, sc = live_scenario(tmp_path, engines, trace)
    requests, _ = build_requests(sc)

    async def block_loop() -> None:
        await asyncio.sleep(0.3)
        time.sleep(0.25)  # the client's loop does nothing else meanwhile: a lag of at least 250 ms

    blocker = asyncio.create_task(block_loop())
    res = await replay(engines[0].url, requests, speedup=SPEEDUP)
    await blocker
    assert all(r.error is None for r in res.requests)
    c = res.client
    assert c["client_loop_lag_max_ms"] >= 200, c
    assert 0 <= c["client_loop_lag_p50_ms"] <= c["client_loop_lag_p99_ms"] <= c["client_loop_lag_max_ms"]
    # The blocking sleep is wall time, not CPU; the replay's own work is some, well under a core.
    assert 0 < c["client_cpu_per_s"] < 2


@pytest.mark.asyncio
async def test_engine_metrics_of_an_engine_that_does_not_answer_is_an_error_entry(engines):
    from types import SimpleNamespace

    from qlmctl.engines.vllm import VLLMServer
    from qlmctl.gateway.run import _engine_deltas, _scrape_engines

    def instance(name: str, urls: dict[str, str]) -> SimpleNamespace:
        return SimpleNamespace(name=name, engines={m: SimpleNamespace(server=VLLMServer(u)) for m, u in urls.items()})

    # g1 shares its GPU between two models, one of which is on a port nobody listens on.
    cluster = SimpleNamespace(instances=[instance("g0", {"m": engines[0].url}),
                                         instance("g1", {"m": engines[1].url, "x": "http://127.0.0.1:9"})])
    before = await _scrape_engines(cluster, timeout_s=2.0)
    after = await _scrape_engines(cluster, timeout_s=2.0)
    got = _engine_deltas(before, after)
    assert set(got) == {"g0", "g1/m", "g1/x"}
    assert list(got["g1/x"]) == ["error"] and got["g1/x"]["error"]
    assert got["g0"]["vllm:time_to_first_token_seconds"]["count"] == 0  # nothing ran in between
    assert got["g1/m"]["vllm:num_preemptions"] == 0
    assert "vllm:iteration_tokens_total" not in got["g0"]  # not exported by the emulator: absent
    for inst in cluster.instances:
        for e in inst.engines.values():
            await e.server.aclose()


def test_serve_trace_cli_writes_results_like_simulate(tmp_path, engines):
    trace = tmp_path / "small.csv"
    mixed_trace(trace, n_batch=12, n_interactive=8, span_s=3.0)
    path, _ = live_scenario(tmp_path, engines, trace)
    out = tmp_path / "results"
    res = CliRunner().invoke(app, ["serve", "-s", str(path), "--trace", str(trace), "-p", "fcfs,qlm", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "SLO attainment" in res.output and "live" in res.output
    for policy in ("fcfs", "qlm"):
        summary, frame = read_results(out / policy)
        assert summary["completed"] == 20 and summary["policy"] == policy and summary["backend"] == "live"
        assert summary["p50_itl_ms"] is not None
        assert len(frame) == 20 and frame["dispatch_s"].notna().all()
        assert (frame["generated_tokens"] == frame["output_tokens"]).all()
        timeline = read_timeline(out / policy)
        assert timeline is not None and set(timeline["kind"]) <= {"queue_depth", "swap", "evict", "loop_lag"}

    # --speedup overrides live.speedup (here the scenario says real time; the engines run 5x).
    spec = yaml.safe_load(path.read_text())
    spec["live"]["speedup"] = 1.0
    path.write_text(yaml.safe_dump(spec))
    res = CliRunner().invoke(app, ["serve", "-s", str(path), "--trace", str(trace), "-p", "fcfs",
                                   "--speedup", str(SPEEDUP), "-o", str(tmp_path / "fast")])
    assert res.exit_code == 0, res.output
    summary, _ = read_results(tmp_path / "fast" / "fcfs")
    assert summary["speedup"] == SPEEDUP and summary["completed"] == 20
    # Its arrivals span 3 scenario seconds: at least 3 s of wall time at real time, 0.6 s at 5x (0.83 s measured).
    assert summary["live_wall_s"] < 2.5

    # The standalone client against an engine directly (a gateway or vLLM alike).
    res = CliRunner().invoke(app, ["replay", str(trace), "-s", str(path), "--url", engines[0].url, "-l", "direct",
                                   "-o", str(out)])
    assert res.exit_code == 0, res.output
    summary, frame = read_results(out / "direct")
    assert summary["completed"] == 20 and summary["backend"] == "replay"


def test_serve_without_live_section_is_a_user_error(tmp_path):
    res = CliRunner().invoke(app, ["serve", "-s", "scenarios/default.yaml"])
    assert res.exit_code == 2
    assert "no `live` section" in res.output


def test_serve_refuses_several_client_processes_on_its_own_loop():
    res = CliRunner().invoke(app, ["serve", "-s", "scenarios/live_emulated.yaml", "--replay", "--in-process-client",
                                   "--client-procs", "2"])
    assert res.exit_code == 2
    assert "--client-procs" in res.output and "--in-process-client" in res.output


def test_synthetic_prompt_is_one_token_per_word():
    p = synthetic_prompt(50, salt=3)
    assert len(p.split()) == 50 and all(w.startswith("w") for w in p.split())
    assert synthetic_prompt(5, 1) != synthetic_prompt(5, 2)
