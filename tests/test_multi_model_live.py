"""One meaning for a multi-model scenario in both worlds: scenarios/multi_model_live.yaml (three models on two
GPUs, sleep-mode swaps) replayed live through the gateway in front of emulated engines and simulated, with
attainment within 3 points on 1,000 requests (fewer leave the interactive class so few requests that a
swap decided a second apart moves it by more; bench/bench_multi_model_live.py runs the whole 2,000).

Within 3 points of what, though: a swap is decided when an instance's last request of a model finishes, and on
this scenario a decision taken a fraction of a second later can keep a model loaded for 20 s more. The
simulation alone shows it: the same requests, each arriving up to half a second later, simulate (12 draws and
the unperturbed run) to qlm attainment between 97.6 and 99.4 %, fcfs 97.2-99.3 %. A live run is one draw of
such timing (its client and gateway are late by tens to hundreds of milliseconds), so it is held within 3
points of the range the simulation spans under that perturbation, the unperturbed run included."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlmctl.emulator.testing import process_emulators
from qlmctl.gateway.run import run_live
from qlmctl.runner import late_arrival_range, simulate
from qlmctl.scenario import load_scenario
from qlmctl.workload import build_requests

SCENARIO = Path(__file__).resolve().parents[1] / "scenarios" / "multi_model_live.yaml"


@pytest.mark.asyncio
async def test_simulated_and_live_attainment_agree_with_sleep_mode_swaps():
    # Real time, not the scenario's 4x: wall-clock slack for a host whose CPUs are busy with other work (the
    # live side fell 3-6 points behind there at 4x, 3.2 at 2x, its engines and gateway starved of CPU). The
    # engines run in a process of their own, as real ones do (sharing the gateway's GIL, they held its event
    # loop back: lag p99 54-71 ms on an idle 2-core machine, 22 ms apart).
    speedup = 1.0
    base = load_scenario(SCENARIO, {"workload": {"max_requests": 1000}})
    specs = base.spec.live.engines
    with process_emulators([(base.profile(e.model, e.gpu), e.model) for e in specs], speedup=speedup) as emus:
        engines = [dict(e.model_dump(), url=h.url) for e, h in zip(specs, emus)]
        sc = load_scenario(SCENARIO, {"workload": {"max_requests": 1000},
                                      "live": {"engines": engines, "port": 0, "speedup": speedup}})
        requests, _ = build_requests(sc)
        for policy in ("fcfs", "qlm"):
            live = await run_live(sc, policy, requests)
            sim = simulate(sc, policy, requests)
            assert live.summary["completed"] == sim.summary["completed"] == 1000
            assert live.summary["num_swaps"] > 0 and sim.summary["num_swaps"] > 0
            lo, hi = late_arrival_range(sc, policy, requests, late_s=0.5, draws=12,
                                        as_they_are=sim.summary["slo_attainment"])
            got = live.summary["slo_attainment"]
            # Within 3 points, counted in requests (30 of 1,000), so that 0.96 against 0.99 is not lost to rounding.
            below, above = round((lo - got) * 1000), round((got - hi) * 1000)
            assert below <= 30 and above <= 30, (policy, got, lo, hi)
