"""The engine timing profile: the cost of one vLLM engine step, and the instance's limits.

Form of the step cost (seconds), for a step that computes P prefill tokens and D decode
sequences whose KV context totals C tokens, where the prefill tokens attend to A (query, key) pairs:

    step_time = base_s + per_prefill_token_s * T' + per_decode_seq_s * D + per_context_token_s * C
                + per_prefill_pair_s * A + per_prefill_step_s * [P > 0],    T' = max(0, P + D - knee_tokens)

`knee_tokens` is how many token rows a step's GEMMs carry before they turn compute-bound: below it the
step costs what reading the weights costs (in `base_s`), so the first prefill tokens that join a small
decode batch are nearly free, and every row beyond it, prefill token or decode sequence alike, costs
`per_prefill_token_s`. That is also why a decode-only step of more than `knee_tokens` sequences grows
faster per sequence. `knee_tokens = 0` gives a plain linear model (T' = P: prefill tokens only).

A prefill chunk of n tokens of a sequence that already holds c tokens of KV has n * (c + (n + 1) / 2)
pairs (causal attention: each new token sees the cached ones, the chunk's earlier ones and itself).

Why this form: a transformer step reads all weights once (a fixed cost, `base_s`, which dominates
small decode batches on a memory-bound GPU), does GEMMs whose cost grows with the tokens in the
batch (prefill tokens are compute bound: `per_prefill_token_s`; each decode sequence adds one token
row plus sampling: `per_decode_seq_s`), and runs attention whose decode cost is reading each
sequence's KV cache (`per_context_token_s` per cached token). It is linear in what the scheduler
controls, so the simulator can sum a run of steps in closed form, and it is the shape Vidur and
LLMServingSim fit. Prefill attention is quadratic in prompt length (`per_prefill_pair_s`); a purely
linear fit would let the longest prompts inflate the per-token cost of every mid-size one. What it leaves
out (CUDA-graph batch padding, GEMM efficiency at small token counts) `profile-model` reports as fit error.

`per_prefill_step_s` is what a step pays for carrying any prefill tokens at all: vLLM V1 replays a
decode-only batch as one full CUDA graph, but runs a batch with prefill tokens piecewise (attention
launched layer by layer outside the graphs). Without it a fit pushes that cost into the decode
coefficients and overestimates mid-size decode batches. docs/fidelity.md has the measurements behind
each term.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, replace
from dataclasses import fields as dc_fields
from typing import Any, Final

DEFAULT_BLOCK_SIZE: Final = 16
"""vLLM's default KV block size, tokens."""

TYPICAL_CONTEXT_TOKENS: Final = 1024
"""KV context assumed per decoding sequence where a step is estimated ahead, without knowing its batch."""

FRONTEND_RHO_CAP: Final = 0.95
"""Most utilisation the API-server queue model lets the server reach (see `EngineProfile.frontend_wait`)."""


def kv_blocks_for(tokens: int, block_size: int) -> int:
    """KV blocks that hold `tokens` tokens (the last one maybe partly filled)."""
    return -(-tokens // block_size)


def admission_blocks(tokens: int, block_size: int) -> int:
    """KV blocks the engine needs free to admit a sequence of `tokens` tokens (its prompt plus any output it
    recomputes): room for those and for the first new token."""
    return kv_blocks_for(tokens + 1, block_size)


def chunk_pairs(done: float, take: float) -> float:
    """Attention pairs of a prefill chunk of `take` tokens after `done` cached tokens of the same sequence."""
    return take * (done + (take + 1) / 2.0)


def prompt_pairs(prompt_tokens: int, chunk: int) -> float:
    """Attention pairs of prefilling `prompt_tokens` alone, in chunks of at most `chunk` tokens."""
    total, done = 0.0, 0
    while done < prompt_tokens:
        take = min(chunk, prompt_tokens - done)
        total += chunk_pairs(done, take)
        done += take
    return total


def param(default: Any = MISSING, *, doc: str, gt: float | None = None, ge: float | None = None,
          file_default: Any = MISSING) -> Any:
    """A field of `EngineProfile` with its `default`, and in its metadata what a profile file needs to know of
    it: what it means (`doc`), the bounds `gt` / `ge` a value must respect, and `file_default`, the value a
    file may leave out for a field that has no default here (it keeps its place among the positional ones)."""
    return field(default=default, metadata={"doc": doc, "gt": gt, "ge": ge, "file_default": file_default})


def by_constructor(record: Any) -> tuple[Any, tuple[Any, ...]]:
    """`__reduce__` for a frozen dataclass: pickled by its constructor, since compiled by mypyc one cannot be
    unpickled field by field."""
    return type(record), tuple(getattr(record, f.name) for f in dc_fields(record))


@dataclass(frozen=True, slots=True)
class EngineProfile:
    """Timing and capacity of one model on one GPU type.

    Each field but `model` declares (see `param`) what it means and the bounds a profile file must keep to;
    `qlmctl.scenario` builds the profile section of a scenario from them."""

    model: str
    base_s: float = param(gt=0, doc="fixed cost of one engine step (reading the weights), s")
    per_prefill_token_s: float = param(
        ge=0, doc="cost of each token row of a step beyond `knee_tokens` (prefill tokens only without a knee), s")
    per_decode_seq_s: float = param(ge=0, doc="cost of each decoding sequence of a step (its token row, sampling), s")
    per_context_token_s: float = param(
        ge=0, file_default=0.0, doc="cost of each KV-cache token the decoding sequences of a step read, s")
    kv_blocks: int = param(gt=0, doc="KV cache capacity, in blocks of `block_size` tokens")
    block_size: int = param(DEFAULT_BLOCK_SIZE, gt=0, doc="tokens per KV block")
    max_num_seqs: int = param(256, gt=0, doc="vLLM's --max-num-seqs: most sequences in a step")
    max_num_batched_tokens: int = param(8192, gt=0, doc="vLLM's --max-num-batched-tokens: token budget of a step")
    max_model_len: int = param(32768, gt=0, doc="vLLM's --max-model-len: most prompt plus output tokens of a request")
    load_cold_s: float = param(30.0, ge=0, doc="time to load the model from disk onto a GPU that does not hold it, s")
    load_warm_s: float = param(1.0, ge=0, doc="time to wake the model from CPU memory (vLLM sleep mode level 1), s")
    sleep_s: float = param(
        0.0, ge=0, doc="time to put the model to sleep (vLLM sleep mode level 1: its weights copied to CPU memory, "
                       "its KV cache dropped), s: what a swap away from it costs before the next model loads "
                       "(`profile-model --sleep` measures it)")
    mean_output_tokens: float = param(
        256.0, gt=0, doc="prior for the RWT estimator's output-length distribution (mean)")
    std_output_tokens: float = param(
        256.0, ge=0, doc="prior for the RWT estimator's output-length distribution (standard deviation)")
    async_scheduling: bool = param(
        False, doc="vLLM schedules step N+1 while step N runs (on by default in recent vLLM; its log says "
                   "\"Asynchronous scheduling is enabled\"): a request that arrives during step N first runs in "
                   "step N+2")
    frontend_latency_s: float = param(
        0.0, ge=0, doc="fixed latency a client sees on top of the engine's steps (API server, tokenizer, HTTP), "
                       "added to the first-token and finish times a client observes; `profile-model` fits it as "
                       "the TTFT intercept, s")
    frontend_per_stream_s: float = param(
        0.0, ge=0, doc="extra client-visible latency per stream the server is relaying: vLLM's API server is one "
                       "Python process that detokenises and formats every streamed token, so a new request's "
                       "first token (and each request's last) waits longer the more streams it serves, s")
    per_prefill_pair_s: float = param(
        0.0, ge=0, doc="prefill attention: cost of each (query, key) pair that prefill tokens attend to, s")
    knee_tokens: int = param(
        0, ge=0, doc="token rows (prefill tokens and decode sequences) a step carries within `base_s` "
                     "(memory-bound GEMMs); every row beyond costs `per_prefill_token_s`. 0: prefill tokens "
                     "only, no knee")
    per_prefill_step_s: float = param(
        0.0, ge=0, doc="extra cost of a step that carries prefill tokens over a decode-only one, s")
    frontend_cpu_per_request_s: float = param(
        0.0, ge=0, doc="CPU time vLLM's API server spends taking in one request (HTTP, tokenising, hand-off), s")
    frontend_cpu_per_token_s: float = param(
        0.0, ge=0, doc="CPU time the API server spends per streamed output token (detokenising, formatting, "
                       "sending), s")
    frontend_usage_cpu_per_token_s: float = param(
        0.0, ge=0, doc="API-server CPU added per streamed token when every chunk carries the usage so far (vLLM's "
                       "stream_options.continuous_usage_stats, which `qlmctl serve` asks for under "
                       "live.token_count: usage), s; a simulated gateway policy adds it to "
                       "`frontend_cpu_per_token_s`, a client straight to vLLM (`direct`) does not. 0: not "
                       "measured (`profile-model --usage-cost` measures it beside its load windows; "
                       "bench/usage_cost.py reads it off a replay through the gateway and one straight to vLLM "
                       "on the same server)")
    api_server_count: int = param(
        1, ge=1, doc="vLLM's --api-server-count: requests, and the tokens streamed to them, are spread over "
                     "that many API-server processes, each one queue with the measured per-process costs (see "
                     "`frontend_wait`)")
    frontend_queue_factor: float = param(
        0.0, ge=0, doc="how many queueing waits of the API server's event loop a request's first token goes "
                       "through (fitted by `profile-model` from probes under load; 0 turns the queue model off; "
                       "see `frontend_wait`)")
    enable_prefix_caching: bool = param(
        True, doc="vLLM's --enable-prefix-caching (on by default in V1), as the scenario runs the engine; for the "
                  "engine model to read (the step model does not use it)")
    frontend_window_s: float = param(
        0.0, ge=0, doc="the load the API-server queue model sees: 0, that of the engine step in flight when the "
                       "request arrives (its streams over its length); > 0, the tokens streamed and steps taken "
                       "over an exponential window of this many seconds (`simulator.api_server`). The fit is the "
                       "same (its load windows are steady); they differ when short decode-only steps alternate "
                       "with long prefill ones")
    sustained_prefill_slowdown: float = param(
        0.0, ge=0, doc="how much slower prefill work runs once the GPU has been busy with it for a while, as a "
                       "share (0.05: 5 %): under sustained prefill load a GPU holds its power cap at a lower clock "
                       "(an H100 at 700 W: ~1,500 MHz against ~1,930 in short bursts), and `profile-model` times "
                       "bursts. It applies to a step's prefill terms while `sustained_prefill_share` of the recent "
                       "busy time (an exponential window of `sustained_window_s`) went to prefill work "
                       "(`profile-model --sustained` measures it)")
    sustained_prefill_share: float = param(
        0.6, ge=0, doc="share of the recent engine time spent in prefill work from which "
                       "`sustained_prefill_slowdown` applies")
    sustained_window_s: float = param(
        1.0, gt=0, doc="time constant of the window `sustained_prefill_share` is measured over, s")

    def frontend_delay(self, streams: int) -> float:
        """Client-visible latency outside the engine's steps while the server relays `streams` streams."""
        return self.frontend_latency_s + self.frontend_per_stream_s * streams

    def client_delay(self, streams: int) -> float:
        """All the client-visible delay outside the engine's steps at `streams` streams: `frontend_delay`
        plus the API server's queueing wait at the step such a decode batch takes (no arrival term: the
        caller estimating ahead does not know the arrival rate)."""
        step = self.decode_step_time(streams) if streams else self.base_s
        return self.frontend_delay(streams) + self.frontend_wait(streams, step, 0.0)

    def frontend_wait(self, streams: int, step_s: float, rate_rps: float) -> float:
        """Queueing delay in vLLM's API server before a new request reaches the engine while it streams a steady
        batch of `streams` sequences (a token each every step of `step_s`) and requests arrive at `rate_rps`, s:
        `frontend_wait_rates` at those rates."""
        if step_s > 0:
            return self.frontend_wait_rates(streams / step_s, 1.0 / step_s, rate_rps)
        return self.frontend_wait_rates(0.0, 0.0, rate_rps)

    def frontend_wait_rates(self, tokens_per_s: float, steps_per_s: float, rate_rps: float) -> float:
        """Queueing delay in vLLM's API server before a new request reaches the engine, seconds.

        The API server is one Python event loop: a single server whose work is `frontend_cpu_per_token_s`
        per streamed token (`tokens_per_s`, in bursts at the end of each engine step: `steps_per_s` of them)
        and `frontend_cpu_per_request_s` per request arriving at `rate_rps`. Its utilisation is rho; a
        request waits the mean residual work R of an M/G/1 queue over (1 - rho) (Pollaczek-Khinchine), once
        per loop hop on its way (`frontend_queue_factor`). rho is capped at 0.95: past that the real server
        merges the tokens it is late with into fewer chunks instead of falling behind without bound.
        With `api_server_count` N, each process serves 1/N of the tokens (at the same steps) and of the
        arrivals. The rates are what the server sees over a window (`simulator.api_server`), not those of
        the step in flight: a short decode-only step between long prefill ones does not load it more."""
        h = self.frontend_queue_factor
        if h <= 0.0:
            return 0.0
        residual, rho = self.frontend_queue_terms(tokens_per_s, steps_per_s, rate_rps)
        return h * residual / (1.0 - rho)

    def frontend_queue_terms(self, tokens_per_s: float, steps_per_s: float, rate_rps: float) -> tuple[float, float]:
        """(R, rho) of `frontend_wait_rates`: the mean residual CPU work a request finds in one API-server process
        and that process's utilisation (capped), at those rates."""
        n = max(1, self.api_server_count)
        ct, cr = self.frontend_cpu_per_token_s, self.frontend_cpu_per_request_s
        token_load = tokens_per_s / n * ct  # CPU seconds per second of one process's token work
        per_rate = rate_rps / n
        rho = min(FRONTEND_RHO_CAP, token_load + per_rate * cr)
        # Bursts of token_load / steps_per_s CPU seconds arriving steps_per_s times a second.
        residual = (token_load * token_load / (2.0 * steps_per_s) if steps_per_s > 0 else 0.0) \
            + per_rate * cr * cr / 2.0
        return residual, rho

    def billed_tokens(self, prefill_tokens: int, decode_seqs: int) -> int:
        """Token rows that cost `per_prefill_token_s`: those of the step beyond the knee (prefill tokens only
        when there is no knee)."""
        if self.knee_tokens <= 0:
            return prefill_tokens
        return max(0, prefill_tokens + decode_seqs - self.knee_tokens)

    def step_time(self, prefill_tokens: int, decode_seqs: int, context_tokens: int,
                  prefill_pairs: float = 0.0) -> float:
        """Seconds for one engine step of the given composition."""
        return (
            self.base_s
            + self.per_prefill_token_s * self.billed_tokens(prefill_tokens, decode_seqs)
            + self.per_decode_seq_s * decode_seqs
            + self.per_context_token_s * context_tokens
            + self.per_prefill_pair_s * prefill_pairs
            + (self.per_prefill_step_s if prefill_tokens > 0 else 0.0)
        )

    def decode_step_time(self, seqs: int) -> float:
        """Seconds of a decode-only step of `seqs` sequences of `TYPICAL_CONTEXT_TOKENS` context each: a step
        estimated ahead, when the contexts of its batch are not known."""
        return self.step_time(0, seqs, seqs * TYPICAL_CONTEXT_TOKENS)

    def decode_throughput(self, batch_size: int, mean_context: float) -> float:
        """Output tokens per second of a pure-decode batch of `batch_size` sequences."""
        if batch_size <= 0:
            return 0.0
        return batch_size / self.step_time(0, batch_size, int(batch_size * mean_context))

    def prefill_time(self, prompt_tokens: int) -> float:
        """Seconds to prefill `prompt_tokens` alone on an idle engine (chunked by the budget)."""
        if prompt_tokens <= 0:
            return 0.0
        if prompt_tokens <= self.max_num_batched_tokens:
            # One step: `prefill_terms`' arithmetic for that case, without its calls (policies ask this per
            # request on their hot path).
            knee = self.knee_tokens
            billed = prompt_tokens if knee <= 0 else max(0, prompt_tokens - knee)
            return (self.base_s + self.per_prefill_step_s + self.per_prefill_token_s * billed
                    + self.per_prefill_pair_s * (prompt_tokens * (0 + (prompt_tokens + 1) / 2.0)))
        steps, billed, pairs = self.prefill_terms(prompt_tokens)
        return (steps * (self.base_s + self.per_prefill_step_s) + self.per_prefill_token_s * billed
                + self.per_prefill_pair_s * pairs)

    def prefill_work_s(self, prompt_tokens: float) -> float:
        """Seconds a prompt of `prompt_tokens` adds to the steps of a busy batch it is prefilled in: its token
        rows, their attention pairs (as one chunk) and the prefill extra of each step its chunks ride in; no
        `base_s` and no knee, which the batch's decodes pay and fill anyway."""
        return (self.per_prefill_token_s * prompt_tokens + self.per_prefill_pair_s * chunk_pairs(0, prompt_tokens)
                + self.per_prefill_step_s * math.ceil(prompt_tokens / self.max_num_batched_tokens))

    def prefill_terms(self, prompt_tokens: int) -> tuple[int, int, float]:
        """(steps, billed prefill tokens, attention pairs) of prefilling `prompt_tokens` alone on an idle
        engine, in chunks of the token budget: what `prefill_time` weighs with the coefficients."""
        budget = self.max_num_batched_tokens
        full, last = divmod(prompt_tokens, budget)
        billed = full * self.billed_tokens(budget, 0) + self.billed_tokens(last, 0)
        return full + (1 if last else 0), billed, prompt_pairs(prompt_tokens, budget)

    def blocks_for(self, tokens: int) -> int:
        """KV blocks that hold `tokens` tokens."""
        return kv_blocks_for(tokens, self.block_size)

    def with_overrides(self, **fields: object) -> "EngineProfile":
        return replace(self, **fields)  # type: ignore[arg-type]

    def with_usage_stats(self) -> "EngineProfile":
        """This profile as its API server runs when every streamed chunk carries the usage so far: the
        measured extra (`frontend_usage_cpu_per_token_s`) folded into `frontend_cpu_per_token_s`, once."""
        extra = self.frontend_usage_cpu_per_token_s
        if extra <= 0.0:
            return self
        return self.with_overrides(frontend_cpu_per_token_s=self.frontend_cpu_per_token_s + extra,
                                   frontend_usage_cpu_per_token_s=0.0)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return by_constructor(self)

    @classmethod
    def from_token_throughput(
        cls,
        model: str,
        tokens_per_s: float,
        max_num_seqs: int = 256,
        kv_blocks: int = 32768,
        **fields: object,
    ) -> "EngineProfile":
        """Derive a profile from the public prototype's single figure (output tokens/s at a full batch).

        Assumes 90 % of a full-batch step is per-sequence work and 10 % fixed cost, so that a batch of
        `max_num_seqs` decodes at `tokens_per_s`; prefill is taken as 20x cheaper per token than a decode
        sequence (compute bound vs memory bound), and attention's context cost is folded into the rest.
        """
        if tokens_per_s <= 0:
            raise ValueError("token throughput must be positive")
        per_seq = 0.9 / tokens_per_s
        base = 0.1 * max_num_seqs / tokens_per_s
        return cls(
            model=model,
            base_s=base,
            per_prefill_token_s=per_seq / 20.0,
            per_decode_seq_s=per_seq,
            per_context_token_s=0.0,
            kv_blocks=kv_blocks,
            max_num_seqs=max_num_seqs,
            **fields,  # type: ignore[arg-type]
        )
