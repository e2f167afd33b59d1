"""TTFTCalibration: predictions at the configured percentile, learned online from censored outcomes."""

from __future__ import annotations

import heapq
import math
import random

import numpy as np
import pytest

from qlmctl.core.calibration import STEP, DueQueue, TTFTCalibration, _Key, _Pending


def _replay(cal: TTFTCalibration, ratios: np.ndarray, mean_s: float = 1.0, gap_s: float = 0.1) -> np.ndarray:
    """Requests every `gap_s`, each with the estimator's mean `mean_s` and an actual TTFT of ratio x mean;
    events in time order, as a policy sees them. Returns whether each prediction covered its TTFT."""
    preds = np.empty(len(ratios))
    # (first token time, request), a heap: the earliest first (by request id among equal times)
    events: list[tuple[float, int]] = []
    for i, x in enumerate(ratios):
        now = i * gap_s
        while events and events[0][0] <= now:
            t, rid = heapq.heappop(events)
            cal.advance(t)
            cal.first_token(rid, t)
        cal.advance(now)
        preds[i] = cal.predict(i, now, mean_s, 1.5 * mean_s, key=("m", "c"))
        heapq.heappush(events, (now + x * mean_s, i))
    return ratios <= preds / mean_s


def test_stationary_ratios_are_covered_at_the_percentile():
    rng = np.random.default_rng(1)
    ratios = rng.lognormal(0.0, 0.8, 20_000)  # the p90 ratio is about 2.8
    covered = _replay(TTFTCalibration(0.9), ratios)
    assert abs(covered[2000:].mean() - 0.9) < 0.02


def test_a_load_step_is_followed_without_overshooting():
    # The ratios jump 8x (a queue forms) while hundreds of predictions are in flight (waits of 10-80 s at
    # one arrival every 0.1 s): the factor follows, and does not run far past the new p90.
    rng = np.random.default_rng(2)
    ratios = np.concatenate([rng.lognormal(2.0, 0.3, 5000), 8 * rng.lognormal(2.0, 0.3, 15_000)])
    cal = TTFTCalibration(0.9)
    covered = _replay(cal, ratios, mean_s=1.0)
    assert abs(covered[10_000:].mean() - 0.9) < 0.03
    new_p90 = 8 * math.exp(2.0 + 1.2816 * 0.3)
    assert max(math.exp(v) for v in cal.thetas().values()) < 1.5 * new_p90


def test_a_request_forgotten_before_its_prediction_runs_out_counts_neither_way():
    cal = TTFTCalibration(0.9)
    cal.predict(1, 0.0, 1.0, 2.0, key="k")
    cal.forget(1)
    cal.advance(100.0)
    cal.first_token(1, 100.0)
    assert cal.hits == 0 and cal.misses == 0


def test_a_wait_past_the_prediction_is_a_miss_before_its_first_token():
    cal = TTFTCalibration(0.9)
    cal.predict(1, 0.0, 1.0, 2.0, key="k")  # no history: the first guess, 2 s
    cal.advance(1.9)
    assert cal.misses == 0
    cal.advance(2.1)
    assert cal.misses == 1
    cal.first_token(1, 5.0)  # already counted
    assert (cal.hits, cal.misses) == (0, 1)


def test_outcomes_that_come_together_move_the_factor_once():
    # 500 requests of one key, all started by one swap-in at 30 s (their model was not loaded): one piece of
    # evidence. Counted one by one, their hits would pull the factor down by 500 steps (e^-2.5).
    cal = TTFTCalibration(0.9)
    for i in range(500):
        cal.predict(i, 0.0, 40.0, 40.0, key="k")  # factor 1: predicted 40 s each
    for i in range(500):
        cal.first_token(i, 30.0)
    cal.advance(31.0)
    assert cal.hits == 500
    assert math.exp(cal.thetas()["k"]) > 0.99  # one hit's step: -0.005 in log
    cal.predict(1000, 31.0, 40.0, 40.0, key="k")
    cal.first_token(1000, 31.5)  # a later outcome is a step of its own
    cal.advance(32.0)
    assert cal.thetas()["k"] < -0.009


def test_requests_waiting_on_a_swap_are_predicted_toward_their_deadline():
    # 300 requests whose model is not loaded: the estimate puts their start at 100 s, but the swap comes when
    # their slack runs low and serves them in portions, 120-270 s after arrival (their SLO: 300 s). All are
    # predicted before the first outcome: as a factor on the mean (1) every one missed; as a weight between
    # the mean and the deadline, at the percentile at first, about the percentile are covered (outcomes are
    # judged against the weight of the moment, which the hits bring down).
    cal = TTFTCalibration(0.9)
    preds = [cal.predict(i, i * 0.5, 100.0, 100.0, key="w", ttft_slo_s=300.0) for i in range(300)]
    assert preds[0] == 100.0 + 0.9 * 200.0
    actual = np.linspace(120.0, 270.0, 300)
    events = sorted((i * 0.5 + a, i) for i, a in enumerate(actual))
    for t, i in events:
        cal.advance(t)
        cal.first_token(i, t)
    assert cal.hits + cal.misses == 300 and cal.hits >= 0.9 * 300
    # Hits move the weight down by WEIGHT_STEP's share, not the factor's (a log step would not be bounded).
    assert 0.0 < cal.thetas()["w"] < 0.9
    # A mean beyond the deadline: the deadline.
    assert cal.predict(1000, 200.0, 400.0, 400.0, key="w", ttft_slo_s=300.0) == 300.0


def test_misses_past_the_deadline_do_not_wind_the_weight_up():
    # An overload that makes 400 requests miss their SLO (first tokens past the deadline) then passes: the
    # weight stops at the deadline, so the hits that follow bring predictions back below it at once; unbounded,
    # it would have climbed to about 4 and the next 400 would all be predicted at the deadline.
    cal = TTFTCalibration(0.9)
    for i in range(400):
        cal.predict(i, float(i), 10.0, 10.0, key="w", ttft_slo_s=100.0)
    for i in range(400):
        cal.advance(i + 100.5)  # each one waits past its deadline: a miss, found a second after the one before
    cal.advance(1000.0)
    assert cal.misses == 400 and cal.thetas()["w"] == 1.0
    for i in range(400, 420):
        cal.predict(i, 2000.0 + i, 10.0, 10.0, key="w", ttft_slo_s=100.0)
        cal.first_token(i, 2000.0 + i + 5.0)
    cal.advance(3000.0)
    assert cal.predict(999, 3000.0, 10.0, 10.0, key="w", ttft_slo_s=100.0) < 100.0


def test_misses_found_in_one_late_call_count_when_they_happened():
    # 20 predictions run out one second apart, and the policy looks only once, 30 s later (calls come when
    # the scheduler runs, seconds apart under some loads): they are 20 misses at 20 moments, 20 steps up, not
    # one piece of evidence as outcomes of one moment are.
    cal = TTFTCalibration(0.9)
    for i in range(20):
        cal.predict(i, float(i), 1.0, 1.0, key="k")
    cal.advance(50.0)
    cal.advance(60.0)  # applies the last group
    assert cal.misses == 20
    assert cal.thetas()["k"] == pytest.approx(20 * STEP * 0.9)


@pytest.mark.parametrize("seed", range(20))
def test_the_due_queue_reads_entries_as_a_heap_would(seed: int) -> None:
    """`DueQueue` hands out every live entry due before each reading time, in (time, id) order, as a heap of
    every entry would: entries pushed late (into bins already read, or at times already passed), equal times,
    long gaps, times that are no number, predictions taken out (first tokens) or due again later."""
    rng = random.Random(seed)
    pending: dict[int, _Pending] = {}
    q = DueQueue(pending)
    ref: list[tuple[float, int]] = []
    now = rng.uniform(-1.0, 1.0)
    rid = 0

    def push(due: float, rid: int) -> None:
        pending[rid] = _Pending(0.0, 1.0, _Key("k", 0.0, False), due, None)
        q.push(due, rid)
        if due == due and due < math.inf:
            heapq.heappush(ref, (due, rid))

    for _ in range(2000):
        for _ in range(rng.randrange(4)):
            kind = rng.random()
            if kind < 0.1:
                due = math.floor(now * 16) / 16 + rng.choice([0.0, 1 / 32])  # a bin's edge, or its middle
            elif kind < 0.2:
                due = now - rng.uniform(0.0, 1.0)  # already past
            elif kind < 0.25:
                due = rng.choice([math.nan, math.inf])
            else:
                due = now + rng.expovariate(1.0 / rng.choice([0.01, 0.3, 30.0]))
            rid += 1
            push(due, rid)
        for k in rng.sample(sorted(pending), min(len(pending), rng.randrange(3))):
            del pending[k]  # started
        now += rng.choice([0.0, 0.001, 0.05, 0.3, 2.0, 500.0]) if rng.random() < 0.9 else 0.0
        got = []
        while (e := q.next_before(now)) is not None:
            if not q.live(*e):
                continue
            got.append(e)
            if rng.random() < 0.1:  # due again later (the factor rose): at or after now
                push(now + rng.choice([0.0, rng.uniform(0.0, 0.2)]), e[1])
            elif rng.random() < 0.5:
                del pending[e[1]]  # a miss
        want = []
        while ref and ref[0][0] < now:
            e = heapq.heappop(ref)
            if e in got:
                want.append(e)
            else:
                assert not q.live(*e)  # only stale entries are left out
        assert got == want
