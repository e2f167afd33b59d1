"""Serving metrics over a run's requests, named and computed as vLLM's serving benchmark does.

vLLM's `benchmark_serving.py` / `vllm bench serve` conventions followed here:

- Latency statistics (TTFT, TPOT, ITL, E2EL) and token totals cover *completed* requests only
  (finished without error); every other request counts as `failed`.
- TPOT = (E2EL - TTFT) / (output tokens - 1), defined only for outputs of 2+ tokens.
- ITL values of all completed requests are pooled into one sample.
- Statistics are reported in ms: mean, median, population std (ddof 0) and linearly
  interpolated percentiles (`numpy.percentile`'s default).
- Goodput counts completed requests meeting their SLO per second of `duration`; here each
  request is judged against its own TTFT/TPOT thresholds (`Request.slo_met`), not one global one.

Where vLLM reports 0 for a statistic over an empty sample, this module reports None.

qlmctl adds SLO attainment over *all* requests (a request that never finished is a miss), its
breakdown by SLO class and by model, scheduler counters and instance utilisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain, compress
from operator import attrgetter
from typing import Any

import numpy as np
import pandas as pd

from qlmctl.core.request import Request

PERCENTILES: tuple[int, ...] = (50, 90, 99)
"""Percentiles reported for every latency metric (`pXX_<metric>_ms`)."""

LATENCY_METRICS: tuple[str, ...] = ("ttft", "tpot", "itl", "e2el")

INSTANCE_STATS: tuple[str, ...] = ("peak_running", "peak_kv_usage", "preemptions", "prefix_cache_hit_rate")
"""Per-instance figures a backend may report (`summarize(instance_stats=...)`): the most sequences in its
running batch at once, its highest KV cache use (fraction of its blocks), its engine-side preemptions and
the share of the prompt tokens it admitted that its prefix cache held (None: prefix caching off)."""

FRAME_COLUMNS: tuple[str, ...] = (
    "request_id",
    "model",
    "slo_class",
    "arrival_s",
    "dispatch_s",
    "first_token_s",
    "finish_s",
    "ttft_s",
    "tpot_s",
    "e2el_s",
    "prompt_tokens",
    "output_tokens",
    "generated_tokens",
    "instance_id",
    "num_preemptions",
    "num_evictions",
    "slo_met",
    "ttft_slo_s",
    "tpot_slo_s",
    "error",
    "rejected",
    "predicted_ttft_s",
)
"""Columns of `requests_frame`, in order."""


@dataclass(slots=True)
class _Columns:
    """The fields `summarize` needs, as arrays; optional floats hold NaN where a field is None."""

    n: int
    model: list[str]
    slo_class: list[str]
    arrival_s: np.ndarray
    dispatch_s: np.ndarray
    first_token_s: np.ndarray
    finish_s: np.ndarray
    prompt_tokens: np.ndarray
    generated_tokens: np.ndarray
    num_preemptions: np.ndarray
    num_evictions: np.ndarray
    ttft_slo_s: np.ndarray
    tpot_slo_s: np.ndarray
    error: list[str | None]
    # Derived.
    no_error: np.ndarray
    ttft_s: np.ndarray
    tpot_s: np.ndarray
    e2el_s: np.ndarray
    completed: np.ndarray
    slo_met: np.ndarray


# One attribute at a time through np.fromiter is the fastest extraction measured (about 45 ms
# per field for 1M requests); tuples of several attributes or np.array(list) are 2-3x slower.
def _ints(requests: Sequence[Request], name: str, n: int) -> np.ndarray:
    return np.fromiter(map(attrgetter(name), requests), dtype=np.int64, count=n)


def _floats(requests: Sequence[Request], name: str, n: int) -> np.ndarray:
    return np.fromiter(map(attrgetter(name), requests), dtype=np.float64, count=n)


def _optional_floats(requests: Sequence[Request], name: str, n: int) -> np.ndarray:
    values = map(attrgetter(name), requests)
    return np.fromiter((math.nan if v is None else v for v in values), dtype=np.float64, count=n)


def _nullable_ints(requests: Sequence[Request], name: str, n: int) -> pd.arrays.IntegerArray:
    # Built from values + mask: 2-3x faster than pd.array(list_with_None, dtype="Int64").
    raw = _values(requests, name)
    mask = np.fromiter((v is None for v in raw), dtype=bool, count=n)
    values = np.fromiter((0 if v is None else v for v in raw), dtype=np.int64, count=n)
    return pd.arrays.IntegerArray(values, mask)


def _values(requests: Sequence[Request], name: str) -> list:
    return list(map(attrgetter(name), requests))


def _columns(requests: Sequence[Request]) -> _Columns:
    """Extract each needed field once; all arithmetic below is vectorised."""
    n = len(requests)
    arrival = _floats(requests, "arrival_s", n)
    first = _optional_floats(requests, "first_token_s", n)
    finish = _optional_floats(requests, "finish_s", n)
    generated = _ints(requests, "generated_tokens", n)
    ttft_slo = _floats(requests, "ttft_slo_s", n)
    tpot_slo = _optional_floats(requests, "tpot_slo_s", n)
    error = _values(requests, "error")
    no_error = np.fromiter((e is None for e in error), dtype=bool, count=n)

    # Same arithmetic as Request.ttft_s / tpot_s / e2el_s, so the values agree bit for bit.
    ttft = first - arrival
    e2el = finish - arrival
    has_tpot = (generated >= 2) & ~np.isnan(first) & ~np.isnan(finish)
    tpot = np.full(n, np.nan)
    tpot[has_tpot] = (finish[has_tpot] - first[has_tpot]) / (generated[has_tpot] - 1)

    completed = ~np.isnan(finish) & no_error
    # Request.slo_met, vectorised: NaN comparisons are False, so a missing TTFT is a miss and a
    # missing TPOT (no threshold, or fewer than 2 tokens) passes.
    with np.errstate(invalid="ignore"):
        slo_met = completed & (ttft <= ttft_slo) & ~(tpot > tpot_slo)

    return _Columns(
        n=n,
        model=_values(requests, "model"),
        slo_class=_values(requests, "slo_class"),
        arrival_s=arrival,
        dispatch_s=_optional_floats(requests, "dispatch_s", n),
        first_token_s=first,
        finish_s=finish,
        prompt_tokens=_ints(requests, "prompt_tokens", n),
        generated_tokens=generated,
        num_preemptions=_ints(requests, "num_preemptions", n),
        num_evictions=_ints(requests, "num_evictions", n),
        ttft_slo_s=ttft_slo,
        tpot_slo_s=tpot_slo,
        error=error,
        no_error=no_error,
        ttft_s=ttft,
        tpot_s=tpot,
        e2el_s=e2el,
        completed=completed,
        slo_met=slo_met,
    )


def requests_frame(requests: Sequence[Request]) -> pd.DataFrame:
    """One row per request with its lifecycle, latencies (s) and SLO outcome.

    Columns are `FRAME_COLUMNS`. Missing timestamps and undefined latencies are NaN;
    `instance_id` is a nullable integer column; `error` holds None where there was none;
    `slo_met` equals `Request.slo_met`.
    """
    c = _columns(requests)
    n = c.n
    data: dict[str, Any] = {
        "request_id": _ints(requests, "request_id", n),
        "model": c.model,
        "slo_class": c.slo_class,
        "arrival_s": c.arrival_s,
        "dispatch_s": c.dispatch_s,
        "first_token_s": c.first_token_s,
        "finish_s": c.finish_s,
        "ttft_s": c.ttft_s,
        "tpot_s": c.tpot_s,
        "e2el_s": c.e2el_s,
        "prompt_tokens": c.prompt_tokens,
        "output_tokens": _ints(requests, "output_tokens", n),
        "generated_tokens": c.generated_tokens,
        "instance_id": _nullable_ints(requests, "instance_id", n),
        "num_preemptions": c.num_preemptions,
        "num_evictions": c.num_evictions,
        "slo_met": c.slo_met,
        "ttft_slo_s": c.ttft_slo_s,
        "tpot_slo_s": c.tpot_slo_s,
        # object dtype keeps None (not NaN) for "no error"; parquet stores it as null.
        "error": pd.Series(c.error, dtype=object),
        "rejected": np.fromiter(map(attrgetter("rejected"), requests), dtype=bool, count=n),
        "predicted_ttft_s": _optional_floats(requests, "predicted_ttft_s", n),
    }
    return pd.DataFrame(data, columns=list(FRAME_COLUMNS))


def _num(x: float | np.floating) -> float | None:
    """A JSON-safe float: None for NaN or infinity."""
    x = float(x)
    return x if math.isfinite(x) else None


def _latency_stats(name: str, values_s: np.ndarray | None) -> dict[str, float | None]:
    """vLLM's mean/median/std/pXX block for one metric, in ms (None over an empty sample)."""
    keys = [f"mean_{name}_ms", f"median_{name}_ms", f"std_{name}_ms"]
    keys += [f"p{p}_{name}_ms" for p in PERCENTILES]
    if values_s is None or values_s.size == 0:
        return dict.fromkeys(keys)
    ms = values_s * 1000.0
    pcts = np.percentile(ms, PERCENTILES)
    values = [ms.mean(), np.median(ms), ms.std(), *pcts]
    return {k: _num(v) for k, v in zip(keys, values)}


def _rate(count: float, duration: float | None) -> float | None:
    if duration is None or duration <= 0:
        return None
    return _num(count / duration)


def _fraction_by(labels: list[str], hits: np.ndarray) -> tuple[dict[str, float], dict[str, int]]:
    """Fraction of `hits` and the count per label, labels sorted (hash-based grouping: fast)."""
    if not labels:
        return {}, {}
    codes, uniques = pd.factorize(np.asarray(labels, dtype=object), sort=True)
    counts = np.bincount(codes, minlength=len(uniques))
    met = np.bincount(codes, weights=hits.astype(np.float64), minlength=len(uniques))
    names = [str(u) for u in uniques]
    fractions = {k: float(m / t) for k, m, t in zip(names, met, counts)}
    return fractions, {k: int(t) for k, t in zip(names, counts)}


def _pooled_itls(
    itls: Sequence[Sequence[float]] | None, completed: np.ndarray, n: int
) -> np.ndarray | None:
    """All completed requests' inter-token latencies (s) in one array; None when not recorded."""
    if itls is None:
        return None
    if len(itls) != n:
        raise ValueError(f"itls has {len(itls)} entries for {n} requests; give one per request")
    kept = compress(itls, completed.tolist())
    return np.fromiter(chain.from_iterable(kept), dtype=np.float64)


def estimator_accuracy(predicted_s: np.ndarray, actual_s: np.ndarray) -> dict[str, Any]:
    """How well a policy's TTFT predictions held, over requests with both a prediction and a first token.

    `estimator_coverage` is the fraction whose TTFT came within the prediction (a prediction at the
    estimator's percentile p should cover about p of them); `estimator_median_rel_error` the median of
    |predicted - actual| / actual; `estimator_samples` how many requests they cover (None: no predictions).
    """
    both = ~np.isnan(predicted_s) & ~np.isnan(actual_s)
    k = int(both.sum())
    if not k:
        return {"estimator_coverage": None, "estimator_median_rel_error": None, "estimator_samples": 0}
    p, a = predicted_s[both], actual_s[both]
    rel = np.abs(p - a) / np.maximum(a, 1e-9)
    return {"estimator_coverage": _num((a <= p).mean()), "estimator_median_rel_error": _num(np.median(rel)),
            "estimator_samples": k}


def summarize(
    requests: Sequence[Request],
    *,
    instance_busy_s: dict[str, float] | None = None,
    num_swaps: int = 0,
    itls: Sequence[Sequence[float]] | None = None,
    extra: dict | None = None,
    instance_stats: dict[str, dict[str, Any]] | None = None,
) -> dict:
    """Summarise a run as a JSON-serialisable dict (vLLM's result keys plus qlmctl's own).

    Args:
        requests: Every request of the run, finished or not.
        instance_busy_s: Seconds each instance spent busy (serving or swapping), keyed by
            instance id; utilisation is that over `duration`. None: utilisation not reported.
        num_swaps: Model swaps the cluster performed.
        itls: Per request (aligned with `requests`), its inter-token latencies in s, for
            backends that record per-token times. None: ITL statistics are None.
        extra: Further top-level keys to add (e.g. policy, seed). A key that collides with a
            computed one raises ValueError rather than silently replacing a metric.
        instance_stats: Per instance id, its `INSTANCE_STATS` figures (those it has). None: not
            reported.

    Returns:
        Keys, in order:
        `num_requests`, `duration` (s, last finish - first arrival), `completed` (finished
        without error), `failed` (all others: errors and never finished), `unfinished` (of
        the failed: no finish and no error), `total_input_tokens`, `total_output_tokens`
        (completed requests' prompt and generated tokens), `request_throughput`,
        `request_goodput` (req/s), `output_throughput`, `total_token_throughput` (tok/s);
        for X in ttft, tpot, itl, e2el: `mean_X_ms`, `median_X_ms`, `std_X_ms`, `p50_X_ms`,
        `p90_X_ms`, `p99_X_ms`; `slo_attainment` (over all requests),
        `slo_attainment_by_class`, `slo_attainment_by_model` ({name: fraction}),
        `requests_by_class`, `requests_by_model` ({name: count}), `num_preemptions`,
        `num_evictions`, `num_swaps`, `mean_queueing_delay_ms`, `p99_queueing_delay_ms`
        (dispatch - arrival over dispatched requests), `instance_utilisation`
        ({instance: busy fraction}) and `mean_utilisation`; `instances` ({instance: its
        `INSTANCE_STATS`}), `peak_running` (the largest over instances), `peak_kv_usage` (the
        highest). Undefined values are None.
    """
    c = _columns(requests)
    done = c.completed
    n_done = int(done.sum())

    duration: float | None = None
    if c.n and not np.isnan(c.finish_s).all():
        duration = _num(np.nanmax(c.finish_s) - c.arrival_s.min())

    total_in = int(c.prompt_tokens[done].sum())
    total_out = int(c.generated_tokens[done].sum())
    n_good = int(c.slo_met.sum())  # slo_met implies completed

    summary: dict[str, Any] = {
        "num_requests": c.n,
        "duration": duration,
        "completed": n_done,
        "failed": c.n - n_done,
        "unfinished": int((np.isnan(c.finish_s) & c.no_error).sum()),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": _rate(n_done, duration),
        "request_goodput": _rate(n_good, duration),
        "output_throughput": _rate(total_out, duration),
        "total_token_throughput": _rate(total_in + total_out, duration),
    }

    samples = {
        # TPOT is NaN for 1-token outputs (vLLM leaves them out); the TTFT filter only guards
        # against a backend that finished a request without recording its first token.
        "ttft": c.ttft_s[done & ~np.isnan(c.ttft_s)],
        "tpot": c.tpot_s[done & ~np.isnan(c.tpot_s)],
        "itl": _pooled_itls(itls, done, c.n),
        "e2el": c.e2el_s[done],
    }
    for name in LATENCY_METRICS:
        summary.update(_latency_stats(name, samples[name]))

    by_class, count_by_class = _fraction_by(c.slo_class, c.slo_met)
    by_model, count_by_model = _fraction_by(c.model, c.slo_met)
    summary["slo_attainment"] = _num(n_good / c.n) if c.n else None
    summary["slo_attainment_by_class"] = by_class
    summary["slo_attainment_by_model"] = by_model
    summary["requests_by_class"] = count_by_class
    summary["requests_by_model"] = count_by_model
    summary["num_preemptions"] = int(c.num_preemptions.sum())
    summary["num_evictions"] = int(c.num_evictions.sum())
    summary["num_swaps"] = int(num_swaps)

    summary["rejected"] = sum(map(attrgetter("rejected"), requests))
    summary.update(estimator_accuracy(_optional_floats(requests, "predicted_ttft_s", c.n), c.ttft_s))

    queueing = (c.dispatch_s - c.arrival_s)[~np.isnan(c.dispatch_s)]
    summary["mean_queueing_delay_ms"] = _num(queueing.mean() * 1000) if queueing.size else None
    summary["p99_queueing_delay_ms"] = (
        _num(np.percentile(queueing, 99) * 1000) if queueing.size else None
    )

    utilisation: dict[str, float | None] | None = None
    mean_util: float | None = None
    if instance_busy_s is not None:
        utilisation = {
            str(k): (_num(v / duration) if duration else None) for k, v in instance_busy_s.items()
        }
        known = [u for u in utilisation.values() if u is not None]
        mean_util = _num(sum(known) / len(known)) if known else None
    summary["instance_utilisation"] = utilisation
    summary["mean_utilisation"] = mean_util
    stats = {str(k): {s: v.get(s) for s in INSTANCE_STATS} for k, v in (instance_stats or {}).items()}
    summary["instances"] = stats if instance_stats is not None else None

    def peak(key: str) -> Any:
        values = [v[key] for v in stats.values() if v.get(key) is not None]
        return max(values) if values else None

    summary["peak_running"] = peak("peak_running")
    summary["peak_kv_usage"] = _num(peak("peak_kv_usage")) if peak("peak_kv_usage") is not None else None

    if extra:
        clash = sorted(set(extra) & set(summary))
        if clash:
            raise ValueError(f"extra keys collide with computed metrics: {clash}")
        summary.update(extra)
    return summary


def window_summary(requests: Sequence[Request], start_s: float, end_s: float) -> dict[str, Any]:
    """Steady-state figures over the arrival window [start_s, end_s) (e.g. a run less its warm-up).

    Returns `window_s`; `window_requests` (arrived in the window); `window_offered_rps` (their rate);
    `window_completed_rps` (requests of any arrival time completed within the window, per second: what
    the system delivered while the window's load was on it); `window_throughput_ratio` (completed over
    offered: about 1 in a steady state, below when a backlog builds); `window_goodput` (completed within
    the window and meeting their SLO, per second); `window_slo_attainment` over the window's requests
    (one never finished is a miss) and `window_attainment_by_class`.
    """
    c = _columns(requests)
    span = end_s - start_s
    if span <= 0:
        raise ValueError(f"empty window [{start_s}, {end_s})")
    inside = (c.arrival_s >= start_s) & (c.arrival_s < end_s)
    with np.errstate(invalid="ignore"):
        done_in = c.completed & (c.finish_s >= start_s) & (c.finish_s < end_s)
    n_in = int(inside.sum())
    offered = n_in / span
    completed = int(done_in.sum()) / span
    labels = [cls for cls, keep in zip(c.slo_class, inside.tolist()) if keep]
    by_class, _ = _fraction_by(labels, c.slo_met[inside])
    return {
        "window_s": _num(span),
        "window_requests": n_in,
        "window_offered_rps": _num(offered),
        "window_completed_rps": _num(completed),
        "window_throughput_ratio": _num(completed / offered) if offered > 0 else None,
        "window_goodput": _num(int((done_in & c.slo_met).sum()) / span),
        "window_slo_attainment": _num(c.slo_met[inside].mean()) if n_in else None,
        "window_attainment_by_class": by_class,
    }


GOODPUT_METRICS: tuple[str, ...] = ("ttft", "tpot", "e2el")
"""Metrics `vllm bench serve --goodput` takes thresholds for (ms)."""


def percentile_key(p: float, metric: str) -> str:
    """vLLM's key of a percentile: `p99_ttft_ms`, `p99.9_ttft_ms`."""
    word = str(int(p)) if int(p) == p else str(p)
    return f"p{word}_{metric}_ms"


def bench_metrics(
    requests: Sequence[Request],
    *,
    itls: Sequence[Sequence[float]] | None = None,
    percentiles: Sequence[float] = (),
    percentile_metrics: Sequence[str] = LATENCY_METRICS,
    goodput: dict[str, float] | None = None,
) -> dict[str, Any]:
    """What `vllm bench serve`'s options add to a summary: `--metric-percentiles` of `--percentile-metrics`
    (keys `percentile_key`, in ms, over completed requests as `summarize`'s), and `--goodput`.

    With `goodput` ({metric: threshold ms} over `GOODPUT_METRICS`), `request_goodput` is vLLM's: completed
    requests within every threshold, per second of the run; the SLO classes' goodput (what `summarize`
    calls request_goodput) is kept as `slo_goodput`. `goodput_config` records the thresholds (None: none).
    """
    c = _columns(requests)
    done = c.completed
    samples = {
        "ttft": c.ttft_s[done & ~np.isnan(c.ttft_s)],
        "tpot": c.tpot_s[done & ~np.isnan(c.tpot_s)],
        "itl": _pooled_itls(itls, done, c.n),
        "e2el": c.e2el_s[done],
    }
    out: dict[str, Any] = {}
    for metric in percentile_metrics:
        values = samples.get(metric)
        for p in percentiles:
            out[percentile_key(p, metric)] = (
                None if values is None or values.size == 0 else _num(np.percentile(values * 1000.0, p)))
    out["goodput_config"] = dict(goodput) if goodput else None
    if goodput:
        ok = done.copy()
        with np.errstate(invalid="ignore"):
            if "ttft" in goodput:
                ok &= c.ttft_s * 1000.0 <= goodput["ttft"]
            if "tpot" in goodput:
                ok &= ~(c.tpot_s * 1000.0 > goodput["tpot"])  # no TPOT (one token): within
            if "e2el" in goodput:
                ok &= c.e2el_s * 1000.0 <= goodput["e2el"]
        duration = None
        if c.n and not np.isnan(c.finish_s).all():
            duration = _num(np.nanmax(c.finish_s) - c.arrival_s.min())
        out["request_goodput"] = _rate(int(ok.sum()), duration)
    return out
