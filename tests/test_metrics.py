"""Metrics against hand-computed numbers (vLLM's formulas, numpy's linear percentiles)."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pandas as pd
import pytest

from qlmctl.core.request import Request
from qlmctl.metrics import FRAME_COLUMNS, LATENCY_METRICS, requests_frame, summarize


def _req(
    rid: int,
    arrival: float,
    *,
    slo_class: str = "interactive",
    model: str = "m1",
    ttft_slo: float = 2.0,
    tpot_slo: float | None = None,
    prompt: int = 10,
    dispatch: float | None = None,
    first: float | None = None,
    finish: float | None = None,
    generated: int = 0,
    instance: int | None = None,
    error: str | None = None,
    preemptions: int = 0,
    evictions: int = 0,
) -> Request:
    return Request(
        request_id=rid,
        arrival_s=arrival,
        model=model,
        slo_class=slo_class,
        ttft_slo_s=ttft_slo,
        prompt_tokens=prompt,
        output_tokens=max(generated, 1),
        tpot_slo_s=tpot_slo,
        dispatch_s=dispatch,
        first_token_s=first,
        finish_s=finish,
        instance_id=instance,
        generated_tokens=generated,
        num_preemptions=preemptions,
        num_evictions=evictions,
        error=error,
    )


def run_requests() -> list[Request]:
    """Six requests with known outcomes (s):

    id  class        model  ttft  tpot         e2el  SLO
    1   interactive  m1     1.0   2/4 = 0.5    3.0   met
    2   interactive  m1     3.0   1/2 = 0.5    4.0   miss (TTFT 3 > 2)
    3   batch        m2     1.0   none (1 tok) 1.0   met (no TPOT to check)
    4   batch        m2     1.0   6/3 = 2.0    7.0   miss (TPOT 2 > 1)
    5   batch        m2     never dispatched         miss (unfinished)
    6   batch        m2     error                    miss (failed)
    """
    return [
        _req(1, 0.0, prompt=10, dispatch=0.5, first=1.0, finish=3.0, generated=5,
             tpot_slo=1.0, instance=0),
        _req(2, 1.0, prompt=20, dispatch=1.0, first=4.0, finish=5.0, generated=3,
             instance=1, preemptions=2),
        _req(3, 2.0, slo_class="batch", model="m2", ttft_slo=10.0, tpot_slo=0.1, prompt=30,
             dispatch=2.5, first=3.0, finish=3.0, generated=1, instance=0),
        _req(4, 3.0, slo_class="batch", model="m2", ttft_slo=10.0, tpot_slo=1.0, prompt=40,
             dispatch=3.0, first=4.0, finish=10.0, generated=4, instance=1, evictions=1),
        _req(5, 4.0, slo_class="batch", model="m2", ttft_slo=10.0, prompt=50),
        _req(6, 5.0, slo_class="batch", model="m2", ttft_slo=10.0, prompt=60, dispatch=5.5,
             first=6.0, finish=6.5, generated=2, instance=0, error="engine died"),
    ]


ITLS = [[0.4, 0.6, 0.5, 0.5], [0.5, 0.5], [], [1.0, 2.0, 3.0], [], [9.0]]


@pytest.fixture
def summary() -> dict:
    return summarize(
        run_requests(), instance_busy_s={"0": 5.0, "1": 10.0}, num_swaps=3, itls=ITLS
    )


def test_counts_tokens_and_throughput(summary: dict) -> None:
    assert summary["num_requests"] == 6
    assert summary["completed"] == 4
    assert summary["failed"] == 2  # the error and the never-finished one
    assert summary["unfinished"] == 1
    assert summary["duration"] == pytest.approx(10.0)  # last finish 10 - first arrival 0
    assert summary["total_input_tokens"] == 10 + 20 + 30 + 40  # completed only, as vLLM
    assert summary["total_output_tokens"] == 5 + 3 + 1 + 4
    assert summary["request_throughput"] == pytest.approx(0.4)
    assert summary["request_goodput"] == pytest.approx(0.2)  # requests 1 and 3
    assert summary["output_throughput"] == pytest.approx(1.3)
    assert summary["total_token_throughput"] == pytest.approx(11.3)


def test_ttft_stats(summary: dict) -> None:
    # ms over completed: [1000, 3000, 1000, 1000]
    assert summary["mean_ttft_ms"] == pytest.approx(1500.0)
    assert summary["median_ttft_ms"] == pytest.approx(1000.0)
    assert summary["p50_ttft_ms"] == summary["median_ttft_ms"]
    assert summary["std_ttft_ms"] == pytest.approx(math.sqrt(750_000))  # population std
    # sorted [1000, 1000, 1000, 3000]; rank 0.9 * 3 = 2.7 -> 1000 + 0.7 * 2000
    assert summary["p90_ttft_ms"] == pytest.approx(2400.0)
    assert summary["p99_ttft_ms"] == pytest.approx(2940.0)


def test_tpot_stats_skip_single_token_outputs(summary: dict) -> None:
    # ms: [500, 500, 2000]; request 3 (one token) has no TPOT.
    assert summary["mean_tpot_ms"] == pytest.approx(1000.0)
    assert summary["median_tpot_ms"] == pytest.approx(500.0)
    assert summary["std_tpot_ms"] == pytest.approx(math.sqrt(500_000))
    assert summary["p90_tpot_ms"] == pytest.approx(1700.0)  # rank 1.8 -> 500 + 0.8 * 1500
    assert summary["p99_tpot_ms"] == pytest.approx(1970.0)


def test_e2el_stats(summary: dict) -> None:
    # ms sorted: [1000, 3000, 4000, 7000]
    assert summary["mean_e2el_ms"] == pytest.approx(3750.0)
    assert summary["median_e2el_ms"] == pytest.approx(3500.0)
    assert summary["p90_e2el_ms"] == pytest.approx(6100.0)  # rank 2.7 -> 4000 + 0.7 * 3000
    assert summary["p99_e2el_ms"] == pytest.approx(6910.0)


def test_itl_pools_completed_requests_only(summary: dict) -> None:
    pooled_ms = np.array([0.4, 0.6, 0.5, 0.5, 0.5, 0.5, 1.0, 2.0, 3.0]) * 1000  # not the 9.0
    assert summary["mean_itl_ms"] == pytest.approx(1000.0)
    assert summary["median_itl_ms"] == pytest.approx(500.0)
    assert summary["p90_itl_ms"] == pytest.approx(2200.0)  # rank 7.2 -> 2000 + 0.2 * 1000
    assert summary["p99_itl_ms"] == pytest.approx(np.percentile(pooled_ms, 99))
    assert summary["std_itl_ms"] == pytest.approx(pooled_ms.std())


def test_itl_is_none_without_per_token_times() -> None:
    s = summarize(run_requests())
    for key in ("mean", "median", "std", "p50", "p90", "p99"):
        assert s[f"{key}_itl_ms"] is None
    assert s["mean_ttft_ms"] == pytest.approx(1500.0)


def test_itls_must_align_with_requests() -> None:
    with pytest.raises(ValueError, match="one per request"):
        summarize(run_requests(), itls=ITLS[:-1])


def test_attainment_counts_unfinished_and_failed_as_misses(summary: dict) -> None:
    assert summary["slo_attainment"] == pytest.approx(2 / 6)
    assert summary["slo_attainment_by_class"] == pytest.approx(
        {"batch": 1 / 4, "interactive": 1 / 2}
    )
    assert summary["slo_attainment_by_model"] == pytest.approx({"m1": 1 / 2, "m2": 1 / 4})
    assert summary["requests_by_class"] == {"batch": 4, "interactive": 2}
    assert summary["requests_by_model"] == {"m1": 2, "m2": 4}


def test_counters_queueing_and_utilisation(summary: dict) -> None:
    assert summary["num_preemptions"] == 2
    assert summary["num_evictions"] == 1
    assert summary["num_swaps"] == 3
    # dispatched: 0.5, 0, 0.5, 0, 0.5 s
    assert summary["mean_queueing_delay_ms"] == pytest.approx(300.0)
    assert summary["p99_queueing_delay_ms"] == pytest.approx(500.0)
    assert summary["instance_utilisation"] == pytest.approx({"0": 0.5, "1": 1.0})
    assert summary["mean_utilisation"] == pytest.approx(0.75)


def test_summary_keys_follow_vllm_names(summary: dict) -> None:
    for key in ("completed", "failed", "total_input_tokens", "total_output_tokens", "duration",
                "request_throughput", "request_goodput", "output_throughput",
                "total_token_throughput"):
        assert key in summary
    for metric in LATENCY_METRICS:
        for stat in ("mean", "median", "std", "p50", "p90", "p99"):
            assert f"{stat}_{metric}_ms" in summary


def test_summary_is_strict_json(summary: dict) -> None:
    text = json.dumps(summary, allow_nan=False)
    assert json.loads(text) == summary


def test_nothing_finished_gives_none_not_nan() -> None:
    s = summarize([_req(1, 0.0), _req(2, 1.0, dispatch=1.5)], instance_busy_s={"0": 1.0})
    json.dumps(s, allow_nan=False)
    assert s["completed"] == 0 and s["failed"] == 2 and s["unfinished"] == 2
    assert s["duration"] is None
    assert s["request_throughput"] is None and s["request_goodput"] is None
    assert s["mean_ttft_ms"] is None and s["p99_e2el_ms"] is None
    assert s["slo_attainment"] == 0.0
    assert s["mean_queueing_delay_ms"] == pytest.approx(500.0)
    assert s["instance_utilisation"] == {"0": None}
    assert s["mean_utilisation"] is None


def test_empty_run() -> None:
    s = summarize([])
    json.dumps(s, allow_nan=False)
    assert s["num_requests"] == 0 and s["completed"] == 0
    assert s["slo_attainment"] is None
    assert s["slo_attainment_by_class"] == {}
    assert s["instance_utilisation"] is None


def test_extra_keys_added_and_collisions_refused() -> None:
    s = summarize(run_requests(), extra={"policy": "qlm", "seed": 7})
    assert s["policy"] == "qlm" and s["seed"] == 7
    with pytest.raises(ValueError, match="completed"):
        summarize(run_requests(), extra={"completed": 1})


def test_vectorised_slo_met_matches_request_property() -> None:
    rng = random.Random(1)
    reqs = []
    for i in range(2000):
        arrival = rng.uniform(0, 100)
        r = _req(i, arrival, ttft_slo=rng.choice([0.5, 1.0, 5.0]),
                 tpot_slo=rng.choice([None, 0.02, 0.05]))
        if rng.random() < 0.9:
            r.dispatch_s = arrival + rng.random()
            r.first_token_s = r.dispatch_s + rng.random()
            r.generated_tokens = rng.choice([1, 2, 10, 100])
            if rng.random() < 0.9:
                r.finish_s = r.first_token_s + rng.random() * 3
            if rng.random() < 0.05:
                r.error = "boom"
        reqs.append(r)
    frame = requests_frame(reqs)
    assert frame["slo_met"].tolist() == [r.slo_met for r in reqs]
    s = summarize(reqs)
    assert s["slo_attainment"] == pytest.approx(sum(r.slo_met for r in reqs) / len(reqs))


def test_requests_frame_rows_and_columns() -> None:
    reqs = run_requests()
    frame = requests_frame(reqs)
    assert list(frame.columns) == list(FRAME_COLUMNS)
    assert len(frame) == len(reqs)
    by_id = frame.set_index("request_id")
    assert by_id.loc[1, "ttft_s"] == pytest.approx(1.0)
    assert by_id.loc[1, "tpot_s"] == pytest.approx(0.5)
    assert by_id.loc[1, "e2el_s"] == pytest.approx(3.0)
    assert math.isnan(by_id.loc[3, "tpot_s"])  # one output token
    assert math.isnan(by_id.loc[5, "finish_s"]) and math.isnan(by_id.loc[5, "ttft_s"])
    assert by_id["slo_met"].tolist() == [True, False, True, False, False, False]
    assert str(frame["instance_id"].dtype) == "Int64"
    assert frame["instance_id"].tolist()[:4] == [0, 1, 0, 1]
    assert pd.isna(frame["instance_id"].iloc[4])
    assert frame["error"].tolist() == [None] * 5 + ["engine died"]
    assert by_id.loc[2, "num_preemptions"] == 2 and by_id.loc[4, "num_evictions"] == 1
    for r, tpot in zip(reqs, frame["tpot_s"]):
        assert (r.tpot_s is None and math.isnan(tpot)) or r.tpot_s == tpot
