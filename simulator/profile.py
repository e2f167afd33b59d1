"""The engine timing profile: the cost of one vLLM engine step, and the instance's limits.

Form of the step cost (seconds), for a step that computes P prefill tokens and D decode
sequences whose KV context totals C tokens, where the prefill tokens attend to A (query, key) pairs:

    step_time = base_s + per_prefill_token_s * T' + per_decode_seq_s * D + per_context_token_s * C
                + per_prefill_pair_s * A + per_prefill_step_s * [P > 0],    T' = max(0, P + D - knee_tokens)

`knee_tokens` is how many token rows a step's GEMMs carry before they turn compute-bound: below it the
step costs what reading the weights costs (in `base_s`), so the first prefill tokens that join a small
decode batch are nearly free (measured on an H200: 256 prefill tokens add 3.5 ms to a 32-sequence decode
step, but 2,048 add 44 ms), and every row beyond it, prefill token or decode sequence alike, costs
`per_prefill_token_s`. That is also why a decode-only step of more than `knee_tokens` sequences grows
faster per sequence (on the H200's 8B: 3.5 % too fast at 256 decodes when decode rows were not billed).
`knee_tokens = 0` gives a plain linear model (T' = P: prefill tokens only).

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
launched layer by layer outside the graphs). Measured on an H200 (8B shape) at about 1.6 ms; without it
the fit pushed that cost into the decode coefficients and overestimated steps of 96-160 decodes by 8-9 %.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


FRONTEND_RHO_CAP = 0.95


def chunk_pairs(done: int, take: int) -> float:
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


@dataclass(frozen=True, slots=True)
class EngineProfile:
    """Timing and capacity of one model on one GPU type."""

    model: str
    base_s: float
    per_prefill_token_s: float
    per_decode_seq_s: float
    per_context_token_s: float
    kv_blocks: int
    """KV cache capacity, in blocks of `block_size` tokens."""
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 32768
    load_cold_s: float = 30.0
    """Time to load the model from disk onto a GPU that does not hold it."""
    load_warm_s: float = 1.0
    """Time to wake the model from CPU memory (vLLM sleep mode level 1)."""
    mean_output_tokens: float = 256.0
    """Prior for the RWT estimator's output-length distribution (mean)."""
    std_output_tokens: float = 256.0
    """Prior for the RWT estimator's output-length distribution (standard deviation)."""
    async_scheduling: bool = False
    """vLLM schedules step N+1 while step N runs (on by default in recent vLLM; its log says "Asynchronous
    scheduling is enabled"): a request that arrives during step N first runs in step N+2."""
    frontend_latency_s: float = 0.0
    """Fixed latency a client sees on top of the engine's steps (API server, tokenizer, HTTP), added to the
    first-token and finish times a client observes; `profile-model` fits it as the TTFT intercept."""
    frontend_per_stream_s: float = 0.0
    """Extra client-visible latency per stream the server is relaying: vLLM's API server is one Python
    process that detokenises and formats every streamed token, so a new request's first token (and each
    request's last) waits longer the more streams it serves. Measured by `profile-model` with probes."""
    per_prefill_pair_s: float = 0.0
    """Prefill attention: seconds per (query, key) pair that prefill tokens attend to (see module doc)."""
    knee_tokens: int = 0
    """Token rows a step carries within `base_s` (memory-bound GEMMs); every row beyond it, prefill token or
    decode sequence, costs `per_prefill_token_s` (see module doc). 0: prefill tokens only, no knee."""
    per_prefill_step_s: float = 0.0
    """Extra seconds of a step that carries prefill tokens over a decode-only one (see module doc)."""
    frontend_cpu_per_request_s: float = 0.0
    """CPU seconds vLLM's API server spends taking in one request (HTTP, tokenising, hand-off)."""
    frontend_cpu_per_token_s: float = 0.0
    """CPU seconds the API server spends per streamed output token (detokenising, formatting, sending)."""
    api_server_count: int = 1
    """vLLM's `--api-server-count`: requests, and the tokens streamed to them, are spread over that many
    API-server processes, each one queue with the measured per-process costs (see `frontend_wait`)."""
    enable_prefix_caching: bool = True
    """vLLM's `--enable-prefix-caching` (on by default in V1), as the scenario runs the engine; for the engine
    model to read (the step model does not use it)."""
    frontend_queue_factor: float = 0.0
    """How many queueing waits of the API server's event loop a request's first token goes through
    (fitted by `profile-model` from probes under load; 0 turns the queue model off). See `frontend_wait`."""

    def frontend_delay(self, streams: int) -> float:
        """Client-visible latency outside the engine's steps while the server relays `streams` streams."""
        return self.frontend_latency_s + self.frontend_per_stream_s * streams

    def client_delay(self, streams: int) -> float:
        """All the client-visible delay outside the engine's steps at `streams` streams: `frontend_delay`
        plus the API server's queueing wait at the step such a decode batch takes (no arrival term: the
        caller estimating ahead does not know the arrival rate)."""
        step = self.step_time(0, streams, streams * 1024) if streams else self.base_s
        return self.frontend_delay(streams) + self.frontend_wait(streams, step, 0.0)

    def frontend_wait(self, streams: int, step_s: float, rate_rps: float) -> float:
        """Queueing delay in vLLM's API server before a new request reaches the engine, seconds.

        The API server is one Python event loop: a single server whose work is `frontend_cpu_per_token_s`
        per streamed token (a burst of `streams` tokens every engine step of `step_s`) and
        `frontend_cpu_per_request_s` per request arriving at `rate_rps`. Its utilisation is rho; a request
        waits the mean residual work R of an M/G/1 queue over (1 - rho) (Pollaczek-Khinchine), once per
        loop hop on its way (`frontend_queue_factor`). rho is capped at 0.95: past that the real server
        merges the tokens it is late with into fewer chunks instead of falling behind without bound.
        With `api_server_count` N, each process serves 1/N of the streams and of the arrivals."""
        h = self.frontend_queue_factor
        if h <= 0.0:
            return 0.0
        n = max(1, self.api_server_count)
        per_streams, per_rate = streams / n, rate_rps / n  # one process's share
        ct, cr = self.frontend_cpu_per_token_s, self.frontend_cpu_per_request_s
        burst = per_streams * ct
        per_step = burst / step_s if step_s > 0 else 0.0
        rho = min(FRONTEND_RHO_CAP, per_step + per_rate * cr)
        residual = (burst * burst / (2.0 * step_s) if step_s > 0 else 0.0) + per_rate * cr * cr / 2.0
        return h * residual / (1.0 - rho)

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

    def decode_throughput(self, batch_size: int, mean_context: float) -> float:
        """Output tokens per second of a pure-decode batch of `batch_size` sequences."""
        if batch_size <= 0:
            return 0.0
        return batch_size / self.step_time(0, batch_size, int(batch_size * mean_context))

    def prefill_time(self, prompt_tokens: int) -> float:
        """Seconds to prefill `prompt_tokens` alone on an idle engine (chunked by the budget)."""
        if prompt_tokens <= 0:
            return 0.0
        steps, billed, pairs = self.prefill_terms(prompt_tokens)
        return (steps * (self.base_s + self.per_prefill_step_s) + self.per_prefill_token_s * billed
                + self.per_prefill_pair_s * pairs)

    def prefill_terms(self, prompt_tokens: int) -> tuple[int, int, float]:
        """(steps, billed prefill tokens, attention pairs) of prefilling `prompt_tokens` alone on an idle
        engine, in chunks of the token budget: what `prefill_time` weighs with the coefficients."""
        budget = self.max_num_batched_tokens
        full, last = divmod(prompt_tokens, budget)
        billed = full * self.billed_tokens(budget, 0) + self.billed_tokens(last, 0)
        return full + (1 if last else 0), billed, prompt_pairs(prompt_tokens, budget)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def with_overrides(self, **fields: object) -> "EngineProfile":
        return replace(self, **fields)  # type: ignore[arg-type]

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
