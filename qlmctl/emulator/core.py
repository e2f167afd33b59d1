"""The simulator's vLLM V1 engine model run in real time on an asyncio loop.

Simulated time runs `rate` times faster than the wall clock (`rate` = the speed-up factor). One driver
task sleeps until the engine's next boundary (a prefill completing, a sequence finishing, KV running
out), or until a submission or an abort wakes it, then calls `Engine.advance` and hands the outputs to
the requests. While sequences decode it also wakes at a delivery tick (`stream_interval_s`, wall
seconds, stretched with the number of active requests so hundreds of streams stay cheap): it reads each
request's token count with `Engine.generated` and wakes only the streams that have new tokens. So there
is no timer per request or per token; tokens of one tick reach a stream together.

Everything here runs on the loop's thread and never awaits inside a state change, so no locks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from dataclasses import dataclass, field

from qlmctl.emulator.metrics import EmulatorMetrics, EngineGauges
from qlmctl.emulator.protocol import FinishReason
from simulator.engine import Engine, OutputKind, Sequence
from simulator.prefix import PromptBlocks
from simulator.profile import EngineProfile

log = logging.getLogger("qlmctl.emulator")

TICK_PER_ACTIVE_S = 1e-4
"""Extra delivery-tick length per active request, wall seconds (bounds CPU use at high concurrency)."""


class Clock:
    """Simulated time as a piecewise-linear function of the monotonic clock.

    The rate can change without a jump in simulated time (room for a slowdown fault).
    """

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError("speed-up must be positive")
        self._rate = rate
        self._mono0 = time.monotonic()
        self._sim0 = 0.0

    @property
    def rate(self) -> float:
        return self._rate

    def now(self) -> float:
        """Simulated seconds since the clock started."""
        return self._sim0 + (time.monotonic() - self._mono0) * self._rate

    def set_rate(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self._sim0 = self.now()
        self._mono0 = time.monotonic()
        self._rate = rate

    def wall(self, sim_dt: float) -> float:
        """Wall seconds that `sim_dt` simulated seconds take at the current rate."""
        return sim_dt / self._rate


@dataclass(eq=False, slots=True)
class EmuRequest:
    """One request on the emulated engine, shared by the driver and the HTTP handler serving it."""

    seq: Sequence
    stream: bool
    arrival_s: float
    """Simulated time of submission."""
    event: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when there is news: new tokens (streaming requests only), finish, abort, or error."""
    produced: int = 0
    """Output tokens produced so far, as last seen by the driver."""
    scheduled_s: float | None = None
    """Simulated time the engine first admitted it into its batch (vLLM's scheduled timestamp)."""
    first_token_s: float | None = None
    last_token_s: float = 0.0
    finish_s: float | None = None
    done: bool = False
    """Finished normally (all `max_tokens` tokens)."""
    aborted: bool = False
    """Ended early: by its client (disconnect) or by the server (sleep)."""
    error: str | None = None

    @property
    def finish_reason(self) -> FinishReason:
        return "length" if self.done else "abort"

    @property
    def max_tokens(self) -> int:
        return self.seq.max_tokens

    @property
    def prompt_tokens(self) -> int:
        return self.seq.prompt_tokens


def prompt_blocks(ids: list[int], block_size: int) -> PromptBlocks | None:
    """vLLM's prefix-cache view of a prompt of token `ids`: one hash per full block of `block_size` tokens,
    each chained to the ones before it (None: not one full block)."""
    hashes = []
    h = 0
    for i in range(0, len(ids) - block_size + 1, block_size):
        h = hash((h, *ids[i:i + block_size]))
        hashes.append(h)
    return PromptBlocks(block_size, tuple(hashes)) if hashes else None


def _note_scheduled(seq: Sequence, t: float) -> None:
    """Note when a request is first admitted into the batch, for vLLM's queue, prefill and inference time
    metrics (the first time only, as vLLM: a preempted request keeps its first scheduled time)."""
    tag = seq.tag
    if isinstance(tag, EmuRequest) and tag.scheduled_s is None:
        tag.scheduled_s = t


class EmulatedEngine:
    """An `Engine` driven by the wall clock, with per-request notification and vLLM metrics."""

    def __init__(
        self,
        profile: EngineProfile,
        model_name: str,
        *,
        speedup: float = 1.0,
        policy: str = "fcfs",
        stream_interval_s: float = 0.01,
    ) -> None:
        if profile.kv_blocks * profile.block_size < profile.max_model_len:
            # vLLM refuses to start in this case; here a long request could never be admitted.
            raise ValueError(
                f"KV cache ({profile.kv_blocks} blocks of {profile.block_size} tokens) is smaller than "
                f"max_model_len ({profile.max_model_len} tokens)"
            )
        self.profile = profile
        self.engine = Engine(profile, policy=policy, on_admit=_note_scheduled)
        self.clock = Clock(speedup)
        self.stream_interval_s = stream_interval_s
        self.metrics = EmulatorMetrics(model_name, profile, self.gauges)
        self._ids = itertools.count(1)
        self._requests: dict[int, EmuRequest] = {}
        self._active: dict[int, EmuRequest] = {}  # past their first token, not finished
        self._driver: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self._closed = False
        self.aborted_total = 0

    # ----------------------------------------------------------------- views
    @property
    def in_flight(self) -> int:
        """Requests submitted and neither finished nor aborted."""
        return len(self._requests)

    def gauges(self) -> EngineGauges:
        e = self.engine
        total = e.total_blocks
        return EngineGauges(running=e.num_running, waiting=e.num_waiting,
                            kv_usage=min(1.0, e.used_blocks / total) if total else 0.0,
                            prefix_queries=e.stats.prefix_queries, prefix_hits=e.stats.prefix_hits)

    def state(self) -> dict[str, float | int]:
        e = self.engine
        return {
            "sim_time_s": self.clock.now(),
            "speedup": self.clock.rate,
            "in_flight": self.in_flight,
            "running": e.num_running,
            "waiting": e.num_waiting,
            "used_blocks": e.used_blocks,
            "total_blocks": e.total_blocks,
            "steps": e.stats.steps,
            "preemptions": e.stats.preemptions,
            "aborted": self.aborted_total,
        }

    # -------------------------------------------------------------- commands
    def submit(self, prompt_tokens: int, max_tokens: int, *, priority: int = 0, stream: bool = True,
               prefix: PromptBlocks | None = None) -> EmuRequest:
        """Queue a request on the engine now; the caller awaits `req.event` for news. `prefix`: its prompt's
        block hashes, for the engine's prefix cache (`prompt_blocks`)."""
        if self._closed:
            raise RuntimeError("emulated engine is closed")
        self._ensure_driver()
        now = self.clock.now()
        self._advance(now)
        seq = Sequence(seq_id=next(self._ids), prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                       priority=priority, arrival_s=now, prefix=prefix)
        req = EmuRequest(seq=seq, stream=stream, arrival_s=now)
        seq.tag = req
        self._requests[seq.seq_id] = req
        self.engine.submit(seq, now)
        self._kick()
        return req

    def abort(self, req: EmuRequest) -> None:
        """Abort `req` because its client left: frees its batch slot and KV blocks at the end of the step
        in flight. Like vLLM, such a request is not counted as finished in the metrics."""
        if req.done or req.aborted:
            return
        now = self.clock.now()
        self._advance(now)
        self._abort(req, now, finished=False)
        self._kick()

    def abort_all(self) -> int:
        """Abort every request in flight on the server's behalf (vLLM's /sleep does this).

        Their handlers are woken and answer with the tokens so far and finish_reason "abort"; they count
        in request_success{finished_reason="abort"}. Returns how many were aborted.
        """
        now = self.clock.now()
        self._advance(now)
        reqs = list(self._requests.values())
        for req in reqs:
            self._abort(req, now, finished=True)
        self._kick()
        return len(reqs)

    def set_speed(self, rate: float) -> None:
        """Run the engine at `rate` simulated seconds per wall second from now on (no jump in its time)."""
        if rate == self.clock.rate:
            return
        self._advance(self.clock.now())
        self.clock.set_rate(rate)
        self._kick()  # the driver's sleep was computed at the old rate

    async def aclose(self) -> None:
        """Stop the driver; requests still in flight end with an error."""
        self._closed = True
        self._fail_all("the server is shutting down")
        if self._driver is not None:
            self._driver.cancel()
            try:
                await self._driver
            except (asyncio.CancelledError, Exception):
                pass
            self._driver = None

    # ------------------------------------------------------------- internals
    def _ensure_driver(self) -> None:
        if self._driver is None or self._driver.done():
            self._driver = asyncio.get_running_loop().create_task(self._run(), name="qlmctl-emulator-driver")

    def _kick(self) -> None:
        w = self._wakeup
        if w is not None and not w.done():
            w.set_result(None)

    def _tick_s(self) -> float:
        return max(self.stream_interval_s, TICK_PER_ACTIVE_S * len(self._active))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self._closed:
                now = self.clock.now()
                self._advance(now)
                delay = math.inf
                t_next = self.engine.next_event_time()
                if t_next < math.inf:
                    delay = self.clock.wall(t_next - now)
                if self._active:
                    delay = min(delay, self._tick_s())
                fut: asyncio.Future[None] = loop.create_future()
                self._wakeup = fut
                handle = loop.call_later(max(0.0, delay), self._kick) if delay < math.inf else None
                try:
                    await fut
                finally:
                    self._wakeup = None
                    if handle is not None:
                        handle.cancel()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("emulated engine driver failed")
            self._fail_all("internal error in the emulated engine")
            self._closed = True

    def _abort(self, req: EmuRequest, now: float, finished: bool) -> None:
        if req.done or req.aborted:
            return
        req.aborted = True
        self.aborted_total += 1
        self._requests.pop(req.seq.seq_id, None)
        self._active.pop(req.seq.seq_id, None)
        self.engine.abort(req.seq, now)
        if finished:
            self._record_end(req, now)
        req.event.set()

    def _fail_all(self, message: str) -> None:
        for req in list(self._requests.values()):
            req.error = message
            req.event.set()
        self._requests.clear()
        self._active.clear()

    def _advance(self, now: float) -> None:
        """Apply engine boundaries up to `now`, then deliver tokens produced since the last call."""
        m = self.metrics
        for out in self.engine.advance(now):
            seq = out.seq
            if out.kind is OutputKind.PREEMPTED:
                m.preemptions += 1
                continue
            if seq is None or not isinstance(seq.tag, EmuRequest):
                continue
            req: EmuRequest = seq.tag
            if req.aborted:
                continue
            if out.kind is OutputKind.FIRST_TOKEN:
                req.first_token_s = out.time
                m.ttft.observe(self.clock.wall(out.time - req.arrival_s))
                m.prompt_tokens += seq.prompt_tokens
                self._produce(req, 1, out.time)
                self._active[seq.seq_id] = req
            elif out.kind is OutputKind.FINISHED:
                self._produce(req, seq.max_tokens, out.time)
                self._finish(req, out.time)
        for req in self._active.values():
            g = self.engine.generated(req.seq, now)
            if g > req.produced:
                self._produce(req, g, now)

    def _produce(self, req: EmuRequest, total: int, t: float) -> None:
        """Record that `req` has produced `total` tokens by simulated time `t`."""
        k = total - req.produced
        if k <= 0:
            return
        m = self.metrics
        m.generation_tokens += k
        if req.produced > 0:
            # Tokens of one delivery share the gap evenly (exact on average over a request).
            m.itl.observe(self.clock.wall(t - req.last_token_s) / k, k)
        req.produced = total
        req.last_token_s = t
        if req.stream:
            req.event.set()

    def _finish(self, req: EmuRequest, t: float) -> None:
        req.done = True
        self._record_end(req, t)
        self._requests.pop(req.seq.seq_id, None)
        self._active.pop(req.seq.seq_id, None)
        req.event.set()

    def _record_end(self, req: EmuRequest, t: float) -> None:
        """Per-request metrics of a request that ended at `t` (finished, or aborted by the server)."""
        m = self.metrics
        req.finish_s = t
        n = req.produced
        m.success[req.finish_reason] += 1
        m.e2e.observe(self.clock.wall(t - req.arrival_s))
        m.request_prompt_tokens.observe(req.prompt_tokens)
        m.request_generation_tokens.observe(n)
        m.request_max_tokens.observe(req.max_tokens)
        if n > 1 and req.first_token_s is not None:
            m.request_tpot.observe(self.clock.wall(t - req.first_token_s) / (n - 1))
        if req.scheduled_s is not None:
            m.queue_time.observe(self.clock.wall(req.scheduled_s - req.arrival_s))
            if req.first_token_s is not None:
                last = req.last_token_s  # = t for a finished request
                m.prefill_time.observe(self.clock.wall(req.first_token_s - req.scheduled_s))
                m.decode_time.observe(self.clock.wall(last - req.first_token_s))
                m.inference_time.observe(self.clock.wall(last - req.scheduled_s))
