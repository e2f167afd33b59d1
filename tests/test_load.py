"""Load through one gateway on loopback: 2,000 requests at once, 300 streams running, bounded memory, none lost.

A smaller CI version of `bench/bench_faults.py --load` (10,000 queued, 1,000 streams): two emulated
engines with 150 batch slots each, every request sent at once, so most wait in the gateway's queues
while 300 stream. Two rounds: the second must not grow the process (no leak), and afterwards nothing
is left in the gateway's queues, books or engines. Figures are printed; assertions have wide margins.
"""

from __future__ import annotations

import asyncio
import gc
import os
import resource
from contextlib import ExitStack

import pytest

from qlmctl.client.outcomes import Tally, call
from qlmctl.emulator.server import start_emulator
from qlmctl.emulator.testing import live_scenario_spec
from qlmctl.engines.http import Pool
from qlmctl.gateway.server import Gateway
from qlmctl.scenario import Scenario, ScenarioSpec
from simulator.profile import EngineProfile

SLOTS = 150
PROFILE = dict(base_s=0.004, per_prefill_token_s=1e-6, per_decode_seq_s=2e-5, per_context_token_s=0.0,
               kv_blocks=20000, block_size=16, max_num_seqs=SLOTS, max_num_batched_tokens=8192, max_model_len=1024,
               load_cold_s=1.0, load_warm_s=0.5)
SPEEDUP = 10
N = 2000
N_OUT = 12


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def words(first: int, n: int) -> str:
    return "".join(f" w{first + j}" for j in range(n))


async def one_round(gw: Gateway, n: int) -> tuple[Tally, int, int]:
    """n streamed requests at once; (outcomes, most queued in the gateway, most in flight on the engines)."""
    pool = Pool(gw.url, max_idle=n)
    peak_q = peak_run = 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak_q, peak_run
        while not done.is_set():
            peak_q = max(peak_q, sum(gw.cluster.queued_by_class.values()))
            peak_run = max(peak_run, sum(len(i.inflight) for i in gw.cluster.instances))
            await asyncio.sleep(0.02)

    sampler = asyncio.ensure_future(sample())
    bodies = [{"model": "m", "prompt": " ".join(f"w{j}" for j in range(4 + i % 5)), "max_tokens": N_OUT,
               "stream": True, "stream_options": {"include_usage": True}} for i in range(n)]
    outs = await asyncio.gather(*(call(pool, "/v1/completions", b, {"x-slo-class": ("interactive", "batch")[i % 2]},
                                       timeout_s=120) for i, b in enumerate(bodies)))
    done.set()
    await sampler
    await pool.aclose()
    t = Tally()
    for o in outs:
        t.add(o)
        if o.kind == "completed":
            assert o.text == words(o.prompt_tokens, N_OUT) and len(o.ids) == 1
    return t, peak_q, peak_run


@pytest.mark.asyncio
async def test_thousands_queued_hundreds_streaming_bounded_memory():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 4 * N + 1000:
        pytest.skip(f"needs {4 * N + 1000} file descriptors, the limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * N + 1000)), hard))
    prof = EngineProfile(model="m", **PROFILE)
    with ExitStack() as stack:
        engines = [stack.enter_context(start_emulator(prof, "m", speedup=SPEEDUP, stream_interval_s=0.02))
                   for _ in range(2)]
        spec = live_scenario_spec(PROFILE, [(f"g{i}", "m", e.url) for i, e in enumerate(engines)], speedup=SPEEDUP,
                                  token_count="chunks", queue_limit=N)
        sc = Scenario(ScenarioSpec.model_validate(spec))
        async with Gateway(sc, "qlm", port=0, record=False) as gw:
            await one_round(gw, 200)  # warm-up: connection pools, allocator arenas
            gc.collect()
            base = rss_mb()
            t1, peak_q, peak_run = await one_round(gw, N)
            gc.collect()
            after1 = rss_mb()
            t2, _, _ = await one_round(gw, N)
            gc.collect()
            after2 = rss_mb()
            print(f"\nload: {N} requests x2: {t1.completed}+{t2.completed} completed, lost {t1.lost + t2.lost}; "
                  f"peak queued {peak_q}, peak streams {peak_run}; RSS {base:.0f} -> {after1:.0f} -> {after2:.0f} MB")
            assert (t1.completed, t1.lost, t2.completed, t2.lost) == (N, 0, N, 0)
            assert peak_q >= N - 2 * SLOTS - 100  # most of them waited in the gateway
            assert peak_run >= 2 * SLOTS * 0.8  # hundreds of streams at once
            assert after2 - after1 < 30, "memory grows from one round to the next"
            c = gw.cluster
            assert c.num_active() == 0 and sum(c.queued_by_class.values()) == 0
            assert gw.policy.num_queued() == 0
            assert all(not i.inflight and i.kv_tokens == 0 for i in c.instances)
            assert not c.records  # record=False keeps nothing per request
