"""Fit the step-time model of `simulator.profile` to an engine's measurements, and write the profile.

The measurements (`RawProfile`: prefill, decode, mixed-step and frontend points, the KV capacity, swap
times) come from `qlmctl profile-model`'s prober (`qlmctl.client.prober`, which says how each is taken);
they are kept as JSON so that a fit can be redone off the GPU. Here is only arithmetic over them.

The fit is a non-negative least squares on relative error over every point (A = attention pairs,
T' = token rows beyond the knee, see simulator.profile):
    decode point:  itl  = base + a*T'(0, D) + b*D + c*C   (also the pure-decode steps around each mixed window)
    prefill point: ttft = overhead + ceil(L/budget)*(base + m) + a*T'(L) + q*A(L)   (by the engine's own
                   prefill histogram, without the overhead, when it exports one; overhead = the median gap)
    mixed point:   step = base + m + a*T'(L, D) + q*A(L) + b*D + c*C
With mixed points the knee is chosen (0 to 512 tokens) for the least mean error; without them it is 0,
and so is m (the cost of a step carrying prefill, which only mixed steps tell apart from base).

Sustained-load windows (steps under a steady stream of prompts beside decoders, after the first seconds) are
fitted after the step model: their time less their decode part (timed as the decode-only windows of the same run
ran, which carry the host's own offset), over the model's prefill work, is how much slower that work runs once
the GPU has been busy with it (`EngineProfile.sustained_prefill_slowdown`).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from simulator.profile import EngineProfile, chunk_pairs


@dataclass
class PrefillPoint:
    prompt_tokens: int
    ttft_s: float
    """Median TTFT as this client saw it (HTTP and the API server included)."""
    engine_s: float | None = None
    """Median of vLLM's own prefill time for it (`vllm:request_prefill_time_seconds`: scheduled to first
    token), when the engine exports it: the steps alone, without the client-side noise."""


@dataclass
class DecodePoint:
    batch: int
    prompt_tokens: int
    output_tokens: int
    itl_s: float
    """Step time with every sequence decoding (from two rounds of different output lengths)."""
    context_tokens: float
    """Mean KV tokens of the whole batch during that part."""


@dataclass
class MixedPoint:
    batch: int
    prompt_tokens: int
    """Prompt length of each decoding sequence."""
    prefill_tokens: int
    """Tokens of the prefill that shares the step with the decodes."""
    step_s: float
    """Time of one step with `batch` decodes and the prefill."""
    decode_step_s: float
    """Time of the pure-decode steps around it (same batch)."""
    context_tokens: float
    """KV tokens of the decoding sequences during the window."""


@dataclass
class FrontendPoint:
    streams: int
    """Streaming decodes the server was relaying while the probes ran."""
    step_s: float
    """The engine's decode step meanwhile (its inter-token latency)."""
    ttft_s: float
    """Median TTFT of the probes (prefill-only requests of `probe_tokens`)."""
    probe_tokens: int


SATURATED_CPU_PER_S = 0.98
"""An API server whose CPU counter read this much of one core over a window was saturated: the counter reads its cap,
not the window's cost, and the queue grew for the whole window (`FrontendLoadPoint.ran_away`)."""


def queue_ran_away(probes: int, rate_rps: float, window_s: float, cpu_per_s: float | None = None) -> bool:
    """Whether `probes` sent over `window_s` and measured at `rate_rps` (over the time until all were answered) took
    over twice the window to answer, or the API server's CPU (`cpu_per_s`, where measured) sat at one core
    (`FrontendLoadPoint.ran_away`)."""
    if cpu_per_s is not None and cpu_per_s >= SATURATED_CPU_PER_S:
        return True
    return rate_rps > 0 and probes / rate_rps > 2.0 * window_s


@dataclass
class FrontendLoadPoint:
    """One window of probes arriving at `rate_rps` (Poisson) while the server streams to `streams` clients."""

    streams: int
    rate_rps: float
    """Probes sent over the window, per second."""
    probes: int
    probe_tokens: int
    step_s: float
    """The engine's mean step meanwhile (its inter-token latency; 0 without streams)."""
    tokens_per_s: float
    """Tokens streamed per second (the engine's inter-token latency count over the window)."""
    client_ttft_s: float
    """Mean TTFT of the probes, as this client saw it."""
    cpu_per_s: float | None = None
    """CPU seconds per second of the API server process (its `process_cpu_seconds_total`), if exported."""
    vllm_ttft_s: float | None = None
    """Mean TTFT of the probes by vLLM's own histogram (API server arrival to first token)."""
    engine_s: float | None = None
    """Mean queue + prefill time of the probes by vLLM's histograms (engine core only)."""
    probe_out: int = 1
    """Tokens each probe asked for, streamed back (1: a prefill-only probe)."""
    probe_words: bool = False
    """Whether the probes' prompts were words for the API server to tokenize (as a trace's requests are) rather
    than token ids."""
    window_s: float | None = None
    """Seconds over which the probes were sent (`profile-model --load-window-s`; None in raw files made before it
    was recorded). The window's measurement lasts until every probe is answered: `probes / rate_rps` seconds."""
    usage_chunks: bool = False
    """Whether the load streams asked for the usage so far in every chunk (vLLM's
    `stream_options.continuous_usage_stats`, as `qlmctl serve` does under `live.token_count: usage`): such windows
    measure what that costs the API server a token (`frontend_usage_cpu_per_token_s`)."""

    def ran_away(self, window_s: float) -> bool:
        """Whether the API server's queue did not settle in the window: answering its probes took over twice the
        window (`self.window_s`, else `window_s`), so the backlog outlived it by a window or more, or its CPU counter
        sat at one core (`SATURATED_CPU_PER_S`). Such a window's wait grows with the window's length and its counter
        reads the cap, not the cost: it measures the window, not the server (on an H200 at 256 streams, probes
        waited 4-10 s in 4-s windows; on an H100, 1.4-2.4 s in 4-s windows answered within 8 s, the counter at
        0.99-1.01 pulling the fitted cost a token from about 71 us down to 55)."""
        return queue_ran_away(self.probes, self.rate_rps, self.window_s or window_s, self.cpu_per_s)

    @property
    def probe_kind(self) -> str:
        """"words:64" or "ids:1": how the probes were made (`profile-model --load-probes`)."""
        return f"{'words' if self.probe_words else 'ids'}:{self.probe_out}"


@dataclass
class SustainedWindow:
    """A window of a sustained-load run: `decoders` streams decoding throughout, and (`kind` "load") prompts of
    `prompt_length` tokens sent at `rate_rps` (None: as many as keep every step full) or (`kind` "decode")
    none, just before or after."""

    run: int
    kind: str
    index: int
    """Order within the run (decode windows: -1 before, a large number after)."""
    decoders: int
    prompt_length: int
    rate_rps: float | None
    steps: float
    """Engine steps in the window (the decoders' inter-token latencies counted, over `decoders`)."""
    time_s: float
    """Their total time (the latencies summed, over `decoders`)."""
    prompt_tokens: float
    """Prompt tokens the engine prefilled in the window (its prompt-token counter)."""
    context_tokens: float
    """KV tokens of each decoder at the window's middle."""


@dataclass
class RawProfile:
    """Everything measured, kept so fitting can be redone off the GPU."""

    model: str
    url: str
    prefill: list[PrefillPoint] = field(default_factory=list)
    decode: list[DecodePoint] = field(default_factory=list)
    mixed: list[MixedPoint] = field(default_factory=list)
    frontend: list[FrontendPoint] = field(default_factory=list)
    frontend_load: list[FrontendLoadPoint] = field(default_factory=list)
    sustained: list[SustainedWindow] = field(default_factory=list)
    num_gpu_blocks: int | None = None
    block_size: int | None = None
    max_model_len: int | None = None
    sleep_s: float | None = None
    wake_s: float | None = None
    launch_s: float | None = None
    """Launch to /health of the engine (a cold model load), when profile-model started it."""
    async_scheduling: bool | None = None
    """Whether the engine schedules a step ahead (recorded from the command line; not visible over HTTP)."""
    engine_version: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "RawProfile":
        d = json.loads(text)
        d["prefill"] = [PrefillPoint(**p) for p in d.get("prefill", [])]
        d["decode"] = [DecodePoint(**p) for p in d.get("decode", [])]
        d["mixed"] = [MixedPoint(**p) for p in d.get("mixed", [])]
        d["frontend"] = [FrontendPoint(**p) for p in d.get("frontend", [])]
        d["frontend_load"] = [FrontendLoadPoint(**p) for p in d.get("frontend_load", [])]
        d["sustained"] = [SustainedWindow(**p) for p in d.get("sustained", [])]
        return cls(**d)


@dataclass
class Fit:
    base_s: float
    per_prefill_token_s: float
    per_decode_seq_s: float
    per_context_token_s: float
    per_prefill_pair_s: float
    knee_tokens: int
    overhead_s: float
    errors: list[tuple[str, float, float, float]]
    """(point label, measured s, fitted s, relative error)."""
    per_prefill_step_s: float = 0.0
    frontend_per_stream_s: float = 0.0
    frontend_errors: list[tuple[str, float, float, float]] = field(default_factory=list)
    """Probe TTFTs under streaming load: measured, modelled (engine + frontend), relative error."""
    frontend_left_out: list[str] = field(default_factory=list)
    """API-server load windows left out of the queue fit, and why."""
    frontend_cpu_per_request_s: float = 0.0
    frontend_cpu_per_token_s: float = 0.0
    frontend_usage_cpu_per_token_s: float | None = None
    """The API server's extra CPU a streamed token when its chunk carries the usage so far (None: no window with
    such streams was kept)."""
    frontend_idle_cpu: float = 0.0
    """The API server's CPU use with nothing to do (its polling), CPU s per s."""
    frontend_queue_factor: float = 0.0
    frontend_probes: str | None = None
    """The probes of the load windows the queue model was fitted on ("words:64"; `FrontendLoadPoint.probe_kind`)."""
    frontend_latency_s: float | None = None
    """Intercept of the queue-model fit (replaces the HTTP overhead as the profile's frontend latency)."""
    sustained_prefill_slowdown: float | None = None
    """From the sustained-load windows (None: none measured)."""
    sustained_runs: list[tuple[int, float, float, float, float]] = field(default_factory=list)
    """Per sustained-load run: (run, decode-only time over the model's, loaded time over the model's, prefill
    share of the model's time, the slowdown of prefill work they imply)."""

    @property
    def mean_abs_error(self) -> float:
        return float(np.mean([abs(e[3]) for e in self.errors])) if self.errors else 0.0

    @property
    def max_abs_error(self) -> float:
        return float(max(abs(e[3]) for e in self.errors)) if self.errors else 0.0


KNEES = range(0, 513, 16)


def load_probe_points(raw: RawProfile, kind: str | None = None) -> list[FrontendLoadPoint]:
    """The API-server load windows to fit the queue model on: those whose probes were made as `kind` ("words:64",
    `FrontendLoadPoint.probe_kind`); by default the first kind measured, so that a raw file holding windows with
    trace-like probes and with token-id ones fits on what was asked for first. ValueError if none is of `kind`."""
    pts = raw.frontend_load
    if not pts:
        return []
    kind = kind or pts[0].probe_kind
    chosen = [p for p in pts if p.probe_kind == kind]
    if not chosen:
        kinds = ", ".join(sorted({p.probe_kind for p in pts}))
        raise ValueError(f"no API-server load windows with probes '{kind}' (measured: {kinds})")
    return chosen


DEFAULT_LOAD_WINDOW_S = 5.0
"""`profile-model --load-window-s`'s default: the window of raw files that did not record theirs."""


def fit_profile(raw: RawProfile, max_num_batched_tokens: int, quadratic: bool = True,
                knee: int | None = None, load_probes: str | None = None,
                load_window_s: float = DEFAULT_LOAD_WINDOW_S) -> Fit:
    """Fit the step-time coefficients to the raw measurements (see module docstring).

    `quadratic=False` leaves out the prefill-attention term; `knee` fixes the knee instead of searching;
    `load_probes` picks the API-server load windows the queue model is fitted on (`load_probe_points`);
    `load_window_s` is their window where the raw file did not record it (`FrontendLoadPoint.ran_away`)."""
    knees = [knee] if knee is not None else (list(KNEES) if raw.mixed else [0])
    fits = [_fit_at(raw, max_num_batched_tokens, quadratic, k) for k in knees]
    best = min(fits, key=lambda f: f.mean_abs_error)
    if raw.frontend:
        _fit_frontend(raw, best, max_num_batched_tokens)
    if raw.frontend_load:
        _fit_frontend_queue(raw, load_probe_points(raw, load_probes), best, max_num_batched_tokens, load_window_s)
    if raw.sustained:
        _fit_sustained(raw, best, max_num_batched_tokens)
    return best


SUSTAINED_SHARE = 0.6
"""Runs whose prefill work took at least this share of the model's time make the sustained slowdown (and the
profile's `sustained_prefill_share`): bench/device/power_steps.py on two H100s found none at 0.44-0.46, and 4.5-8.8 %
at 0.74-0.94."""


def window_model_s(prof: EngineProfile, w: SustainedWindow) -> tuple[float, float]:
    """(the step model's time for `w`'s steps, its decode-only part): `w.steps` steps beside `w.decoders`
    decoders of `w.context_tokens` each that prefilled `w.prompt_tokens` tokens in prompts of `w.prompt_length`.
    A prompt or more a step on average: spread evenly over the steps; fewer: a step of its own for each prompt,
    the rest decode only."""
    if w.steps <= 0:
        return 0.0, 0.0
    # (Whole tokens, as the step model takes them: the compiled build checks its argument types.)
    b, ctx, n = w.decoders, round(w.decoders * w.context_tokens), w.prompt_length
    plain = prof.step_time(0, b, ctx)
    decode = w.steps * plain
    per = w.prompt_tokens / w.steps
    if per >= n:
        return w.steps * prof.step_time(round(per), b, ctx, per / n * chunk_pairs(0, n)), decode
    prompts = w.prompt_tokens / n
    return prompts * prof.step_time(n, b, ctx, chunk_pairs(0, n)) + (w.steps - prompts) * plain, decode


def _fit_sustained(raw: RawProfile, fit: Fit, budget: int) -> None:
    """Set `fit.sustained_prefill_slowdown` from the sustained-load runs: each run's load windows of its second
    half (the GPU settled), less their decode part at the decode-only windows' pace, against the model's prefill
    work; the run at the highest share (overload keeps steps full of prompts) is the figure, if it reaches
    `SUSTAINED_SHARE` (else 0: no slowdown seen where it would show)."""
    fit.sustained_runs = sustained_slowdowns(_step_profile(fit, budget), raw.sustained)
    best = max(((share, slow) for _, _, _, share, slow in fit.sustained_runs if share >= SUSTAINED_SHARE),
               default=None)
    if fit.sustained_runs:
        fit.sustained_prefill_slowdown = max(0.0, best[1]) if best is not None else 0.0


def sustained_slowdowns(prof: EngineProfile, windows: list[SustainedWindow]) -> list[tuple[int, float, float, float,
                                                                                             float]]:
    """Per run of `windows`: (run, decode-only time over `prof`'s, loaded time over its (second half), the share
    of the loaded time that is prefill work by the model, and how much slower than the model that work ran)."""
    out = []
    for run in sorted({w.run for w in windows}):
        ws = [w for w in windows if w.run == run]
        dec = [w for w in ws if w.kind == "decode" and w.steps > 0]
        load = sorted((w for w in ws if w.kind == "load" and w.steps > 0), key=lambda w: w.index)
        late = load[len(load) // 2:]
        if not dec or not late:
            continue
        dec_model = sum(window_model_s(prof, w)[0] for w in dec)
        models = [window_model_s(prof, w) for w in late]
        total = sum(m for m, _ in models)
        if dec_model <= 0 or total <= 0:
            continue
        dec_ratio = sum(w.time_s for w in dec) / dec_model
        ratio = sum(w.time_s for w in late) / total
        share = 1.0 - sum(d for _, d in models) / total
        # The decode part of the loaded steps runs as the decode-only windows did (the host's own offset, and
        # whatever the model misses at their contexts); the rest of the time over the model's is prefill work's.
        slow = (ratio - dec_ratio * (1.0 - share)) / share - 1.0 if share > 0 else 0.0
        out.append((run, dec_ratio, ratio, share, slow))
    return out


def _step_profile(fit: Fit, budget: int, **fields: Any) -> EngineProfile:
    return EngineProfile(model="", base_s=fit.base_s, per_prefill_token_s=fit.per_prefill_token_s,
                         per_decode_seq_s=fit.per_decode_seq_s, per_context_token_s=fit.per_context_token_s,
                         kv_blocks=1, max_num_batched_tokens=budget, per_prefill_pair_s=fit.per_prefill_pair_s,
                         knee_tokens=fit.knee_tokens, per_prefill_step_s=fit.per_prefill_step_s, **fields)


def probe_lag_steps(raw: RawProfile) -> float:
    """Steps a probe waits before its own, on average: the rest of the step it lands in (half), and one more with
    asynchronous scheduling (unknown counts as on, vLLM 0.24's default)."""
    return 1.5 if raw.async_scheduling is not False else 0.5


def _probe_engine_s(prof: EngineProfile, streams: int, step_s: float, probe_tokens: int, lag: float) -> float:
    """Engine part of a probe's TTFT: alone, its prefill; joining `streams` decodes of `step_s`, the rest of
    the step it lands in, one more with asynchronous scheduling (`lag` 1.5 or 0.5 steps), then its own
    mixed step."""
    if streams == 0 or step_s <= 0:
        return prof.prefill_time(probe_tokens)
    extra = (prof.step_time(probe_tokens, streams, 0, chunk_pairs(0, probe_tokens))
             - prof.step_time(0, streams, 0))
    return lag * step_s + step_s + extra


def window_engine_s(p: FrontendLoadPoint, costs: EngineProfile, lag: float) -> float:
    """The engine's part of a load window's probe TTFT, as the simulator counts it."""
    if p.engine_s is not None:
        # vLLM's queue + prefill times start when the engine core takes the request in, at the end of the step it
        # arrived in: half a step on average, which the simulator counts as engine time.
        return p.engine_s + 0.5 * p.step_s
    # An engine without those histograms: the step model's view (probes assumed not to overlap).
    return _probe_engine_s(costs, p.streams, p.step_s, p.probe_tokens, lag)


def fit_latency_and_factor(rows: list[tuple[FrontendLoadPoint, float, float]]) -> tuple[float, float]:
    """The API server's latency and queue factor h over load windows `rows` of (window, engine part, wait at
    h = 1): client TTFT = engine part + latency + h * wait, by non-negative least squares on the relative error
    (like the step fit)."""
    from scipy.optimize import nnls

    a = np.array([[1.0, w] for _, _, w in rows])
    y = np.array([p.client_ttft_s - engine for p, engine, _ in rows])
    w = 1.0 / np.array([p.client_ttft_s for p, _, _ in rows])
    coef, _ = nnls(a * w[:, None], y * w)
    return float(coef[0]), float(coef[1])


def _window_label(p: FrontendLoadPoint) -> str:
    usage = " + usage" if p.usage_chunks else ""  # (streams asking for usage in every chunk)
    return f"probes {p.probe_kind} {p.rate_rps:.0f}/s, {p.streams} streams{usage}"


def _fit_frontend_queue(raw: RawProfile, pts: list[FrontendLoadPoint], fit: Fit, budget: int,
                        window_s: float = DEFAULT_LOAD_WINDOW_S) -> None:
    """The API server as one queue (see EngineProfile.frontend_wait): its CPU cost per request and per
    streamed token by least squares on its CPU counter over the windows, then the probes' TTFT beyond
    the engine's part = latency + factor * (queueing wait at those costs), fitted over the windows. Windows
    whose queue ran away (`FrontendLoadPoint.ran_away`) are left out of both fits and listed as such."""
    from scipy.optimize import nnls

    fit.frontend_probes = pts[0].probe_kind
    kept: list[FrontendLoadPoint] = []
    away: list[FrontendLoadPoint] = []
    for p in pts:
        (away if p.ran_away(window_s) else kept).append(p)
    pts = kept
    fit.frontend_left_out = [f"{_window_label(p)}: {p.client_ttft_s:.2f} s TTFT, queue ran away" for p in away]
    if not pts:
        return
    cpu = [p for p in pts if p.cpu_per_s is not None]
    # The usage extra is told apart only beside windows whose streams carried no usage.
    usage = any(p.usage_chunks for p in cpu) and any(p.tokens_per_s > 0 and not p.usage_chunks for p in cpu)
    if not usage:
        cpu = [p for p in cpu if not p.usage_chunks]
    if len(cpu) >= 3 + usage:
        # CPU per second = idle + per request * rate + per token * tokens (+ the usage extra * the tokens of
        # streams that asked for usage in every chunk: windows beside the same streams without it tell it apart).
        a = np.array([[1.0, p.rate_rps, p.tokens_per_s] + ([p.tokens_per_s * p.usage_chunks] if usage else [])
                      for p in cpu])
        y = np.array([p.cpu_per_s for p in cpu])
        coef, _ = nnls(a, y)
        fit.frontend_idle_cpu, fit.frontend_cpu_per_request_s, fit.frontend_cpu_per_token_s = map(float, coef[:3])
        if usage:
            fit.frontend_usage_cpu_per_token_s = float(coef[3])
    if fit.frontend_cpu_per_token_s <= 0 and fit.frontend_cpu_per_request_s <= 0:
        return  # no CPU counter (or no cost seen): no queue model; the probes' per-stream fit stands
    lag = probe_lag_steps(raw)
    costs = _step_profile(fit, budget, frontend_cpu_per_request_s=fit.frontend_cpu_per_request_s,
                          frontend_cpu_per_token_s=fit.frontend_cpu_per_token_s, frontend_queue_factor=1.0,
                          frontend_usage_cpu_per_token_s=fit.frontend_usage_cpu_per_token_s or 0.0)
    rows = []
    for p in pts:
        # The server's load as measured over the window: probes that stream answers add tokens of their own.
        steps_per_s = 1.0 / p.step_s if p.step_s > 0 else 0.0
        at = costs.with_usage_stats() if p.usage_chunks else costs
        rows.append((p, window_engine_s(p, at, lag), at.frontend_wait_rates(p.tokens_per_s, steps_per_s, p.rate_rps)))
    # Latency and h from the windows as clients straight to vLLM meet the server; the usage windows are then a
    # check of the model with the usage cost added (their errors are listed with the others).
    plain = [r for r in rows if not r[0].usage_chunks]
    fit.frontend_latency_s, fit.frontend_queue_factor = fit_latency_and_factor(plain or rows)
    fit.frontend_per_stream_s = 0.0  # the queue model's burst term is what the per-stream delay stood for
    fit.frontend_errors = []
    for (p, engine, wait) in rows:
        model = engine + fit.frontend_latency_s + fit.frontend_queue_factor * wait
        fit.frontend_errors.append((_window_label(p), p.client_ttft_s, model,
                                    (model - p.client_ttft_s) / p.client_ttft_s))


def _fit_frontend(raw: RawProfile, fit: Fit, budget: int) -> None:
    """Frontend delay per stream relayed: probe TTFT = engine part + overhead + k * streams (least squares
    through the fitted overhead). The engine part of a probe joining `streams` decodes is half a step
    (it lands mid-step), one more step with asynchronous scheduling, then its own mixed step."""
    prof = _step_profile(fit, budget)
    lag = probe_lag_steps(raw)
    rows = [(p, _probe_engine_s(prof, p.streams, p.step_s, p.probe_tokens, lag)) for p in raw.frontend]
    num = sum(p.streams * (p.ttft_s - engine - fit.overhead_s) for p, engine in rows)
    den = sum(p.streams ** 2 for p, _ in rows)
    fit.frontend_per_stream_s = max(0.0, num / den) if den else 0.0
    for p, engine in rows:
        model = engine + fit.overhead_s + fit.frontend_per_stream_s * p.streams
        fit.frontend_errors.append((f"probe with {p.streams} streams", p.ttft_s, model, (model - p.ttft_s) / p.ttft_s))


def _fit_at(raw: RawProfile, budget: int, quadratic: bool, knee: int) -> Fit:
    from scipy.optimize import nnls

    shape = EngineProfile(model="", base_s=1.0, per_prefill_token_s=0.0, per_decode_seq_s=0.0,
                          per_context_token_s=0.0, kv_blocks=1, max_num_batched_tokens=budget, knee_tokens=knee)
    rows: list[list[float]] = []
    ys: list[float] = []
    labels: list[str] = []
    # Columns: base, a (prefill/token), b (decode/seq), c (context/token), q (prefill pair), overhead,
    # m (a step with prefill). m is told apart from base only by mixed steps next to pure-decode ones.
    for p in raw.decode:
        rows.append([1.0, float(shape.billed_tokens(0, p.batch)), float(p.batch), float(p.context_tokens),
                     0.0, 0.0, 0.0])
        ys.append(p.itl_s)
        labels.append(f"decode B={p.batch} ctx={p.prompt_tokens}")
    for p in raw.mixed:  # the pure-decode steps around each mixed window are decode points too
        rows.append([1.0, float(shape.billed_tokens(0, p.batch)), float(p.batch), float(p.context_tokens),
                     0.0, 0.0, 0.0])
        ys.append(p.decode_step_s)
        labels.append(f"decode B={p.batch} ctx={p.prompt_tokens} (by L={p.prefill_tokens})")
    for p in raw.prefill:
        chunks, billed, pairs = shape.prefill_terms(p.prompt_tokens)
        # Timed by the engine itself when it could be: no HTTP overhead in it (see _overhead).
        timed = p.engine_s is not None
        rows.append([float(chunks), float(billed), 0.0, 0.0, pairs, 0.0 if timed else 1.0, float(chunks)])
        ys.append(p.engine_s if timed else p.ttft_s)
        labels.append(f"prefill L={p.prompt_tokens}")
    for p in raw.mixed:
        billed = shape.billed_tokens(p.prefill_tokens, p.batch)
        rows.append([1.0, float(billed), float(p.batch), float(p.context_tokens),
                     chunk_pairs(0, p.prefill_tokens), 0.0, 1.0])
        ys.append(p.step_s)
        labels.append(f"mixed B={p.batch} ctx={p.prompt_tokens} L={p.prefill_tokens}")
    keep = [0, 1, 2, 3] + ([4] if quadratic else []) + [5] + ([6] if raw.mixed else [])
    rows = [[r[i] for i in keep] for r in rows]
    cols = len(keep)
    if len(rows) < cols:
        raise ValueError(f"too few measurements to fit {cols} coefficients")
    a = np.array(rows)
    y = np.array(ys)
    w = 1.0 / y  # relative error
    # Scale columns so that NNLS is well conditioned.
    scale = np.maximum(np.abs(a * w[:, None]).max(axis=0), 1e-30)
    coef, _ = nnls((a * w[:, None]) / scale, y * w)
    coef = coef / scale
    pred = a @ coef
    full = np.zeros(7)
    full[keep] = coef
    coef = full
    errors = [(lab, float(m), float(f), float((f - m) / m)) for lab, m, f in zip(labels, y, pred)]
    return Fit(
        base_s=float(coef[0]),
        per_prefill_token_s=float(coef[1]),
        per_decode_seq_s=float(coef[2]),
        per_context_token_s=float(coef[3]),
        per_prefill_pair_s=float(coef[4]),
        knee_tokens=knee,
        overhead_s=_overhead(raw, float(coef[5])),
        errors=errors,
        per_prefill_step_s=float(coef[6]),
    )


def _overhead(raw: RawProfile, fitted: float) -> float:
    """The client-visible time around a lone prefill (HTTP, the API server): measured as client TTFT minus
    the engine's own prefill time where the engine timed every prefill point, else the fit's intercept."""
    timed = [p.ttft_s - p.engine_s for p in raw.prefill if p.engine_s is not None]
    if raw.prefill and len(timed) == len(raw.prefill):
        return max(0.0, float(statistics.median(timed)))
    return fitted


def profile_dict(raw: RawProfile, fit: Fit, *, max_num_seqs: int, max_num_batched_tokens: int,
                 gpu: str, flags: str, kv_blocks: int | None = None) -> dict[str, Any]:
    """The profile as a scenario `profile_file` (ProfileSpec fields + provenance)."""
    blocks = kv_blocks or raw.num_gpu_blocks
    if not blocks:
        raise ValueError("KV capacity unknown: the engine did not report vllm:cache_config_info; pass --kv-blocks")
    out: dict[str, Any] = {
        "base_s": round(fit.base_s, 7),
        "per_prefill_token_s": float(f"{fit.per_prefill_token_s:.4g}"),
        "per_decode_seq_s": float(f"{fit.per_decode_seq_s:.4g}"),
        "per_context_token_s": float(f"{fit.per_context_token_s:.4g}"),
        "per_prefill_pair_s": float(f"{fit.per_prefill_pair_s:.4g}"),
        "per_prefill_step_s": float(f"{fit.per_prefill_step_s:.4g}"),
        "knee_tokens": fit.knee_tokens,
        "kv_blocks": int(blocks),
        "block_size": int(raw.block_size or 16),
        "max_num_seqs": max_num_seqs,
        "max_num_batched_tokens": max_num_batched_tokens,
    }
    out["frontend_latency_s"] = round(fit.overhead_s if fit.frontend_latency_s is None else fit.frontend_latency_s, 6)
    if raw.frontend or raw.frontend_load:
        out["frontend_per_stream_s"] = float(f"{fit.frontend_per_stream_s:.4g}")
    if fit.frontend_queue_factor > 0:
        out["frontend_cpu_per_request_s"] = float(f"{fit.frontend_cpu_per_request_s:.4g}")
        out["frontend_cpu_per_token_s"] = float(f"{fit.frontend_cpu_per_token_s:.4g}")
        out["frontend_queue_factor"] = float(f"{fit.frontend_queue_factor:.4g}")
        if fit.frontend_usage_cpu_per_token_s is not None:
            out["frontend_usage_cpu_per_token_s"] = float(f"{fit.frontend_usage_cpu_per_token_s:.4g}")
    if fit.sustained_prefill_slowdown is not None:
        out["sustained_prefill_slowdown"] = round(fit.sustained_prefill_slowdown, 4)
        out["sustained_prefill_share"] = SUSTAINED_SHARE
    if raw.max_model_len:
        out["max_model_len"] = int(raw.max_model_len)
    if raw.async_scheduling is not None:
        out["async_scheduling"] = raw.async_scheduling
    if raw.launch_s is not None:
        out["load_cold_s"] = round(raw.launch_s, 1)
    if raw.wake_s is not None:
        out["load_warm_s"] = round(raw.wake_s, 3)
    if raw.sleep_s is not None:
        out["sleep_s"] = round(raw.sleep_s, 2)
    out["provenance"] = {
        "tool": "qlmctl profile-model",
        "engine": raw.engine_version or "unknown",
        "model": raw.model,
        "gpu": gpu,
        "flags": flags,
        "date": time.strftime("%Y-%m-%d"),
        "http_overhead_s": round(fit.overhead_s, 6),
        "fit_mean_abs_rel_error": round(fit.mean_abs_error, 4),
        "fit_max_abs_rel_error": round(fit.max_abs_error, 4),
        "sleep_s": raw.sleep_s,
        "points": {"prefill": len(raw.prefill), "decode": len(raw.decode), "mixed": len(raw.mixed),
                   "frontend": len(raw.frontend), "frontend_load": len(raw.frontend_load),
                   "sustained": len(raw.sustained)},
    }
    if raw.frontend_load:
        # Read by the probing process (before this was recorded), its loop's lag is in the fitted API-server cost.
        out["provenance"]["load_streams_read_by"] = raw.meta.get("load_streams_read_by", "the probing process")
        if fit.frontend_probes is not None:
            out["provenance"]["load_probes"] = fit.frontend_probes  # the windows the API-server model was fitted on
        if fit.frontend_left_out:
            out["provenance"]["load_windows_left_out"] = list(fit.frontend_left_out)
        if "settle" in raw.meta:  # whether the points after the windows ran at the server's quiet speed
            out["provenance"]["settled_after_load"] = raw.meta["settle"]["settled"]
    return out
