"""The event-skipping engine model: closed forms and invariants (hypothesis)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulator.api_server import RATE_WINDOW_S, APIServer
from simulator.engine import Engine, OutputKind, Sequence
from simulator.profile import TYPICAL_CONTEXT_TOKENS, admission_blocks, chunk_pairs, kv_blocks_for
from tests.conftest import small_profile


def run_all(engine: Engine, seqs: list[Sequence], arrivals: list[float]) -> list:
    """Submit each sequence at its arrival time and advance through everything, checking at every step
    that simulated time never goes back and that KV use and the batch stay within their limits."""
    outs = []
    t_prev = -1.0
    pending = sorted(zip(arrivals, range(len(seqs))))
    i = 0
    while True:
        nxt = pending[i][0] if i < len(pending) else math.inf
        t = min(nxt, engine.next_event_time())
        if t == math.inf:
            break
        assert t >= t_prev  # simulated time never goes back
        t_prev = t
        outs.extend(engine.advance(t))
        while i < len(pending) and pending[i][0] <= t:
            engine.submit(seqs[pending[i][1]], t)
            i += 1
        outs.extend(engine.advance(t))
        assert engine.used_blocks <= engine.total_blocks
        assert engine.num_running <= engine.profile.max_num_seqs
    return outs


def test_lone_request_ttft_is_prefill_time():
    p = small_profile(max_num_batched_tokens=512)
    for prompt in (1, 100, 512, 513, 2000):
        e = Engine(p)
        q = Sequence(0, prompt, 10)
        e.submit(q, 0.0)
        outs = e.advance(math.inf)
        first = next(o for o in outs if o.kind is OutputKind.FIRST_TOKEN)
        assert first.time == pytest.approx(p.prefill_time(prompt), rel=1e-12)


def test_lone_request_decode_closed_form():
    p = small_profile()
    e = Engine(p)
    q = Sequence(0, 100, 50)
    e.submit(q, 0.0)
    outs = e.advance(math.inf)
    fin = next(o for o in outs if o.kind is OutputKind.FINISHED)
    # 49 decode steps of one sequence whose context grows from 101 tokens.
    decode = sum(p.step_time(0, 1, 101 + k) for k in range(49))
    assert fin.time == pytest.approx(p.prefill_time(100) + decode, rel=1e-9)
    assert q.generated == 50


def test_steps_with_prefill_pay_the_prefill_step_cost_and_decode_steps_do_not():
    m = 0.004
    p = small_profile(max_num_batched_tokens=512)
    pm = p.with_overrides(per_prefill_step_s=m)
    for prompt, chunks in ((100, 1), (512, 1), (1300, 3)):
        e = Engine(pm)
        q = Sequence(0, prompt, 20)
        e.submit(q, 0.0)
        outs = e.advance(math.inf)
        first = next(o for o in outs if o.kind is OutputKind.FIRST_TOKEN).time
        fin = next(o for o in outs if o.kind is OutputKind.FINISHED).time
        # Every prefill chunk is one step that pays m; the 19 decode steps after it do not.
        assert first == pytest.approx(p.prefill_time(prompt) + chunks * m, rel=1e-12)
        decode = sum(p.step_time(0, 1, prompt + 1 + k) for k in range(19))
        assert fin - first == pytest.approx(decode, rel=1e-9)
    assert pm.step_time(64, 8, 800) - p.step_time(64, 8, 800) == pytest.approx(m)
    assert pm.step_time(0, 8, 800) == p.step_time(0, 8, 800)


def test_preemption_when_kv_runs_out_and_everything_still_finishes():
    p = small_profile(kv_blocks=40, max_num_seqs=16)
    e = Engine(p)
    seqs = [Sequence(i, 100, 200) for i in range(8)]
    run_all(e, seqs, [0.0] * 8)
    assert e.stats.preemptions > 0
    assert all(q.generated == 200 for q in seqs)
    assert e.used_blocks == 0 and e.stats.peak_blocks <= 40


def test_abort_frees_everything():
    p = small_profile()
    e = Engine(p)
    a, b = Sequence(0, 100, 1000), Sequence(1, 100, 10)
    e.submit(a, 0.0)
    e.submit(b, 0.0)
    e.advance(0.05)
    e.abort(a, 0.05)
    outs = e.advance(math.inf)
    kinds = [(o.kind, o.seq.seq_id) for o in outs]
    assert (OutputKind.ABORTED, 0) in kinds and (OutputKind.FINISHED, 1) in kinds
    assert 0 < a.generated < 1000
    assert e.used_blocks == 0 and e.num_running == 0


def test_generated_is_monotone_within_a_segment():
    p = small_profile()
    e = Engine(p)
    q = Sequence(0, 10, 300)
    e.submit(q, 0.0)
    e.advance(0.01)
    seen = [e.generated(q, t / 100) for t in range(1, 100)]
    assert seen == sorted(seen) and seen[-1] > 1


seq_strategy = st.lists(
    st.tuples(
        st.floats(0, 5, allow_nan=False),  # arrival
        st.integers(1, 600),  # prompt
        st.integers(1, 150),  # output
        st.integers(0, 2),  # priority
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(reqs=seq_strategy, kv=st.integers(45, 300), seqs_cap=st.integers(1, 12),
       budget=st.sampled_from([64, 256, 2048]), policy=st.sampled_from(["fcfs", "priority"]))
def test_engine_invariants(reqs, kv, seqs_cap, budget, policy):
    p = small_profile(kv_blocks=kv, max_num_seqs=seqs_cap, max_num_batched_tokens=budget)
    e = Engine(p, policy)
    seqs = [Sequence(i, pr, out, prio, arr) for i, (arr, pr, out, prio) in enumerate(reqs)]
    # Every request fits the cache on its own (else vLLM would reject it too).
    seqs = [q for q in seqs if p.blocks_for(q.prompt_tokens + q.max_tokens + 1) <= kv]
    outs = run_all(e, seqs, [q.arrival_s for q in seqs])
    finished = [o.seq.seq_id for o in outs if o.kind is OutputKind.FINISHED]
    assert sorted(finished) == sorted(q.seq_id for q in seqs)  # each exactly once
    assert all(q.generated == q.max_tokens for q in seqs)  # tokens conserved
    firsts = {}
    for o in outs:
        if o.kind is OutputKind.FIRST_TOKEN:
            assert o.seq.seq_id not in firsts
            firsts[o.seq.seq_id] = o.time
    fin_t = {o.seq.seq_id: o.time for o in outs if o.kind is OutputKind.FINISHED}
    for q in seqs:
        assert q.arrival_s <= firsts[q.seq_id] <= fin_t[q.seq_id]
    assert e.used_blocks == 0 and e.stats.peak_blocks <= kv and e.stats.peak_running <= seqs_cap
    times = [o.time for o in outs]
    assert times == sorted(times)


def test_a_delayed_submit_reaches_the_engine_late_and_waits_meanwhile():
    p = small_profile()
    e = Engine(p)
    q = Sequence(0, 100, 10)
    free = e.free_blocks
    e.submit(q, 0.0, delay_s=0.25)
    # In transit it counts as waiting here and holds its KV blocks against new dispatches.
    assert e.num_waiting == 1 and e.free_blocks == free - e._blocks_needed(q)
    assert e.next_event_time() == pytest.approx(0.25)
    outs = e.advance(math.inf)
    first = next(o for o in outs if o.kind is OutputKind.FIRST_TOKEN)
    assert first.time == pytest.approx(0.25 + p.prefill_time(100), rel=1e-12)
    assert any(o.kind is OutputKind.FINISHED for o in outs) and e.free_blocks == free


def test_abort_in_transit_never_runs():
    p = small_profile()
    e = Engine(p)
    a, b = Sequence(0, 100, 10), Sequence(1, 100, 10)
    e.submit(a, 0.0, delay_s=0.5)
    e.submit(b, 0.0, delay_s=0.1)
    e.advance(0.2)
    e.abort(a, 0.2)
    outs = e.advance(math.inf)
    assert [(o.kind, o.time) for o in outs if o.seq is a] == [(OutputKind.ABORTED, 0.2)]
    assert b.generated == 10 and a.generated == 0
    assert e.num_waiting == 0 and e.used_blocks == 0 and e.free_blocks == e.total_blocks


def test_frontend_wait_grows_with_streams_and_arrivals_and_is_bounded():
    p = small_profile(frontend_cpu_per_request_s=0.005, frontend_cpu_per_token_s=6e-5, frontend_queue_factor=2.0)
    assert small_profile().frontend_wait(100, 0.02, 10.0) == 0.0  # no queue model by default
    waits = [p.frontend_wait(n, 0.02, 10.0) for n in (0, 50, 100, 200)]
    assert waits == sorted(waits) and waits[0] > 0
    assert p.frontend_wait(100, 0.02, 20.0) > p.frontend_wait(100, 0.02, 5.0)
    # Pollaczek-Khinchine by hand at 100 streams, 20 ms steps, 10 requests/s.
    burst = 100 * 6e-5
    rho = burst / 0.02 + 10 * 0.005
    r = burst ** 2 / (2 * 0.02) + 10 * 0.005 ** 2 / 2
    assert p.frontend_wait(100, 0.02, 10.0) == pytest.approx(2.0 * r / (1 - rho))
    # Past saturation the wait stops growing without bound (rho is capped).
    assert p.frontend_wait(10_000, 0.02, 10.0) < math.inf


def test_api_servers_share_streams_and_arrivals():
    p = small_profile(frontend_cpu_per_request_s=0.005, frontend_cpu_per_token_s=6e-5, frontend_queue_factor=2.0)
    p4 = p.with_overrides(api_server_count=4)
    # Four processes: each takes a quarter of the streams and of the arrivals, and waits that much less.
    assert p4.frontend_wait(200, 0.02, 16.0) == pytest.approx(p.frontend_wait(50, 0.02, 4.0))
    assert p4.frontend_wait(200, 0.02, 16.0) < p.frontend_wait(200, 0.02, 16.0) / 4


def test_rows_beyond_the_knee_cost_the_token_rate_prefill_and_decode_alike():
    p = small_profile(knee_tokens=64)
    a = p.per_prefill_token_s
    # Below the knee, decode rows and the first prefill tokens ride on the weight read (base_s).
    assert p.step_time(16, 32, 0) == pytest.approx(p.step_time(0, 32, 0))
    assert p.step_time(48, 32, 0) - p.step_time(0, 32, 0) == pytest.approx(16 * a)
    # A decode-only batch beyond the knee pays for its extra rows too.
    assert p.step_time(0, 100, 0) - p.step_time(0, 99, 0) == pytest.approx(p.per_decode_seq_s + a)
    assert p.step_time(0, 40, 0) - p.step_time(0, 39, 0) == pytest.approx(p.per_decode_seq_s)
    # Without a knee the model stays linear in prefill tokens only.
    lin = small_profile()
    assert lin.step_time(0, 100, 0) - lin.step_time(0, 99, 0) == pytest.approx(lin.per_decode_seq_s)
    assert lin.step_time(10, 100, 0) - lin.step_time(0, 100, 0) == pytest.approx(10 * lin.per_prefill_token_s)


def test_kv_block_counts():
    assert [kv_blocks_for(n, 16) for n in (0, 1, 16, 17, 32, 33)] == [0, 1, 1, 2, 2, 3]
    # Admission also needs room for the first new token.
    assert [admission_blocks(n, 16) for n in (1, 15, 16, 31)] == [1, 1, 2, 2]
    e = Engine(small_profile(block_size=8))
    assert e._blocks_needed(Sequence(0, 16, 4)) == admission_blocks(16, 8) == 3


def test_prefill_work_is_a_lone_prefill_without_the_fixed_step_cost():
    p = small_profile(per_prefill_pair_s=1e-9, per_prefill_step_s=1e-3)  # no knee: every prefill token billed
    for n in (1, 100, 512):  # one chunk of the 512-token budget
        assert p.prefill_work_s(n) == pytest.approx(p.prefill_time(n) - p.base_s, rel=1e-12)
    # Two chunks: two steps' prefill extra, and the causal pairs do not depend on the chunking.
    assert p.prefill_work_s(1000) == pytest.approx(p.prefill_time(1000) - 2 * p.base_s, rel=1e-12)


def test_a_decode_step_estimated_ahead_reads_the_typical_context():
    p = small_profile()
    assert p.decode_step_time(8) - p.decode_step_time(0) == pytest.approx(
        8 * (p.per_decode_seq_s + TYPICAL_CONTEXT_TOKENS * p.per_context_token_s))
    q = p.with_overrides(frontend_cpu_per_token_s=6e-5, frontend_queue_factor=2.0)
    assert q.client_delay(8) == q.frontend_delay(8) + q.frontend_wait(8, q.decode_step_time(8), 0.0) > 0.0


def test_api_server_delays_are_the_profiles_at_the_engines_state():
    p = small_profile(frontend_latency_s=0.01, frontend_per_stream_s=1e-3, frontend_cpu_per_request_s=0.005,
                      frontend_cpu_per_token_s=6e-5, frontend_queue_factor=2.0)
    e = Engine(p)
    api = APIServer(e)
    assert api.frontend_delay() == p.frontend_delay(0) == 0.01
    # The first arrival: a rate of one per window, an idle engine whose step is the fixed cost.
    assert api.ingress_delay(0.0) == p.frontend_wait(0, p.base_s, 1.0 / RATE_WINDOW_S)
    for i in range(3):
        e.submit(Sequence(i, 100, 500), 0.0)
    e.advance(0.5)
    assert e.num_running == 3 and api.frontend_delay() == p.frontend_delay(3)
    rate = 1.0 / RATE_WINDOW_S * math.exp(-0.5 / RATE_WINDOW_S) + 1.0 / RATE_WINDOW_S
    assert api.ingress_delay(0.5) == p.frontend_wait(3, e.step_s(), rate) > p.frontend_wait(0, p.base_s, 1.0)
    assert api.arrival_rate(2.5) == pytest.approx(rate * math.exp(-2.0 / RATE_WINDOW_S))
    # No model loaded (a swap under way): no delay, but the arrival still counts.
    idle = Engine(p)
    idle.load_model(p, 0.0, 1.0)
    api = APIServer(idle)
    assert api.frontend_delay() == 0.0 and api.ingress_delay(0.0) == 0.0
    assert api.arrival_rate(0.0) == 1.0 / RATE_WINDOW_S


def test_api_server_over_a_window_sees_the_tokens_streamed_and_the_steps():
    p = small_profile(frontend_cpu_per_request_s=0.005, frontend_cpu_per_token_s=6e-5, frontend_queue_factor=2.0,
                      frontend_window_s=0.25)
    e = Engine(p)
    api = APIServer(e)
    assert api.ingress_delay(0.0) == p.frontend_wait_rates(0.0, 0.0, 1.0 / RATE_WINDOW_S)
    for i in range(3):
        e.submit(Sequence(i, 100, 500), 0.0)
    e.advance(0.5)
    tokens, steps = e.streamed(0.5)
    assert tokens > 3 * 0.5 / e.step_s() * 0.9 and steps > 0
    rate = 1.0 / RATE_WINDOW_S * math.exp(-0.5 / RATE_WINDOW_S) + 1.0 / RATE_WINDOW_S
    grow = (1 - math.exp(-0.5 / 0.25)) / 0.5
    assert api.ingress_delay(0.5) == p.frontend_wait_rates(tokens * grow, steps * grow, rate) > 0.0


def test_api_server_wait_follows_the_window_not_the_step_in_flight():
    """A request that arrives during a short decode-only step between long prefill steps waits what the
    server's recent load says; the step in flight alone would put it near saturation."""
    p = small_profile(frontend_cpu_per_request_s=0.005, frontend_cpu_per_token_s=7e-5, frontend_queue_factor=2.0)
    # 200 streams: 15 ms decode-only steps alternating with 60 ms prefill steps (a window of 37.5 ms steps).
    window = p.frontend_wait_rates(200 / 0.0375, 1 / 0.0375, 10.0)
    in_flight = p.frontend_wait(200, 0.015, 10.0)
    assert in_flight > 0.1 and window < in_flight / 10
    # A steady batch is the same either way.
    assert p.frontend_wait(64, 0.02, 10.0) == pytest.approx(p.frontend_wait_rates(64 / 0.02, 50.0, 10.0))


def test_on_admit_reports_each_admission_at_its_boundary():
    p = small_profile(max_num_seqs=1)
    admitted: list[tuple[int, float]] = []
    e = Engine(p, on_admit=lambda q, t: admitted.append((q.seq_id, t)))
    outs = run_all(e, [Sequence(i, 100, 10) for i in range(3)], [0.0, 0.0, 0.01])
    fin = {o.seq.seq_id: o.time for o in outs if o.kind is OutputKind.FINISHED}
    # One batch slot: each request is admitted once, at the boundary where the one before it finished.
    assert admitted == [(0, 0.0), (1, fin[0]), (2, fin[1])]
    # With asynchronous scheduling a request arriving mid-step is admitted a step later, and reported then.
    admitted.clear()
    e = Engine(small_profile(async_scheduling=True), on_admit=lambda q, t: admitted.append((q.seq_id, t)))
    outs = run_all(e, [Sequence(0, 10, 50), Sequence(1, 10, 5)], [0.0, 0.001])
    first1 = next(o.time for o in outs if o.kind is OutputKind.FIRST_TOKEN and o.seq.seq_id == 1)
    assert admitted[0] == (0, 0.0) and admitted[1][0] == 1 and 0.001 < admitted[1][1] < first1


def test_async_scheduling_admits_an_arrival_after_the_step_already_scheduled():
    """vLLM's engine core with asynchronous scheduling picks a request up at the end of the step in flight,
    when the step after it is already scheduled: it joins the one after that, even where the step in flight
    ends the segment for another reason (here the first request's prefill)."""
    admitted: dict[int, float] = {}
    e = Engine(small_profile(async_scheduling=True), on_admit=lambda q, t: admitted.setdefault(q.seq_id, t))
    outs = run_all(e, [Sequence(0, 10, 50), Sequence(1, 10, 5)], [0.0, 0.001])
    first = {o.seq.seq_id: o.time for o in outs if o.kind is OutputKind.FIRST_TOKEN}
    step = first[0]  # the prefill step of request 0, in flight when request 1 arrived
    # Request 0's first token ends that step; request 1 is admitted one (decode) step later, not there.
    assert admitted[1] == pytest.approx(step + e.profile.step_time(0, 1, 11), rel=1e-6)
    assert first[1] > admitted[1] > first[0]
    # Without asynchronous scheduling it joins the step right after the one in flight.
    admitted.clear()
    e = Engine(small_profile(async_scheduling=False), on_admit=lambda q, t: admitted.setdefault(q.seq_id, t))
    outs = run_all(e, [Sequence(0, 10, 50), Sequence(1, 10, 5)], [0.0, 0.001])
    first0 = next(o.time for o in outs if o.kind is OutputKind.FIRST_TOKEN and o.seq.seq_id == 0)
    assert admitted[1] == first0
    # A late arrival aborted before the boundary where it would have been admitted leaves with nothing owed.
    e = Engine(small_profile(async_scheduling=True))
    a, b = Sequence(0, 10, 50), Sequence(1, 10, 5)
    e.submit(a, 0.0)
    e.advance(0.0005)
    e.submit(b, 0.001)
    e.abort(b, 0.0015)
    outs = e.advance(10.0)
    assert [o.kind for o in outs if o.seq is b] == [OutputKind.ABORTED]
    assert any(o.kind is OutputKind.FINISHED and o.seq is a for o in outs) and e.num_waiting == 0
    # An idle engine takes an arrival at once either way.
    admitted.clear()
    e = Engine(small_profile(async_scheduling=True), on_admit=lambda q, t: admitted.setdefault(q.seq_id, t))
    run_all(e, [Sequence(0, 10, 2), Sequence(1, 10, 2)], [0.0, 5.0])
    assert admitted == {0: 0.0, 1: 5.0}


def test_on_admit_fires_again_after_a_preemption_and_changes_nothing():
    p = small_profile(kv_blocks=40, max_num_seqs=16)
    admitted: dict[int, list[float]] = {}
    seqs = [Sequence(i, 100, 200) for i in range(8)]
    outs = run_all(Engine(p, on_admit=lambda q, t: admitted.setdefault(q.seq_id, []).append(t)), seqs, [0.0] * 8)
    assert sum(q.num_preemptions for q in seqs) > 0
    for q in seqs:
        assert len(admitted[q.seq_id]) == 1 + q.num_preemptions
    first = {o.seq.seq_id: o.time for o in outs if o.kind is OutputKind.FIRST_TOKEN}
    assert all(admitted[i][0] < first[i] for i in first)
    plain = run_all(Engine(p), [Sequence(i, 100, 200) for i in range(8)], [0.0] * 8)
    assert [(o.kind, o.time, o.seq and o.seq.seq_id) for o in plain] == \
        [(o.kind, o.time, o.seq and o.seq.seq_id) for o in outs]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 2), st.integers(1, 300), st.integers(1, 200), st.integers(0, 1)),
                min_size=2, max_size=30), st.sampled_from(["fcfs", "priority"]))
def test_admission_never_takes_the_blocks_the_running_decodes_need(reqs, policy):
    """vLLM schedules the running sequences first and admits waiting ones only into what is left, in a step
    that preempted nothing: so no sequence is preempted at the boundary where one was admitted."""
    p = small_profile(kv_blocks=60, max_num_seqs=8)
    admitted: dict[int, float] = {}
    e = Engine(p, policy, on_admit=lambda q, t: admitted.__setitem__(q.seq_id, t))
    seqs = [Sequence(i, n, m, prio) for i, (_, n, m, prio) in enumerate(reqs)]
    outs = run_all(e, seqs, [a for a, *_ in reqs])
    preempted_at = {o.time for o in outs if o.kind is OutputKind.PREEMPTED}
    assert not preempted_at & set(admitted.values())
    assert all(q.generated == q.max_tokens for q in seqs)


def test_priority_preempts_the_least_urgent_that_reached_the_engine_last():
    p = small_profile(kv_blocks=26, max_num_seqs=8, max_num_batched_tokens=2048)
    e = Engine(p, "priority")
    a, b, c = Sequence(0, 100, 300, priority=1), Sequence(1, 100, 300, priority=1), Sequence(2, 100, 300, priority=0)
    e.submit(a, 0.0)
    e.submit(b, 0.001, delay_s=0.01)  # its arrival time is when it reaches the engine
    e.submit(c, 0.002, delay_s=0.02)
    outs = e.advance(math.inf)
    assert b.arrival_s == pytest.approx(0.011) and c.arrival_s == pytest.approx(0.022)
    victims = [o.seq.seq_id for o in outs if o.kind is OutputKind.PREEMPTED]
    assert victims and victims[0] == 1  # b: priority 1 like a, but later
    assert all(q.generated == 300 for q in (a, b, c))


def test_prefix_cache_skips_the_prefill_of_a_cached_prefix():
    from simulator.prefix import PromptBlocks

    p = small_profile(max_num_batched_tokens=4096, kv_blocks=2000)
    shared = PromptBlocks(512, (7, 8))
    first = Sequence(0, 1100, 4, prefix=shared)
    e = Engine(p)
    e.submit(first, 0.0)
    e.advance(math.inf)
    assert e.stats.prefix_hits == 0 and len(e.prefix_cache) == 2
    second = Sequence(1, 1100, 4, prefix=PromptBlocks(512, (7, 8, 9)))  # shares 1,024 tokens, then goes on
    t0 = e._clock
    e.submit(second, t0)
    outs = e.advance(math.inf)
    ttft = next(o.time for o in outs if o.kind is OutputKind.FIRST_TOKEN and o.seq is second) - t0
    assert e.stats.prefix_hits == 1024 and e.stats.prefix_queries == 2200
    assert ttft == pytest.approx(p.step_time(1100 - 1024, 0, 0, 76 * (1024 + 77 / 2)), rel=1e-9)
    # A prompt entirely cached still computes its last token (in whole KV blocks: the last 16).
    third = Sequence(2, 1024, 4, prefix=PromptBlocks(512, (7, 8)))
    e.submit(third, e._clock)
    e.advance(math.inf)
    assert e.stats.prefix_hits == 1024 + 1008


def test_prefix_cache_lives_in_the_free_blocks_and_is_off_when_the_engine_says_so():
    from simulator.prefix import PrefixCache, PromptBlocks

    c = PrefixCache(16)
    c.insert(PromptBlocks(512, (1, 2, 3)), 1536, capacity=64)  # 3 x 32 blocks do not fit in 64
    assert len(c) == 2 and c.blocks == 64 and c.match(PromptBlocks(512, (1,)), 2000) == 0  # LRU went first
    assert c.match(PromptBlocks(512, (2, 3)), 2000) == 1024
    off = Engine(small_profile(enable_prefix_caching=False))
    off.submit(Sequence(0, 600, 2, prefix=PromptBlocks(512, (1,))), 0.0)
    off.advance(math.inf)
    off.submit(Sequence(1, 600, 2, prefix=PromptBlocks(512, (1,))), off._clock)
    off.advance(math.inf)
    assert off.prefix_cache is None and off.stats.prefix_hits == 0


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.integers(1, 300), st.integers(1, 60)), min_size=1, max_size=25),
       st.sampled_from(["fcfs", "priority"]), st.floats(0.0, 0.05))
def test_pending_prefill_tokens_counts_what_is_handed_over_and_not_prefilled(reqs, policy, delay):
    p = small_profile(kv_blocks=60, max_num_seqs=6)
    e = Engine(p, policy)
    seqs = [Sequence(i, n, m) for i, (_, n, m) in enumerate(reqs)]
    pending = sorted((a, i) for i, (a, _, _) in enumerate(reqs))
    k = 0
    sent: list[Sequence] = []
    while True:
        t = min(pending[k][0] if k < len(pending) else math.inf, e.next_event_time())
        if t == math.inf:
            break
        e.advance(t)
        while k < len(pending) and pending[k][0] <= t:
            sent.append(seqs[pending[k][1]])
            e.submit(sent[-1], t, delay_s=delay)
            k += 1
        if k == len(pending) and k % 7 == 3:
            e.abort(sent[0], t)  # an abort on the way or in the queue too
        e.advance(t)
        expected = sum(q.prompt_tokens + q.generated for q in sent if q.state.name in ("TRANSIT", "WAITING")) \
            + sum(q.prefill_left for q in sent if q.state.name == "PREFILL")
        assert e.pending_prefill_tokens == expected
    assert e.pending_prefill_tokens == 0


def _first_tokens(p, prompts: list[int], at: list[float]) -> list[float]:
    e = Engine(p)
    seqs = [Sequence(i, n, 1) for i, n in enumerate(prompts)]
    outs = run_all(e, seqs, at)
    return sorted(o.time for o in outs if o.kind is OutputKind.FIRST_TOKEN)


def test_sustained_prefill_load_slows_prefill_work_once_its_window_fills():
    # Prompts of one budget each, all queued at 0: every step is a lone prefill, 80 % of it prefill work.
    p = small_profile(max_num_batched_tokens=512)
    tau, s = 0.1, 0.1
    slow = p.with_overrides(sustained_prefill_slowdown=s, sustained_prefill_share=0.6, sustained_window_s=tau)
    step = p.step_time(512, 0, 0, chunk_pairs(0, 512))
    work = step - p.base_s
    share = work / step
    assert 0.75 < share < 0.85
    plain = _first_tokens(p, [512] * 40, [0.0] * 40)
    assert [b - a for a, b in zip(plain, plain[1:])] == pytest.approx([step] * 39, rel=1e-9)
    got = _first_tokens(slow, [512] * 40, [0.0] * 40)
    gaps = [got[0]] + [b - a for a, b in zip(got, got[1:])]
    # The share of prefill work over the window, share * (1 - exp(-t / tau)), passes 0.6 at the crossing: steps
    # that start before it run at the profile's speed, the rest pay the slowdown on their prefill work.
    cross = -tau * math.log(1.0 - 0.6 / share)
    starts = [0.0] + got[:-1]
    for start, gap in zip(starts, gaps):
        want = step + (s * work if start >= cross * (1 + 1e-9) else 0.0)
        if abs(start - cross) > step:  # (the step that starts at the crossing may fall either side of it)
            assert gap == pytest.approx(want, rel=1e-9)
    assert sum(g > step * (1 + 1e-6) for g in gaps) >= 30


def test_sustained_slowdown_spares_a_lone_prefill_and_decode_steps():
    p = small_profile(max_num_batched_tokens=512)
    slow = p.with_overrides(sustained_prefill_slowdown=0.5, sustained_prefill_share=0.6, sustained_window_s=0.1)
    # A lone prompt on an idle engine, and one long after a burst of prefill work: both at the profile's speed.
    assert _first_tokens(slow, [300], [0.0]) == pytest.approx([p.prefill_time(300)], rel=1e-12)
    burst = _first_tokens(slow, [512] * 20 + [300], [0.0] * 20 + [50.0])
    assert burst[-1] - 50.0 == pytest.approx(p.prefill_time(300), rel=1e-9)
    assert burst[19] > _first_tokens(p, [512] * 20, [0.0] * 20)[-1]  # (the burst itself did slow down)
    # Decode steps never pay it: one request's decode after a slowed burst is the plain decode.
    e = Engine(slow)
    seqs = [Sequence(i, 512, 1) for i in range(20)] + [Sequence(20, 100, 30)]
    outs = run_all(e, seqs, [0.0] * 21)
    last = [o for o in outs if o.seq is seqs[20]]
    first = next(o.time for o in last if o.kind is OutputKind.FIRST_TOKEN)
    fin = next(o.time for o in last if o.kind is OutputKind.FINISHED)
    assert fin - first == pytest.approx(sum(p.step_time(0, 1, 101 + k) for k in range(29)), rel=1e-9)
