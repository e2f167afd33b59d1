"""profile-model against an emulated engine whose parameters are known: it must recover them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from qlmctl.cli import app
from simulator.fit import (SATURATED_CPU_PER_S, DecodePoint, FrontendLoadPoint, MixedPoint, PrefillPoint, RawProfile,
                          SustainedWindow, fit_profile, profile_dict, queue_ran_away)
from simulator.profile import EngineProfile, chunk_pairs

TRUTH = EngineProfile(model="m", base_s=0.02, per_prefill_token_s=1.5e-4, per_decode_seq_s=1.0e-3,
                      per_context_token_s=4.0e-6, kv_blocks=4096, block_size=16, max_num_seqs=64,
                      max_num_batched_tokens=2048, max_model_len=8192, per_prefill_pair_s=5.0e-8,
                      per_prefill_step_s=0.006)
COEFS = ("base_s", "per_prefill_token_s", "per_decode_seq_s", "per_context_token_s", "per_prefill_pair_s",
         "per_prefill_step_s")


def synthetic_steps(raw: RawProfile) -> RawProfile:
    """`raw` plus decode points (B 1-16, two contexts) and mixed points (B 8) exact under TRUTH."""
    for b in (1, 4, 16):
        for ctx in (100, 1000):
            c = b * (ctx + 16)
            raw.decode.append(DecodePoint(b, ctx, 32, TRUTH.step_time(0, b, c), c))
    for n in (256, 1024):
        step = TRUTH.step_time(n, 8, 8 * 600, chunk_pairs(0, n))
        raw.mixed.append(MixedPoint(8, 512, n, step, TRUTH.step_time(0, 8, 8 * 600), 8 * 600))
    return raw


def test_fit_recovers_exact_synthetic_points():
    raw = RawProfile(model="m", url="-", num_gpu_blocks=100)
    for n in (128, 512, 1024, 4000):
        raw.prefill.append(PrefillPoint(n, 0.003 + TRUTH.prefill_time(n)))
    synthetic_steps(raw)
    fit = fit_profile(raw, TRUTH.max_num_batched_tokens)
    for k in COEFS:
        assert getattr(fit, k) == pytest.approx(getattr(TRUTH, k), rel=1e-6), k
    assert fit.overhead_s == pytest.approx(0.003, rel=1e-6)
    assert fit.max_abs_error < 1e-9
    # The older linear model cannot fit prompts whose attention cost is quadratic.
    assert fit_profile(raw, TRUTH.max_num_batched_tokens, quadratic=False).max_abs_error > 0.01
    # Raw measurements round-trip through JSON, mixed points included.
    assert RawProfile.from_json(raw.to_json()) == raw


def test_engine_timed_prefill_keeps_client_noise_out_of_the_fit():
    """Prefill points the engine timed itself: the client's noisy HTTP time around them moves nothing but
    the overhead, which is their median gap."""
    raw = RawProfile(model="m", url="-", num_gpu_blocks=100)
    for n, noise in ((128, 0.001), (512, 0.009), (1024, 0.002), (4000, 0.007)):
        raw.prefill.append(PrefillPoint(n, 0.003 + noise + TRUTH.prefill_time(n), TRUTH.prefill_time(n)))
    synthetic_steps(raw)
    fit = fit_profile(raw, TRUTH.max_num_batched_tokens)
    for k in COEFS:
        assert getattr(fit, k) == pytest.approx(getattr(TRUTH, k), rel=1e-6), k
    assert fit.overhead_s == pytest.approx(0.003 + 0.0045)  # median of the four gaps
    assert RawProfile.from_json(raw.to_json()) == raw


def test_fit_finds_the_knee_from_decode_and_mixed_steps():
    truth = TRUTH.with_overrides(knee_tokens=48)
    raw = RawProfile(model="m", url="-", num_gpu_blocks=100)
    for n in (128, 512, 1024, 4000):
        raw.prefill.append(PrefillPoint(n, 0.003 + truth.prefill_time(n)))
    for b in (1, 16, 32, 64, 128):  # batches on both sides of the knee
        for ctx in (100, 1000):
            c = b * (ctx + 16)
            raw.decode.append(DecodePoint(b, ctx, 32, truth.step_time(0, b, c), c))
    for b in (8, 32):
        for n in (32, 256, 1024):
            step = truth.step_time(n, b, b * 600, chunk_pairs(0, n))
            raw.mixed.append(MixedPoint(b, 512, n, step, truth.step_time(0, b, b * 600), b * 600))
    fit = fit_profile(raw, truth.max_num_batched_tokens)
    assert fit.knee_tokens == 48
    for k in COEFS:
        assert getattr(fit, k) == pytest.approx(getattr(truth, k), rel=1e-6), k
    assert fit.max_abs_error < 1e-9


QUEUE_TRUTH = TRUTH.with_overrides(frontend_cpu_per_request_s=0.005, frontend_cpu_per_token_s=6e-5,
                                   frontend_queue_factor=1.8, frontend_latency_s=0.012)


def _queue_raw(truth: EngineProfile) -> RawProfile:
    """Steps and 5-s API-server load windows generated from `truth`'s queue, exactly."""
    raw = RawProfile(model="m", url="-", num_gpu_blocks=100, async_scheduling=True)
    for n in (256, 1024, 2048):
        raw.prefill.append(PrefillPoint(n, 0.003 + TRUTH.prefill_time(n)))
    for b in (1, 8, 32):
        raw.decode.append(DecodePoint(b, 128, 32, TRUTH.step_time(0, b, b * 144), b * 144))
    for streams, step in ((0, 0.0), (64, 0.012), (128, 0.018), (192, 0.03)):
        for rate in (4.0, 12.0, 20.0):
            tokens = streams / step if step else 0.0
            engine = 0.03 + 0.001 * rate  # vLLM's queue + prefill, as its histograms report it
            client = (engine + (0.5 * step if streams else 0.0) + truth.frontend_latency_s
                      + truth.frontend_wait(streams, step, rate))
            raw.frontend_load.append(FrontendLoadPoint(
                streams=streams, rate_rps=rate, probes=int(rate * 5), probe_tokens=1024, step_s=step,
                tokens_per_s=tokens, client_ttft_s=client, cpu_per_s=0.04 + 0.005 * rate + 6e-5 * tokens,
                vllm_ttft_s=None, engine_s=engine))
    return raw


def test_frontend_queue_fit_recovers_known_costs():
    """Windows generated from a known API-server queue: the CPU regression and the queue fit recover it."""
    truth = QUEUE_TRUTH
    raw = _queue_raw(truth)
    fit = fit_profile(raw, TRUTH.max_num_batched_tokens)
    assert fit.frontend_left_out == []
    assert fit.frontend_cpu_per_request_s == pytest.approx(0.005, rel=1e-6)
    assert fit.frontend_cpu_per_token_s == pytest.approx(6e-5, rel=1e-6)
    assert fit.frontend_idle_cpu == pytest.approx(0.04, rel=1e-6)
    assert fit.frontend_queue_factor == pytest.approx(1.8, rel=1e-6)
    assert fit.frontend_latency_s == pytest.approx(0.012, rel=1e-6)
    assert max(abs(e[3]) for e in fit.frontend_errors) < 1e-9
    assert RawProfile.from_json(raw.to_json()) == raw
    assert fit.frontend_probes == "ids:1"


def test_the_usage_in_every_chunk_is_told_apart_by_windows_beside_the_same_streams_asking_for_it():
    """Windows of streams asking for usage in every chunk, generated with a known extra cost a token: the CPU
    regression recovers it, the queue fit is the plain windows' alone, and the model with the extra explains the
    usage windows' TTFTs; the profile carries the extra."""
    usage = 1.5e-5
    truth = QUEUE_TRUTH.with_overrides(frontend_usage_cpu_per_token_s=usage)
    raw = _queue_raw(truth)
    plain = fit_profile(raw, TRUTH.max_num_batched_tokens)
    assert plain.frontend_usage_cpu_per_token_s is None  # none measured
    with_usage = truth.with_usage_stats()
    for streams, step in ((64, 0.012), (128, 0.018), (192, 0.03)):
        tokens, engine = streams / step, 0.034
        client = engine + 0.5 * step + truth.frontend_latency_s + with_usage.frontend_wait(streams, step, 4.0)
        raw.frontend_load.append(FrontendLoadPoint(
            streams=streams, rate_rps=4.0, probes=20, probe_tokens=1024, step_s=step, tokens_per_s=tokens,
            client_ttft_s=client, cpu_per_s=0.04 + 0.005 * 4.0 + (6e-5 + usage) * tokens, vllm_ttft_s=None,
            engine_s=engine, usage_chunks=True))
    assert client > plain.frontend_latency_s + engine + 0.5 * step + truth.frontend_wait(192, 0.03, 4.0)  # it shows
    fit = fit_profile(raw, TRUTH.max_num_batched_tokens)
    assert fit.frontend_usage_cpu_per_token_s == pytest.approx(usage, rel=1e-6)
    assert fit.frontend_cpu_per_token_s == pytest.approx(6e-5, rel=1e-6)
    assert fit.frontend_queue_factor == pytest.approx(1.8, rel=1e-6)
    assert fit.frontend_latency_s == pytest.approx(0.012, rel=1e-6)
    labels = [e[0] for e in fit.frontend_errors]
    assert sum(x.endswith("streams + usage") for x in labels) == 3
    assert max(abs(e[3]) for e in fit.frontend_errors) < 1e-9  # the usage windows too, with the extra charged
    prof = profile_dict(raw, fit, max_num_seqs=256, max_num_batched_tokens=TRUTH.max_num_batched_tokens, gpu="-",
                        flags="")
    assert prof["frontend_usage_cpu_per_token_s"] == pytest.approx(usage, rel=1e-3)
    assert RawProfile.from_json(raw.to_json()) == raw
    # Usage windows with no plain streaming windows beside them tell nothing apart: left out of the CPU fit.
    raw.frontend_load = [p for p in raw.frontend_load if p.usage_chunks or p.streams == 0]
    alone = fit_profile(raw, TRUTH.max_num_batched_tokens)
    assert alone.frontend_usage_cpu_per_token_s is None and alone.frontend_cpu_per_token_s == 0.0


def test_windows_whose_queue_ran_away_are_left_out_of_the_queue_fit():
    """An API server saturated past recovery (an H200 at 256 streams: probes waiting 4-10 s in 4-s windows, its CPU
    at one core) measures the window, not the server: such windows are left out of both fits, which still recover
    the truth, and are named in the profile's provenance. The window recorded in a point beats the default."""
    raw = _queue_raw(QUEUE_TRUTH)
    for rate, ttft in ((2.0, 4.3), (7.0, 10.1)):
        probes = int(rate * 5)  # sent over 5 s, answered over 5 s + the backlog: past twice the window
        raw.frontend_load.append(FrontendLoadPoint(
            streams=256, rate_rps=probes / (5 + ttft + 1), probes=probes, probe_tokens=1024, step_s=0.02,
            tokens_per_s=10_000, client_ttft_s=ttft, cpu_per_s=1.0, vllm_ttft_s=None, engine_s=0.1))
    fit = fit_profile(raw, TRUTH.max_num_batched_tokens)
    assert fit.frontend_cpu_per_request_s == pytest.approx(0.005, rel=1e-6)
    assert fit.frontend_cpu_per_token_s == pytest.approx(6e-5, rel=1e-6)
    assert fit.frontend_queue_factor == pytest.approx(1.8, rel=1e-6)
    assert [w.split(":")[0] for w in fit.frontend_left_out] == ["probes ids", "probes ids"]
    assert all("256 streams" in w and "ran away" in w for w in fit.frontend_left_out)
    assert len(fit.frontend_errors) == len(raw.frontend_load) - 2
    prov = profile_dict(raw, fit, max_num_seqs=256, max_num_batched_tokens=TRUTH.max_num_batched_tokens, gpu="g",
                        flags="f")["provenance"]
    assert prov["load_windows_left_out"] == fit.frontend_left_out
    # With a longer window (recorded, or the default for raw files that did not record theirs) the probes were
    # answered within twice it, but the CPU counter at one core still marks the server saturated: left out.
    longer = fit_profile(raw, TRUTH.max_num_batched_tokens, load_window_s=10.0)
    assert len(longer.frontend_left_out) == 2
    assert longer.frontend_cpu_per_token_s == pytest.approx(6e-5, rel=1e-6)
    # Kept in: those windows with their counter under the cap. Then the fit moves off the truth.
    for p in raw.frontend_load[-2:]:
        p.cpu_per_s = 0.95
    longer = fit_profile(raw, TRUTH.max_num_batched_tokens, load_window_s=10.0)
    assert longer.frontend_left_out == []
    assert longer.frontend_queue_factor != pytest.approx(1.8, rel=1e-3)
    assert longer.frontend_cpu_per_token_s != pytest.approx(6e-5, rel=1e-3)
    assert len(fit_profile(raw, TRUTH.max_num_batched_tokens).frontend_left_out) == 2  # 5-s windows: ran away
    for p in raw.frontend_load[-2:]:
        p.window_s = 10.0
    assert fit_profile(raw, TRUTH.max_num_batched_tokens).frontend_left_out == []
    assert RawProfile.from_json(raw.to_json()) == raw


def test_a_window_whose_api_server_sat_at_one_core_is_left_out_of_the_queue_fit():
    """A window answered within twice its length but with the API server's CPU counter at one core (an H100 at
    256 streams: probes waiting 1.4-2.4 s in 4-s windows, the counter at 0.99-1.01) reads the cap, not the cost:
    kept, it pulls the fitted cost a token down; left out, the fit recovers the truth."""
    raw = _queue_raw(QUEUE_TRUTH)
    for rate, ttft, cpu in ((2.0, 2.4, 1.01), (17.0, 1.4, 0.99)):
        raw.frontend_load.append(FrontendLoadPoint(
            streams=256, rate_rps=rate, probes=int(rate * 4), probe_tokens=1024, step_s=0.02, tokens_per_s=17_000,
            client_ttft_s=ttft, cpu_per_s=cpu, vllm_ttft_s=None, engine_s=0.1, window_s=4.0))
    assert not any(queue_ran_away(p.probes, p.rate_rps, 4.0) for p in raw.frontend_load[-2:])  # by length: kept
    fit = fit_profile(raw, TRUTH.max_num_batched_tokens)
    assert fit.frontend_cpu_per_token_s == pytest.approx(6e-5, rel=1e-6)
    assert fit.frontend_queue_factor == pytest.approx(1.8, rel=1e-6)
    assert len(fit.frontend_left_out) == 2 and all("256 streams" in w for w in fit.frontend_left_out)
    assert queue_ran_away(10, 2.0, 4.0, cpu_per_s=SATURATED_CPU_PER_S)
    assert not queue_ran_away(10, 2.0, 4.0, cpu_per_s=SATURATED_CPU_PER_S - 0.01)


def test_frontend_queue_fit_takes_the_windows_of_one_kind_of_probe():
    """Windows of two kinds of probe, whose requests cost the API server differently: the fit takes the first kind
    measured unless told, each kind's costs recovered from its own windows; a kind not measured is an error."""
    def windows(kind: tuple[int, bool], per_request: float) -> list[FrontendLoadPoint]:
        truth = TRUTH.with_overrides(frontend_cpu_per_request_s=per_request, frontend_cpu_per_token_s=6e-5,
                                     frontend_queue_factor=1.8, frontend_latency_s=0.012)
        out = []
        for streams, step in ((0, 0.0), (128, 0.018), (192, 0.03)):
            for rate in (4.0, 20.0):
                tokens = streams / step if step else 0.0
                client = 0.04 + 0.5 * step + 0.012 + truth.frontend_wait(streams, step, rate)
                out.append(FrontendLoadPoint(
                    streams=streams, rate_rps=rate, probes=int(rate * 5), probe_tokens=1024, step_s=step,
                    tokens_per_s=tokens, client_ttft_s=client, cpu_per_s=0.04 + per_request * rate + 6e-5 * tokens,
                    vllm_ttft_s=None, engine_s=0.04, probe_out=kind[0], probe_words=kind[1]))
        return out

    raw = RawProfile(model="m", url="-", num_gpu_blocks=100, async_scheduling=True)
    for n in (256, 1024, 2048):
        raw.prefill.append(PrefillPoint(n, 0.003 + TRUTH.prefill_time(n)))
    for b in (1, 8, 32):
        raw.decode.append(DecodePoint(b, 128, 32, TRUTH.step_time(0, b, b * 144), b * 144))
    raw.frontend_load = windows((32, True), 0.009) + windows((1, False), 0.004)
    fit = fit_profile(raw, TRUTH.max_num_batched_tokens)
    assert fit.frontend_probes == "words:32"
    assert fit.frontend_cpu_per_request_s == pytest.approx(0.009, rel=1e-6)
    assert fit.frontend_queue_factor == pytest.approx(1.8, rel=1e-6)
    ids = fit_profile(raw, TRUTH.max_num_batched_tokens, load_probes="ids:1")
    assert ids.frontend_cpu_per_request_s == pytest.approx(0.004, rel=1e-6) and ids.frontend_probes == "ids:1"
    assert RawProfile.from_json(raw.to_json()) == raw
    with pytest.raises(ValueError, match="ids:1, words:32"):
        fit_profile(raw, TRUTH.max_num_batched_tokens, load_probes="words:64")


@contextmanager
def _emulated(tmp_path: Path, profile: EngineProfile) -> Iterator[str]:
    """The URL of `qlmctl emulate` of `profile`, run in a process of its own (stopped on leaving): the prober's
    parsing shares no interpreter lock with the engine's timing (as with a real engine), so a busy machine delays
    its tokens by its scheduling latency only (well under a millisecond), not by the prober's work."""
    import dataclasses
    import os
    import socket
    import subprocess
    import sys
    import time

    import httpx

    prof = tmp_path / "truth.yaml"
    prof.write_text(yaml.safe_dump({k: v for k, v in dataclasses.asdict(profile).items() if k != "model"}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "qlmctl.cli", "emulate", "--profile", str(prof), "--model", "m",
                             "--port", str(port), "--stream-interval", "0.001"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 60
    while time.monotonic() < end:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    else:
        proc.kill()
        raise RuntimeError("the emulator did not start")
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def test_profile_model_recovers_an_emulated_engine(tmp_path: Path):
    out = tmp_path / "prof.yaml"
    raw = tmp_path / "raw.json"
    # Deliver tokens within 1 ms of their step, so timing noise stays well under the 5 % asked for.
    with _emulated(tmp_path, TRUTH) as url:
        res = CliRunner().invoke(app, [
            "profile-model", "m", "--url", url, "--out", str(out), "--raw", str(raw),
            "--prompt-lengths", "256,1024,2048,3000", "--batches", "1,8,32", "--contexts", "128,512",
            "--output-tokens", "40", "--reps", "3", "--max-num-seqs", "64", "--max-num-batched-tokens", "2048",
            "--mixed-batches", "8,16", "--mixed-contexts", "256", "--mixed-lengths", "256,1024",
            "--frontend-streams", "0,16,32", "--no-async-scheduling",
            "--load-streams", "0,16", "--load-rates", "5", "--load-window-s", "1", "--probe-tokens", "256",
            "--load-probes", "words:8,ids:1", "--gpu", "emulated", "--sleep", "--sustained-s", "6",
        ])
    assert res.exit_code == 0, res.output
    prof = yaml.safe_load(out.read_text())
    # 5 %, widened by the timing noise of this run as the fit itself measured it: its worst relative error
    # on a measured point. Idle, points fit within ~0.2 % (tolerance ~7 %); on a loaded machine the tokens
    # arrive late by scheduling delays, points fit within ~1 %, and the small per-step terms (6 ms in a
    # 26 ms step) move by ~8x that.
    noise = prof["provenance"]["fit_max_abs_rel_error"]
    tol = 0.05 + 10 * noise
    for k in COEFS:
        assert prof[k] == pytest.approx(getattr(TRUTH, k), rel=tol), (k, prof[k], f"tolerance {tol:.1%}")
    assert noise < 0.05  # the emulator's timing is exact: only the machine's noise is in the points
    assert prof["provenance"]["points"]["mixed"] == 4
    # The emulator exports vLLM's prefill histogram: every prefill point was timed by the engine too.
    assert all(p["engine_s"] for p in json.loads(raw.read_text())["prefill"])
    # The emulator relays streams at no extra cost, so the probes' TTFTs are the engine's alone: the
    # frontend term must explain under a third of a step at 32 streams (on an H200 it is about ten).
    assert prof["provenance"]["points"]["frontend"] == 3
    step32 = TRUTH.step_time(0, 32, 32 * 600)
    assert prof["frontend_per_stream_s"] * 32 < step32 / 3
    # The API server load windows ran and were kept (the emulator exports no process CPU counter, so
    # there is no queue model to fit; the windows' probes are timed by its vLLM-style histograms).
    # Each stream count has a window of each kind of probe: words with an 8-token answer, then token ids.
    loads = json.loads(raw.read_text())["frontend_load"]
    # Then one window beside the same streams asking for the usage in every chunk (first rate and kind).
    assert [(p["streams"], p["probe_words"], p["probe_out"], p["usage_chunks"]) for p in loads] == [
        (0, True, 8, False), (0, False, 1, False), (16, True, 8, False), (16, False, 1, False), (16, True, 8, True)]
    assert all(p["probes"] > 0 and p["engine_s"] and p["window_s"] == 1.0 for p in loads)
    # Before the step points that follow the windows, the server's prefill speed was checked against the one
    # measured before them (the emulator does not slow down: one look, no wait).
    settle = json.loads(raw.read_text())["meta"]["settle"]
    assert settle["prompt_tokens"] == 1024 and settle["settled"] and settle["timed_by"] == "engine"
    assert prof["provenance"]["settled_after_load"] is True
    # The probes' answers were streamed: a window with words carries their tokens, one with ids beside no
    # streams carries none.
    assert loads[0]["tokens_per_s"] > 0 and loads[1]["tokens_per_s"] == 0
    assert prof["provenance"]["points"]["frontend_load"] == 5 and "frontend_queue_factor" not in prof
    assert "frontend_usage_cpu_per_token_s" not in prof  # no CPU counter: nothing to tell it from
    assert prof["provenance"]["load_probes"] == "words:8"
    assert prof["provenance"]["load_streams_read_by"] == "another process"
    assert prof["kv_blocks"] == TRUTH.kv_blocks and prof["block_size"] == 16
    assert prof["max_model_len"] == TRUTH.max_model_len
    assert prof["provenance"]["gpu"] == "emulated" and "vllm" in prof["provenance"]["engine"]
    assert prof["load_warm_s"] == pytest.approx(TRUTH.load_warm_s, rel=0.25)
    # An engine that runs prefill as fast under sustained load as in bursts: no slowdown is claimed.
    assert prof["provenance"]["points"]["sustained"] >= 4
    assert prof["sustained_prefill_slowdown"] < 0.03
    # Refitting the saved raw measurements gives the same profile, with no engine.
    res2 = CliRunner().invoke(app, ["profile-model", "m", "--from-raw", str(raw), "--out", str(tmp_path / "p2.yaml"),
                                    "--max-num-seqs", "64", "--max-num-batched-tokens", "2048"])
    assert res2.exit_code == 0, res2.output
    again = yaml.safe_load((tmp_path / "p2.yaml").read_text())
    assert again["base_s"] == prof["base_s"]
    assert again["provenance"]["load_probes"] == "words:8"  # the first kind measured
    # Fitted on the other kind of window; a kind not measured is a clear error naming those that were.
    res3 = CliRunner().invoke(app, ["profile-model", "m", "--from-raw", str(raw), "--out", str(tmp_path / "p3.yaml"),
                                    "--load-probes", "ids:1"])
    assert res3.exit_code == 0, res3.output
    assert yaml.safe_load((tmp_path / "p3.yaml").read_text())["provenance"]["load_probes"] == "ids:1"
    res4 = CliRunner().invoke(app, ["profile-model", "m", "--from-raw", str(raw), "--load-probes", "words:3"])
    assert res4.exit_code == 2 and "words:3" in res4.output and "ids:1, words:8" in res4.output
    assert json.loads(raw.read_text())["model"] == "m"


def test_unreachable_engine_is_a_clear_error():
    res = CliRunner().invoke(app, ["profile-model", "m", "--url", "http://127.0.0.1:9", "--health-timeout-s", "1"])
    assert res.exit_code == 2 and "not healthy" in res.output


def test_mixed_steps_keep_what_was_measured_when_the_decoders_run_out(tmp_path: Path):
    """The long requests of a mixed-step measurement get the output length the KV cache holds for the batch; on
    a fast GPU they can finish before the windows do (an H100 at B=224). That batch's later points are skipped
    with a reason, not the whole profile."""
    import asyncio

    from qlmctl.client.prober import Profiler

    async def measure(url: str) -> tuple[list[MixedPoint], list[str]]:
        prof = Profiler(url, "m")
        try:
            # 12 output tokens: the decoders are done before the first window ends.
            return await prof.mixed_points(8, 256, [256, 1024], max_tokens=12, window_s=0.3), prof.skipped
        finally:
            await prof.close()

    with _emulated(tmp_path, TRUTH) as url:
        points, skipped = asyncio.run(measure(url))
    assert points == []
    assert len(skipped) == 1 and "B=8 ctx=256: the decoders finished their 12 tokens" in skipped[0]


def _sustained_windows(truth: EngineProfile, run: int, per_step: int, length: int, b: int = 8,
                       ctx: int = 600) -> list[SustainedWindow]:
    """A sustained run exact under `truth`: decode-only windows either side, load windows of `per_step` prompt
    tokens a step whose prefill work runs `truth.sustained_prefill_slowdown` slower (every step, as once the
    engine's window has filled)."""
    def dec(i: int) -> SustainedWindow:
        return SustainedWindow(run, "decode", i, b, length, None, 100.0, 100 * truth.step_time(0, b, b * ctx), 0.0, ctx)

    loads = []
    for i in range(10):
        steps = 10.0
        one = truth.step_time(per_step, b, b * ctx, per_step / length * chunk_pairs(0, length))
        work = one - truth.step_time(0, b, b * ctx)
        loads.append(SustainedWindow(run, "load", i, b, length, None, steps,
                                     steps * (one + truth.sustained_prefill_slowdown * work), steps * per_step, ctx))
    return [dec(-1), *loads, dec(1 << 30)]


def test_fit_recovers_the_sustained_slowdown_from_the_run_at_the_highest_prefill_share():
    truth = replace(TRUTH, sustained_prefill_slowdown=0.06)
    raw = synthetic_steps(RawProfile(model="m", url="x"))
    for n in (256, 1024, 2000):
        raw.prefill.append(PrefillPoint(n, TRUTH.prefill_time(n), TRUTH.prefill_time(n)))
    # Run 0 fills every step with prompts (share ~0.9), run 1 sends one prompt a step (~0.5): the fit takes run 0.
    raw.sustained = _sustained_windows(truth, 0, 2048 - 8, 512) + _sustained_windows(truth, 1, 256, 256)
    fit = fit_profile(raw, 2048)
    shares = {run: share for run, _, _, share, _ in fit.sustained_runs}
    assert shares[0] > 0.85 and shares[1] < 0.6
    assert fit.sustained_prefill_slowdown == pytest.approx(0.06, rel=1e-3)
    assert all(dec == pytest.approx(1.0, rel=1e-6) for _, dec, _, _, _ in fit.sustained_runs)
    # Below the share the slowdown is looked for at, nothing is claimed: 0.
    raw.sustained = _sustained_windows(truth, 1, 256, 256)
    assert fit_profile(raw, 2048).sustained_prefill_slowdown == 0.0


def test_profile_model_measures_an_emulated_engine_slowing_under_sustained_load(tmp_path: Path):
    # Fast steps, so that the other points' bursts stay far below the share the slowdown needs (as a GPU's do).
    truth = EngineProfile(model="m", base_s=0.004, per_prefill_token_s=2.5e-5, per_decode_seq_s=1.0e-4,
                          per_context_token_s=1.0e-7, kv_blocks=8192, block_size=16, max_num_seqs=64,
                          max_num_batched_tokens=2048, max_model_len=8192, sustained_prefill_slowdown=0.08,
                          sustained_prefill_share=0.6, sustained_window_s=0.5)
    out = tmp_path / "prof.yaml"
    with _emulated(tmp_path, truth) as url:
        res = CliRunner().invoke(app, [
            "profile-model", "m", "--url", url, "--out", str(out), "--raw", str(tmp_path / "raw.json"),
            "--prompt-lengths", "256,1024,2048", "--batches", "1,8,32", "--contexts", "128,1024", "--output-tokens", "40",
            "--reps", "2", "--max-num-seqs", "64", "--max-num-batched-tokens", "2048", "--no-mixed",
            "--no-frontend", "--no-frontend-load", "--no-async-scheduling", "--sustained-s", "8",
        ])
    assert res.exit_code == 0, res.output
    prof = yaml.safe_load(out.read_text())
    assert prof["provenance"]["points"]["sustained"] >= 8
    assert prof["sustained_prefill_share"] == 0.6
    # The engine's own slowdown, within the timing noise of a run on a busy machine.
    assert prof["sustained_prefill_slowdown"] == pytest.approx(0.08, abs=0.025), res.output
    assert "sustained prefill slowdown" in res.output


def test_load_streams_outlast_their_windows_within_the_kv_cache():
    """The lengths of the API-server load streams: a prompt short enough that the output outlasts the windows where
    the KV cache is tight, 512 where it is not, and never more than the cache holds."""
    from qlmctl.commands.profile import LOAD_TOKENS_PER_S, _load_lengths

    h100 = RawProfile(model="m", url="u", num_gpu_blocks=28934, block_size=16, max_model_len=8192)
    windows, window_s = 4, 4.0
    needed = (windows * window_s + 15.0) * LOAD_TOKENS_PER_S
    for streams in (128, 256):
        prompt, out = _load_lengths(h100, streams, windows, window_s)
        assert 64 <= prompt <= 512 and streams * (prompt + out) <= 0.8 * 28934 * 16
    prompt, out = _load_lengths(h100, 256, windows, window_s)  # 512 + 934 tokens ended early on such a host
    assert prompt < 512 and out > 1300
    for blocks in (28934, 40000, 60000):  # the output lasts as long as the windows need, or the prompt is at its least
        for streams in (128, 256):
            prompt, out = _load_lengths(replace(h100, num_gpu_blocks=blocks), streams, windows, window_s)
            assert out >= needed or prompt == 64
    assert 64 < _load_lengths(replace(h100, num_gpu_blocks=33500), 128, windows, window_s)[0] < 512
    roomy = replace(h100, num_gpu_blocks=10**6)
    assert _load_lengths(roomy, 256, windows, window_s) == (512, 4000)


def test_decode_points_the_engine_cannot_batch_or_hold_are_skipped():
    """A decode point needs all its sequences in one batch without preempting: past --max-num-seqs, or past the KV
    cache (an H100's 463k tokens hold 512 sequences of 128-token prompts, not of 1,024), it is skipped with its
    reason, where measuring it would time queueing or preemption as decode steps."""
    from qlmctl.commands.profile import _decode_point_unfit

    h100 = RawProfile(model="m", url="-", num_gpu_blocks=463_000 // 16, block_size=16)
    assert _decode_point_unfit(h100, 512, 128, 128, 1024, 8192) is None
    assert _decode_point_unfit(h100, 256, 1024, 128, 1024, 8192) is None
    assert "KV cache" in _decode_point_unfit(h100, 512, 1024, 128, 1024, 8192)
    assert "--max-num-seqs (256)" in _decode_point_unfit(h100, 512, 128, 128, 256, 8192)
    # The long round's tokens count: room for the prompt and the output alone is not enough.
    room = int(0.8 * 463_000 / 512)
    assert _decode_point_unfit(h100, 512, room - 128 - 10, 128, 1024, 8192) is not None
    assert _decode_point_unfit(RawProfile(model="m", url="-"), 512, 1024, 128, 1024, 8192) is None  # KV unknown


class _ScriptedPrefill:
    """A prober whose prefill points take the scripted engine times in turn (the last one from then on)."""

    def __init__(self, engine_s: list[float]) -> None:
        self.engine_s, self.calls = list(engine_s), 0

    async def prefill_point(self, n: int, reps: int) -> PrefillPoint:
        t = self.engine_s[min(self.calls, len(self.engine_s) - 1)]
        self.calls += 1
        return PrefillPoint(n, t + 0.005, t)


def _settle_run(engine_s: list[float], before: PrefillPoint) -> tuple[dict, int]:
    import asyncio

    from qlmctl.commands.profile import _settle

    clock = [0.0]

    async def sleep(s: float) -> None:  # a controlled clock: each wait moves it on, nothing really sleeps
        clock[0] += s

    prof = _ScriptedPrefill(engine_s)
    seen = asyncio.run(_settle(prof, before, 2, wait_s=5.0, max_s=30.0, clock=lambda: clock[0], sleep=sleep))
    return seen, prof.calls


def test_points_after_the_load_windows_wait_until_the_server_runs_at_its_quiet_speed():
    before = PrefillPoint(1024, 0.032, 0.0265)
    # Slower by 30 %, then 15 %, then back within 10 %: three measurements, two waits.
    seen, calls = _settle_run([0.0345, 0.0305, 0.0275], before)
    assert calls == 3 and seen["settled"] and seen["waited_s"] == 10.0
    assert seen["after_s"] == [0.0345, 0.0305, 0.0275] and seen["before_s"] == 0.0265
    assert seen["timed_by"] == "engine" and seen["prompt_tokens"] == 1024
    # Already at its speed: one measurement, no wait.
    seen, calls = _settle_run([0.027], before)
    assert calls == 1 and seen["settled"] and seen["waited_s"] == 0.0
    # Never back: it gives up after max_s and says so.
    seen, calls = _settle_run([0.035], before)
    assert not seen["settled"] and seen["waited_s"] == 30.0 and calls == 7
    # Without the engine's histogram before, TTFTs are compared.
    seen, _ = _settle_run([0.0265], PrefillPoint(1024, 0.020, None))
    assert seen["timed_by"] == "ttft" and seen["before_s"] == 0.020 and not seen["settled"]
