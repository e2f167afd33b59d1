"""One vLLM V1 engine instance as a passive, event-skipping state machine.

What is modelled (vLLM V1's scheduler, `vllm/v1/core/sched/scheduler.py`): continuous batching in engine
steps. Each step first serves the running sequences in admission order: one token to every decoding sequence,
then the rest of the token budget (`max_num_batched_tokens`) to prefill chunks, FIFO over prefilling
sequences. KV memory is paged in blocks of `block_size` tokens; a decode that crosses a block boundary takes a
new block, and when none is free the engine preempts (by recompute) the last admitted sequence (`fcfs`) or
the least urgent one, `max(running, key=(priority, arrival_time))` (`priority`), which goes back to the
waiting queue (its front in fcfs, its place by (priority, arrival time) in priority). Only in a step that
preempted nothing does it admit waiting sequences, in queue order, while a batch slot (`max_num_seqs`), budget
and KV blocks beyond what the decodes take are free, stopping at the first that does not fit. A sequence's
arrival time is when it reaches the engine (vLLM's API server stamps it as it hands the request over).

How it stays fast: between two boundaries the batch composition is fixed, so a run of `n` identical
steps is summed in closed form (step cost is linear, context grows by D tokens a step), and the step
at which the next sequence finishes, the next prefill completes, or the KV cache runs out is computed
directly (a heap of finish steps; per-phase counters for block boundaries). Work per sequence is O(log n),
independent of its token count.

The engine never reads a clock: the driver calls `advance(t)` to process boundaries up to t, and
`submit`/`abort`/`load_model`, which take effect at the end of the step in flight.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from heapq import heapify, heappop, heappush
from typing import Any, Final

from simulator.prefix import PrefixCache, PromptBlocks
from simulator.profile import (
    DEFAULT_BLOCK_SIZE,
    EngineProfile,
    admission_blocks,
    chunk_pairs,
)

INF: Final = math.inf
ORDER_BITS: Final = 32
"""Bits of an admit order in a `_decode_heap` entry (an engine admits far fewer sequences than 2^32)."""
ORDER_MASK: Final = (1 << ORDER_BITS) - 1


class SeqState(IntEnum):
    WAITING = 0
    PREFILL = 1
    DECODE = 2
    DONE = 3
    TRANSIT = 4
    """Submitted but not yet at the engine (held up in the API server in front of it)."""


class OutputKind(IntEnum):
    FIRST_TOKEN = 0
    FINISHED = 1
    PREEMPTED = 2
    ABORTED = 3
    LOADED = 4


# The members as module constants: the engine reads them for every sequence, and a member read through its
# enum class costs ten times a global.
_WAITING: Final = SeqState.WAITING
_PREFILL: Final = SeqState.PREFILL
_DECODE: Final = SeqState.DECODE
_DONE: Final = SeqState.DONE
_TRANSIT: Final = SeqState.TRANSIT
_FIRST_TOKEN: Final = OutputKind.FIRST_TOKEN
_FINISHED: Final = OutputKind.FINISHED
_PREEMPTED: Final = OutputKind.PREEMPTED
_ABORTED: Final = OutputKind.ABORTED
_LOADED: Final = OutputKind.LOADED


@dataclass(slots=True, eq=False, init=False)
class Sequence:
    """A request as the engine sees it. `tag` belongs to the driver; the engine never reads it."""

    seq_id: int
    prompt_tokens: int
    max_tokens: int
    priority: int = 0
    arrival_s: float = 0.0
    tag: Any = None
    prefix: PromptBlocks | None = None
    """The prompt's known leading content, for prefix caching (None: nothing it shares is known)."""
    # Engine state.
    state: SeqState = SeqState.WAITING
    generated: int = 0
    """Output tokens produced, as of the sequence's last materialisation (see `Engine.generated`)."""
    prefill_left: int = 0
    blocks: int = 0
    """KV blocks held while waiting-admitted or prefilling (decoding sequences are counted lazily)."""
    need: int = 0
    """KV blocks it needs free to be admitted (set whenever it is queued: its tokens do not change then)."""
    join_step: int = 0
    gen_at_join: int = 0
    finish_step: int = 0
    phase: int = 0
    admit_order: int = 0
    num_preemptions: int = 0

    # Written out (the dataclass's own is generated at import, so the compiled build would call interpreted code
    # for every sequence; the same for the other records built once per request or step).
    def __init__(self, seq_id: int, prompt_tokens: int, max_tokens: int, priority: int = 0, arrival_s: float = 0.0,
                 tag: Any = None, prefix: PromptBlocks | None = None) -> None:
        self.seq_id = seq_id
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.priority = priority
        self.arrival_s = arrival_s
        self.tag = tag
        self.prefix = prefix
        self.state = _WAITING
        self.generated = self.prefill_left = self.blocks = self.need = 0
        self.join_step = self.gen_at_join = self.finish_step = self.phase = self.admit_order = 0
        self.num_preemptions = 0


@dataclass(slots=True, init=False)
class Output:
    kind: OutputKind
    time: float
    seq: Sequence | None

    def __init__(self, kind: OutputKind, time: float, seq: Sequence | None) -> None:
        self.kind = kind
        self.time = time
        self.seq = seq


@dataclass(slots=True, init=False)
class _Segment:
    """A run of `n` identical steps starting at `t0` at step counter `s0`."""

    t0: float
    n: int
    prefill: int
    decode: int
    ctx0: int
    end: float
    fixed: float = 0.0
    """Cost of each step apart from the decode context (which grows by `decode` tokens a step)."""
    n_cmd: int = 0
    """`n` as commands have cut it; `n` itself may be cut further, ahead of time, by the next arrival from
    transit (see `Engine.next_event_time`)."""
    cut_by: Any = None
    """The sequence in transit whose arrival's cut `n` already holds (None: none)."""
    cut_n: int = 0
    """That cut: the steps of this segment begun by that arrival's step end."""
    prefill_share: float = 0.0
    """Share of each step's time that is prefill work (for the sustained-load slowdown; 0 without one)."""

    def __init__(self, t0: float, n: int, prefill: int, decode: int, ctx0: int, end: float, fixed: float = 0.0,
                 n_cmd: int = 0, cut_by: Any = None, cut_n: int = 0, prefill_share: float = 0.0) -> None:
        self.t0 = t0
        self.n = n
        self.prefill = prefill
        self.decode = decode
        self.ctx0 = ctx0
        self.end = end
        self.fixed = fixed
        self.n_cmd = n_cmd
        self.cut_by = cut_by
        self.cut_n = cut_n
        self.prefill_share = prefill_share


@dataclass
class EngineStats:
    busy_s: float = 0.0
    steps: int = 0
    preemptions: int = 0
    loads: int = 0
    load_s: float = 0.0
    peak_blocks: int = 0
    peak_running: int = 0
    tokens: int = 0
    """Output tokens produced (first tokens and decode tokens), as of the last boundary."""
    prefix_queries: int = 0
    """Tokens of the sequences admitted with prefix caching on (vLLM's prefix_cache_queries)."""
    prefix_hits: int = 0
    """Of those, the tokens found cached and not prefilled (vLLM's prefix_cache_hits)."""


class Engine:
    """A simulated vLLM V1 engine serving one model at a time."""

    def __init__(self, profile: EngineProfile | None, policy: str = "fcfs",
                 on_admit: Callable[[Sequence, float], None] | None = None) -> None:
        """`on_admit(seq, t)`, if given, is called whenever a sequence is admitted into the batch at boundary
        `t`: the first time and again after each preemption (vLLM's SCHEDULED event). It runs inside
        `advance` or a command and must not call back into the engine."""
        if policy not in ("fcfs", "priority"):
            raise ValueError(f"engine policy must be fcfs or priority, not {policy!r}")
        self.policy = policy
        self._on_admit = on_admit
        self.profile: EngineProfile | None = profile
        self._lag = 2 if profile is not None and profile.async_scheduling else 1
        """Steps already scheduled when a command comes: the one in flight, and with asynchronous scheduling
        the one after it."""
        self.stats = EngineStats()
        self._waiting: deque[Sequence] = deque()
        self._waiting_heap: list[tuple[int, float, int, Sequence]] = []
        self._waiting_blocks = 0
        self._queued_tokens = 0  # tokens to prefill of the sequences in transit, pending or waiting
        self._prefilling: deque[Sequence] = deque()
        self._prefill_total = 0
        self._running: dict[int, Sequence] = {}  # admit order -> seq, for victim choice
        self._decode_heap: list[int] = []
        """The decoding sequences' finish steps, each entry `finish step << ORDER_BITS | admit order` (the order of
        (finish step, admit order) pairs; a heap of ints compares natively, one of tuples item by item)."""
        self._decode_seqs: dict[int, Sequence] = {}
        """The sequence of each `_decode_heap` entry, by its admit order, until the entry is popped."""
        self._num_decode = 0
        self._ctx = 0  # total KV tokens of decoding sequences at step counter `_s`
        self._bs = profile.block_size if profile else DEFAULT_BLOCK_SIZE
        self._phase_cnt = [0] * self._bs
        self._used = 0  # KV blocks in use at step `_s` (prefill allocations + decode, lazily exact)
        self._s = 0
        self._admit_counter = 0
        self._seg: _Segment | None = None
        self._pending: list[tuple[str, Sequence]] = []
        self._pending_submits = 0
        self._pending_blocks = 0
        self._transit: list[tuple[float, int, Sequence]] = []  # (arrival at the engine, order, seq)
        self._transit_count = 0
        self._transit_blocks = 0
        self._transit_order = 0
        self._clock = 0.0  # time of the last boundary processed
        self._load_until: float | None = None
        self._load_profile: EngineProfile | None = None
        self._outputs: list[Output] = []
        self._fcfs = policy == "fcfs"
        self._cache: PrefixCache | None = None
        self._new_cache()
        self._next = INF  # next_event_time(), kept current by every command and by advance()
        # Sustained prefill load (`EngineProfile.sustained_prefill_slowdown`): an exponentially weighted share of
        # the recent time that went to prefill work, as of `_pf_t` (-1: the profile has no such slowdown).
        self._pf_share = 0.0
        self._pf_t = 0.0 if profile is not None and profile.sustained_prefill_slowdown else -1.0

    # ----------------------------------------------------------------- views
    @property
    def model(self) -> str | None:
        return self.profile.model if self.profile else None

    @property
    def loading(self) -> bool:
        return self._load_until is not None

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + len(self._waiting_heap) + self._pending_submits + self._transit_count

    @property
    def used_blocks(self) -> int:
        return self._used

    @property
    def total_blocks(self) -> int:
        return self.profile.kv_blocks if self.profile else 0

    @property
    def free_blocks(self) -> int:
        """Blocks not in use and not needed by sequences already waiting here."""
        total = self.profile.kv_blocks if self.profile else 0  # total_blocks, without the call (policies poll this)
        return total - self._used - self._waiting_blocks - self._pending_blocks - self._transit_blocks

    @property
    def pending_prefill_tokens(self) -> int:
        """Prompt tokens (with any output a preempted sequence recomputes) handed to this engine and not yet
        prefilled: in transit from the API server, submitted, waiting, and the rest of the running sequences'
        prefills (as of the last boundary: the chunk of the step in flight still counts). A cached prefix
        counts until its sequence is admitted."""
        return self._queued_tokens + self._prefill_total

    @property
    def idle(self) -> bool:
        return not self._running and self.num_waiting == 0 and not self.loading

    def next_event_time(self) -> float:
        """Time of the next internal boundary (inf when idle); see `_update_next`."""
        return self._next

    def _update_next(self) -> None:
        """Work out `next_event_time` after a change.

        A sequence arriving from transit while a segment runs changes nothing anyone outside sees until
        the step end where it can be admitted: it cuts the segment there. That cut is known as soon as the
        arrival is the next one, so it is made then, and the arrival itself is no event of its own (the
        sequence reaches the waiting queue in `advance`, in time order, before that boundary). Only
        an idle engine wakes at an arrival from transit."""
        if self._load_until is not None:
            self._next = self._load_until
            return
        transit = self._transit
        while transit and transit[0][2].state is not _TRANSIT:
            heappop(transit)  # aborted on the way
        seg = self._seg
        if seg is None:
            self._next = transit[0][0] if transit else INF
            return
        if transit:
            ready, _, q = transit[0]
            if ready < seg.end and seg.cut_by is not q:
                seg.cut_by = q
                n = seg.cut_n = self._steps_done(seg, ready - seg.t0) + self._lag
                if n < seg.n:
                    seg.n = n
                    seg.end = seg.t0 + self._seg_time(seg, n)
        self._next = seg.end

    def step_s(self) -> float:
        """Duration of a step of the segment in flight (its first; the fixed cost of a step when idle), s."""
        p = self.profile
        if p is None:
            return 0.0
        seg = self._seg
        return p.base_s if seg is None else seg.fixed + p.per_context_token_s * seg.ctx0  # (_first_step_s)

    def streamed(self, now: float) -> tuple[int, int]:
        """(output tokens produced, steps taken) from the start to `now`: the whole steps of the segment in
        flight that are done count too."""
        stats = self.stats
        seg = self._seg
        if seg is None or now <= seg.t0 or self.profile is None:
            return stats.tokens, stats.steps
        k = min(seg.n, self._steps_done(seg, now - seg.t0))
        return stats.tokens + k * seg.decode, stats.steps + k

    def generated(self, seq: Sequence, now: float) -> int:
        """Output tokens `seq` has produced by `now` (exact at step granularity)."""
        if seq.state is not _DECODE:
            return seq.generated
        s = self._s
        seg = self._seg
        if seg is not None and seg.decode > 0 and now > seg.t0:
            s += min(seg.n, self._steps_done(seg, now - seg.t0))
        return min(seq.max_tokens, seq.gen_at_join + (s - seq.join_step))

    # ------------------------------------------------------------- commands
    def submit(self, seq: Sequence, now: float, delay_s: float = 0.0) -> None:
        """Queue `seq`; it can be admitted at the end of the step in flight (or now if idle). With
        `delay_s`, it reaches the engine that much later (it counts as waiting here meanwhile)."""
        if self.profile is None or self._load_until is not None:
            raise RuntimeError("engine has no model loaded")
        seq.need = -(-(seq.prompt_tokens + seq.generated + 1) // self._bs)  # admission_blocks
        self._queued_tokens += seq.prompt_tokens + seq.generated
        if delay_s > 0.0:
            seq.state = _TRANSIT
            self._transit_order += 1
            heappush(self._transit, (now + delay_s, self._transit_order, seq))
            self._transit_count += 1
            self._transit_blocks += seq.need
        else:
            self._submit_now(seq, now)
        self._update_next()

    def _submit_now(self, seq: Sequence, now: float) -> None:
        """`seq` (its `need` set) reaches the engine at `now`: its arrival time for the priority order, as vLLM's
        API server stamps it on handing the request over (a request sent again is a new one there)."""
        seq.arrival_s = now
        seq.state = _WAITING
        seq.prefill_left = seq.prompt_tokens + seq.generated
        self._pending.append(("submit", seq))
        self._pending_submits += 1
        self._pending_blocks += seq.need
        self._interrupt(now, seq)

    def abort(self, seq: Sequence, now: float) -> None:
        """Remove `seq` at the end of the step in flight; an ABORTED output reports it."""
        if seq.state is _TRANSIT:  # not at the engine yet: gone at once
            self._leave_transit(seq)
            self._queued_tokens -= seq.prompt_tokens + seq.generated
            seg = self._seg
            if seg is not None and seg.cut_by is seq:  # its arrival's cut, made ahead of time, is void
                seg.cut_by = None
                if seg.n != seg.n_cmd:
                    seg.n = seg.n_cmd
                    seg.end = seg.t0 + self._seg_time(seg, seg.n)
            seq.state = _DONE
            self._outputs.append(Output(_ABORTED, now, seq))
        else:
            self._pending.append(("abort", seq))
            self._interrupt(now)
        self._update_next()

    def load_model(self, profile: EngineProfile, now: float, duration_s: float) -> None:
        """Swap to `profile`'s model; the engine must hold no sequences."""
        if self._running or self.num_waiting or self._seg is not None:
            raise RuntimeError("cannot swap models with sequences on the engine")
        self._load_until = now + duration_s
        self._load_profile = profile
        self.profile = None
        self.stats.loads += 1
        self.stats.load_s += duration_s
        self._update_next()

    def advance(self, now: float) -> list[Output]:
        """Process every boundary at or before `now`; return what happened, in time order."""
        out = self._outputs
        self._outputs = []
        transit = self._transit
        while True:
            t = self._next
            if t > now or t == INF:
                break
            if self._load_until is not None:
                self._finish_load()
            elif transit and transit[0][0] < (self._seg.end if self._seg is not None else INF):
                ready, _, q = heappop(transit)
                self._leave_transit(q)
                self._submit_now(q, ready)
            else:
                self._boundary()
                if not transit and self._seg is not None and self._load_until is None:
                    self._next = self._seg.end  # `_update_next`'s answer when nothing is in transit
                    continue
            self._update_next()
        if self._outputs:
            out.extend(self._outputs)
            self._outputs = []
        return out

    # ------------------------------------------------------------ internals
    def _blocks_needed(self, seq: Sequence) -> int:
        return admission_blocks(seq.prompt_tokens + seq.generated, self._bs)

    def _new_cache(self) -> None:
        p = self.profile
        self._cache = PrefixCache(p.block_size) if p is not None and p.enable_prefix_caching else None

    def reset_prefix_cache(self) -> None:
        """Forget every cached prompt block (vLLM's sleep drops the KV cache; also its /reset_prefix_cache)."""
        self._new_cache()

    @property
    def prefix_cache(self) -> PrefixCache | None:
        """The cached prompt blocks (None: prefix caching off, or no model loaded)."""
        return self._cache

    def _leave_transit(self, q: Sequence) -> None:
        self._transit_count -= 1
        self._transit_blocks -= q.need

    def _finish_load(self) -> None:
        t = self._load_until
        assert t is not None and self._load_profile is not None
        self.profile = self._load_profile
        self._lag = 2 if self.profile.async_scheduling else 1
        self._bs = self.profile.block_size
        self._new_cache()  # the model that slept dropped its KV cache
        self._phase_cnt = [0] * self._bs
        self._pf_share = 0.0  # (the GPU idled through the swap, as far as the window sees)
        self._pf_t = t if self.profile.sustained_prefill_slowdown else -1.0
        self._load_until = None
        self._load_profile = None
        self._clock = t
        self._outputs.append(Output(_LOADED, t, None))
        if self._pending:
            self._plan(t)

    def _interrupt(self, now: float, arrival: Sequence | None = None) -> None:
        """Cut the segment in flight at its next step end so pending ops apply there (`arrival`: the sequence
        whose arrival at the engine this is, whose cut may have been worked out already)."""
        seg = self._seg
        if self._load_until is not None:
            return
        if seg is None:
            self._clock = max(self._clock, now)
            self._plan(self._clock)
            return
        # The step in flight is already scheduled; with asynchronous scheduling so is the one after it.
        if arrival is not None and seg.cut_by is arrival:
            n = seg.cut_n
        else:
            n = self._steps_done(seg, now - seg.t0) + self._lag
        if n < seg.n_cmd:
            seg.n_cmd = n
            if n < seg.n:
                seg.n = n
                seg.end = seg.t0 + self._seg_time(seg, n)

    def _first_step_s(self, seg: _Segment) -> float:
        """Duration of `seg`'s first step; each later one reads `decode` more context tokens."""
        p = self.profile
        assert p is not None
        return seg.fixed + p.per_context_token_s * seg.ctx0

    def _seg_time(self, seg: _Segment, n: int) -> float:
        p = self.profile
        assert p is not None
        a = self._first_step_s(seg)
        return n * a + p.per_context_token_s * seg.decode * n * (n - 1) / 2.0

    def _steps_done(self, seg: _Segment, dt: float) -> int:
        """Whole steps of `seg` completed within `dt` seconds of its start."""
        if dt <= 0:
            return 0
        p = self.profile
        assert p is not None
        c = p.per_context_token_s
        dec = seg.decode
        a = seg.fixed + c * seg.ctx0  # _first_step_s
        g = c * dec / 2.0
        if g <= 0:
            k = int(dt / a)
        else:
            b = a - g
            k = int((-b + math.sqrt(b * b + 4 * g * dt)) / (2 * g))
        # Guard the float edge either way (the time of k steps as `_seg_time` works it out).
        while k > 0 and k * a + c * dec * k * (k - 1) / 2.0 > dt:
            k -= 1
        while (k + 1) * a + c * dec * (k + 1) * k / 2.0 <= dt:
            k += 1
        return k

    def _boundary(self) -> None:
        seg = self._seg
        assert seg is not None
        t = seg.end
        n = seg.n
        self._seg = None
        self._clock = t
        stats = self.stats
        stats.busy_s += t - seg.t0
        if self._pf_t >= 0.0:  # the profile has a sustained-load slowdown (`_plan`)
            self._pf_account(seg, t)
        stats.steps += n
        s = self._s
        # Decode progress: D tokens a step, new blocks where sequences cross a block boundary.
        if seg.decode:
            bs = self._bs
            cnt = self._phase_cnt
            full = n // bs  # (not divmod, nor sums of slices below: compiled, these are native int operations)
            rem = n - full * bs
            add = full * self._num_decode
            if rem:
                # The phases crossed in steps s+1..s+rem: cnt[(-(s + j)) % bs] for those j, a run of indices
                # going down from `hi` (wrapping below 0).
                hi = (-(s + 1)) % bs
                if rem == 1:  # (the commonest: a single step)
                    add += cnt[hi]
                else:
                    lo = hi - rem + 1
                    for j in range(max(lo, 0), hi + 1):
                        add += cnt[j]
                    for j in range(bs + lo, bs):  # (empty unless the run wrapped below 0)
                        add += cnt[j]
            self._used += add
            self._ctx += seg.decode * n
            stats.tokens += seg.decode * n
        s += n
        self._s = s
        # Prefill progress: P tokens a step, FIFO over prefilling sequences.
        if seg.prefill:
            stream = seg.prefill * n
            self._prefill_total -= stream
            pf = self._prefilling
            while pf and stream > 0:
                q = pf[0]
                left = q.prefill_left
                if left > stream:
                    q.prefill_left = left - stream
                    break
                q.prefill_left = 0
                stream -= left
                pf.popleft()
                self._prefill_done(q, t)
        # Decode completions.
        heap = self._decode_heap
        if heap and heap[0] >> ORDER_BITS <= s:
            seqs = self._decode_seqs
            while heap and heap[0] >> ORDER_BITS <= s:
                e = heappop(heap)
                fs = e >> ORDER_BITS
                order = e & ORDER_MASK
                q = seqs[order]
                del seqs[order]
                if q.state is _DECODE and q.finish_step == fs:
                    self._finish_decode(q, t)
        if self._used > stats.peak_blocks:
            stats.peak_blocks = self._used
        if self._pending_submits and self._lag == 2:
            # With asynchronous scheduling the step after this boundary was scheduled when the step that just
            # ended began: a sequence that reached the engine during that step joins the one after next.
            self._plan(t, seg.t0 + self._seg_time(seg, n - 1) if n > 1 else seg.t0)
        else:
            self._plan(t)

    def _prefill_done(self, q: Sequence, t: float) -> None:
        first = q.generated == 0
        q.generated += 1
        cache = self._cache
        if cache is not None and q.prefix is not None:
            assert self.profile is not None
            cache.insert(q.prefix, q.prompt_tokens, self.profile.kv_blocks - self._used)
        if first:
            self.stats.tokens += 1
            self._outputs.append(Output(_FIRST_TOKEN, t, q))
        if q.generated >= q.max_tokens:
            self._used -= q.blocks
            q.blocks = 0
            q.state = _DONE
            del self._running[q.admit_order]
            self._outputs.append(Output(_FINISHED, t, q))
            return
        # Join decode: blocks now counted lazily from the token count.
        bs = self._bs
        gen = q.generated
        tokens = q.prompt_tokens + gen
        s = self._s
        self._used += -(-tokens // bs) - q.blocks  # kv_blocks_for
        q.blocks = 0
        q.state = _DECODE
        q.join_step = s
        q.gen_at_join = gen
        fs = q.finish_step = s + (q.max_tokens - gen)
        phase = q.phase = (tokens - 1 - s) % bs
        self._phase_cnt[phase] += 1
        self._num_decode += 1
        self._ctx += tokens
        heappush(self._decode_heap, fs << ORDER_BITS | q.admit_order)
        self._decode_seqs[q.admit_order] = q

    def _leave_decode(self, q: Sequence) -> None:
        """Materialise a decoding sequence's tokens and take it out of the decode accounting."""
        gen = q.generated = q.gen_at_join + (self._s - q.join_step)
        tokens = q.prompt_tokens + gen
        self._used -= -(-tokens // self._bs)  # kv_blocks_for
        self._phase_cnt[q.phase] -= 1
        self._num_decode -= 1
        self._ctx -= tokens
        del self._running[q.admit_order]

    def _finish_decode(self, q: Sequence, t: float) -> None:
        self._leave_decode(q)
        q.state = _DONE
        self._outputs.append(Output(_FINISHED, t, q))

    def _remove(self, q: Sequence) -> None:
        """Take `q` out of wherever it is (running or waiting)."""
        if q.state is _DECODE:
            self._leave_decode(q)
        elif q.state is _PREFILL:
            self._prefilling.remove(q)
            self._prefill_total -= q.prefill_left
            self._used -= q.blocks
            q.blocks = 0
            del self._running[q.admit_order]
        elif q.state is _WAITING:
            if self._fcfs:
                self._waiting.remove(q)
            else:
                self._waiting_heap = [e for e in self._waiting_heap if e[3] is not q]
                heapify(self._waiting_heap)
            self._waiting_blocks -= q.need
            self._queued_tokens -= q.prefill_left

    def _enqueue_waiting(self, q: Sequence, front: bool) -> None:
        q.state = _WAITING
        tokens = q.prompt_tokens + q.generated
        q.prefill_left = tokens
        q.need = need = -(-(tokens + 1) // self._bs)  # admission_blocks
        self._waiting_blocks += need
        if self._fcfs:
            if front:
                self._waiting.appendleft(q)
            else:
                self._waiting.append(q)
        else:
            heappush(self._waiting_heap, (q.priority, q.arrival_s, q.seq_id, q))

    def _preempt_one(self, t: float) -> None:
        if self._fcfs:
            victim = self._running[next(reversed(self._running))]
        else:
            # vLLM: max(self.running, key=(priority, arrival_time)); running is in admission order.
            victim = max(self._running.values(), key=lambda q: (q.priority, q.arrival_s))
        self._remove(victim)
        victim.num_preemptions += 1
        self.stats.preemptions += 1
        self._enqueue_waiting(victim, front=True)
        self._queued_tokens += victim.prefill_left
        self._outputs.append(Output(_PREEMPTED, t, victim))

    def _apply_pending(self, t: float, late_from: float = INF) -> None:
        """Apply the queued commands; submits of sequences that reached the engine at or after `late_from`
        stay queued (see `_plan`)."""
        ops = self._pending
        self._pending = []
        self._pending_submits = 0
        self._pending_blocks = 0
        late: set[int] = set()
        for op, q in ops:
            if op == "submit":
                if q.arrival_s >= late_from:
                    late.add(id(q))
                    self._pending.append((op, q))
                    self._pending_submits += 1
                    self._pending_blocks += q.need
                    continue
                self._enqueue_waiting(q, front=False)
            elif id(q) in late:  # aborted before it could be admitted: its submit goes too
                late.discard(id(q))
                self._pending.remove(("submit", q))
                self._pending_submits -= 1
                self._pending_blocks -= q.need
                self._queued_tokens -= q.prompt_tokens + q.generated
                q.state = _DONE
                self._outputs.append(Output(_ABORTED, t, q))
            elif q.state is not _DONE:
                self._remove(q)
                q.state = _DONE
                self._outputs.append(Output(_ABORTED, t, q))

    def _admit(self, t: float, reserve: int) -> None:
        """Admit waiting sequences in queue order while a batch slot, the token budget and KV blocks beyond
        `reserve` (the running decodes' next step) last; stop at the first that does not fit."""
        fcfs = self._fcfs
        waiting: Any = self._waiting if fcfs else self._waiting_heap
        running = self._running
        stats = self.stats
        if not waiting:  # most boundaries: nothing to admit, only the peaks to keep (as below)
            if len(running) > stats.peak_running:
                stats.peak_running = len(running)
            if self._used > stats.peak_blocks:
                stats.peak_blocks = self._used
            return
        p = self.profile
        assert p is not None
        on_admit = self._on_admit
        budget_left = p.max_num_batched_tokens - self._num_decode - self._prefill_total
        max_seqs, kv = p.max_num_seqs, p.kv_blocks - reserve
        cache = self._cache
        while budget_left > 0 and len(running) < max_seqs and waiting:
            q: Sequence = waiting[0] if fcfs else waiting[0][3]
            need = q.need
            if self._used + need > kv:
                break  # head-of-line waits for memory, as in vLLM
            if fcfs:
                waiting.popleft()
            else:
                heappop(waiting)
            self._waiting_blocks -= need
            self._used += need
            q.blocks = need
            q.state = _PREFILL
            self._admit_counter += 1
            order = q.admit_order = self._admit_counter
            running[order] = q
            self._prefilling.append(q)
            self._queued_tokens -= q.prefill_left
            if cache is not None:
                # Computed tokens start at the longest cached prefix (vLLM's get_computed_blocks).
                left = q.prefill_left
                stats.prefix_queries += left
                if q.prefix is not None:
                    hit = cache.match(q.prefix, left)
                    stats.prefix_hits += hit
                    q.prefill_left = left - hit
            left = q.prefill_left
            self._prefill_total += left
            budget_left -= left
            if on_admit is not None:
                on_admit(q, t)
        if len(running) > stats.peak_running:
            stats.peak_running = len(running)
        if self._used > stats.peak_blocks:
            stats.peak_blocks = self._used

    def _kv_steps(self, free: int) -> float:
        """First step (1-based) at which decoding sequences need more than `free` new blocks."""
        d = self._num_decode
        if d == 0:
            return INF
        bs = self._bs
        cnt = self._phase_cnt
        periods = free // d  # (floor division, as divmod's: a native int operation where divmod is a call)
        left = free - periods * d
        s = self._s
        acc = 0
        for j in range(1, bs + 1):
            acc += cnt[(-(s + j)) % bs]
            if acc > left:
                return periods * bs + j
        raise AssertionError("a full period needs d blocks")

    def _prefill_pairs(self, stream: int) -> float:
        """Attention pairs of the next step's `stream` prefill tokens, FIFO over prefilling sequences."""
        pairs = 0.0
        for q in self._prefilling:
            if stream <= 0:
                break
            take = min(q.prefill_left, stream)
            pairs += chunk_pairs(q.prompt_tokens + q.generated - q.prefill_left, take)
            stream -= take
        return pairs

    def _pf_now(self, t: float, p: EngineProfile) -> float:
        """The recent share of time in prefill work, as of `t` (time since the last segment counts as none)."""
        return self._pf_share * math.exp(-(t - self._pf_t) / p.sustained_window_s)

    def _pf_account(self, seg: _Segment, t: float) -> None:
        """Fold segment `seg`, which ended at `t`, into the recent share of time in prefill work."""
        p = self.profile
        assert p is not None
        u = self._pf_now(seg.t0, p)  # (any idle time before the segment counts as none)
        a = math.exp(-(t - seg.t0) / p.sustained_window_s)
        self._pf_share = u * a + seg.prefill_share * (1.0 - a)
        self._pf_t = t

    def _plan(self, t: float, late_from: float = INF) -> None:
        """At a boundary: apply queued commands, admit, handle KV pressure, start the next segment.

        Sequences that reached the engine at or after `late_from` (the start of the step that just ended, with
        asynchronous scheduling) are not admitted here: the next segment ends after one step, where they are.
        An engine with nothing else to run takes them at once."""
        if self._pending:
            self._apply_pending(t, late_from)
            if self._pending_submits and not self._running and not self._waiting and not self._waiting_heap:
                self._apply_pending(t)
        p = self.profile
        if p is None:
            return
        # vLLM V1 schedules the running sequences first: each decode takes a new block where it crosses a
        # block boundary, and when none is free a victim is preempted. Waiting sequences come after, only
        # in a step that preempted nothing, and only into the blocks those decodes leave.
        reserve = 0
        if self._num_decode:
            cnt, bs = self._phase_cnt, self._bs
            reserve = cnt[(-(self._s + 1)) % bs]
            if reserve > p.kv_blocks - self._used:
                while self._num_decode and cnt[(-(self._s + 1)) % bs] > p.kv_blocks - self._used:
                    self._preempt_one(t)
                reserve = -1
        if reserve >= 0:
            self._admit(t, reserve)
        cache = self._cache
        if cache is not None and cache.blocks > p.kv_blocks - self._used:
            cache.shrink(p.kv_blocks - self._used)  # cached blocks live in the free pool
        while True:
            d = self._num_decode
            chunk = p.max_num_batched_tokens - d
            n_pf: float = INF
            prefill = 0
            total = self._prefill_total
            if total > 0 and chunk > 0:
                if total <= chunk:
                    prefill, n_pf = total, 1.0
                else:
                    head = self._prefilling[0].prefill_left
                    k = -(-head // chunk)
                    prefill = chunk
                    n_pf = float(k if total >= k * chunk else total // chunk)
            n_dec: float = INF
            heap = self._decode_heap
            while heap:
                e = heap[0]
                fs = e >> ORDER_BITS
                q = self._decode_seqs[e & ORDER_MASK]
                if q.state is _DECODE and q.finish_step == fs:
                    n_dec = float(fs - self._s)
                    break
                heappop(heap)
                del self._decode_seqs[e & ORDER_MASK]
            n = n_dec if n_dec < n_pf else n_pf  # min(n_pf, n_dec), without the call
            if n == INF:
                return  # idle
            free = p.kv_blocks - self._used
            # The decodes need at most d new blocks every block_size steps: only look closer when the free
            # blocks may not last the segment.
            if free < d * -(-n // self._bs):
                n_kv = self._kv_steps(free)
                if n_kv <= 1:  # (not after the reservation above; kept as a guard)
                    self._preempt_one(t)
                    continue
                if n_kv <= n:
                    n = n_kv - 1
            pairs = 0.0
            if prefill and p.per_prefill_pair_s:
                # Each chunk of a long prompt sees more cached tokens than the last, so steps differ.
                n = 1.0
                pairs = self._prefill_pairs(prefill)
            # p.step_time(prefill, d, 0, pairs), the same arithmetic without its calls (the context term is 0).
            knee = p.knee_tokens
            billed = prefill if knee <= 0 else max(0, prefill + d - knee)
            fixed = (p.base_s + p.per_prefill_token_s * billed + p.per_decode_seq_s * d
                     + p.per_prefill_pair_s * pairs + (p.per_prefill_step_s if prefill > 0 else 0.0))
            share = 0.0
            if p.sustained_prefill_slowdown and prefill > 0:
                work = p.per_prefill_token_s * billed + p.per_prefill_pair_s * pairs + p.per_prefill_step_s
                share = work / fixed
                if self._pf_now(t, p) >= p.sustained_prefill_share:
                    fixed += work * p.sustained_prefill_slowdown
            steps = int(n)
            ctx = self._ctx
            c = p.per_context_token_s
            if self._pending_submits:
                steps = 1  # late arrivals (above) are admitted at this step's end
            seg = _Segment(t, steps, prefill, d, ctx, 0.0, fixed, steps)
            seg.prefill_share = share
            # _seg_time(seg, steps)
            seg.end = t + (steps * (fixed + c * ctx) + c * d * steps * (steps - 1) / 2.0)
            self._seg = seg
            return
