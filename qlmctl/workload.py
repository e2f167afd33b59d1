"""Requests from a scenario's workload: load or synthesise a trace, window it, rescale time,
assign models and SLO classes, and build `Request` objects.

Deterministic for a scenario seed: every random choice draws from one
`numpy.random.default_rng(seed)`, in a fixed order (synthetic arrivals, synthetic lengths, model
split, SLO-class split). Rows left out are counted in the report, never dropped silently.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from qlmctl.core.request import Request
from qlmctl.errors import UserError
from qlmctl.scenario import MappingSpec, Scenario
from qlmctl.traces import HASHES, LoadedTrace, load_trace, synthetic_trace
from simulator.prefix import PromptBlocks

BEFORE_START = "before start_s"
"""`WorkloadReport.skipped` reason for trace rows that arrive before `workload.start_s`."""

BEYOND_MAX = "beyond max_requests"
"""`WorkloadReport.skipped` reason for trace rows past `workload.max_requests`."""

BEYOND_DURATION = "beyond duration_s"
"""`WorkloadReport.skipped` reason for trace rows past `workload.duration_s` at `target_rate_rps`."""


@dataclass
class WorkloadReport:
    """What `build_requests` read, left out and built."""

    source: str
    """The trace path, or "synthetic"."""
    format: str
    rows_read: int
    """Rows read from the trace (or generated); equals num_requests + sum(skipped)."""
    skipped: dict[str, int]
    """Rows left out, by reason: the trace loader's reasons, `BEFORE_START`, `BEYOND_MAX`."""
    num_requests: int
    duration_s: float
    """Last arrival minus first arrival, after rescaling."""
    mean_rate_rps: float
    """(num_requests - 1) / duration_s; 0.0 when undefined (fewer than 2 requests or zero span)."""
    per_class: dict[str, int]
    per_model: dict[str, int]
    notes: list[str] = field(default_factory=list)
    """Decisions worth telling the user (e.g. a trace column that was not used, and why)."""

    def lines(self) -> list[str]:
        """Short human-readable notes, one per line."""
        out = [f"read {self.rows_read} rows from {self.source} ({self.format})"]
        out += [f"skipped {n} rows: {reason}" for reason, n in self.skipped.items() if n]
        out.append(
            f"{self.num_requests} requests over {self.duration_s:.1f} s ({self.mean_rate_rps:.3g} req/s)"
        )
        out.append("per model: " + ", ".join(f"{k} {v}" for k, v in self.per_model.items()))
        out.append("per SLO class: " + ", ".join(f"{k} {v}" for k, v in self.per_class.items()))
        out += self.notes
        return out


def build_requests(scenario: Scenario) -> tuple[list[Request], WorkloadReport]:
    """The scenario's requests, in arrival order (request_id 0..n-1), and a report on them.

    Steps: load the trace (or make the synthetic one); drop rows before `start_s` and shift the
    first remaining arrival to 0; cap at `max_requests`; rescale time (`time_scale` multiplies
    arrival times; `target_rate_rps` makes (n-1)/(last-first) equal to it); assign model and SLO
    class; build the requests. Capping comes before rescaling so that `target_rate_rps` holds for
    the requests actually replayed.

    Raises:
        UserError: a bad trace, a mapping naming unknown models / classes / columns, or an
            ambiguous assignment (several models or classes and no mapping).
    """
    spec = scenario.spec
    wl = spec.workload
    rng = np.random.default_rng(spec.seed)
    trace = _load(scenario, rng)
    frame = trace.frame
    skipped = dict(trace.skipped)
    notes: list[str] = []

    arrival = frame["arrival_s"].to_numpy(dtype=np.float64)
    if wl.start_s > 0:
        keep = arrival >= wl.start_s
        if not keep.all():
            skipped[BEFORE_START] = int((~keep).sum())
        if not keep.any():
            raise UserError(
                f"no requests at or after start_s={wl.start_s:g} s (the trace spans {arrival[-1]:.1f} s)",
                scenario.path, field="workload.start_s",
            )
        frame = frame.loc[keep].reset_index(drop=True)
    if wl.max_requests is not None and len(frame) > wl.max_requests:
        skipped[BEYOND_MAX] = len(frame) - wl.max_requests
        frame = frame.iloc[: wl.max_requests].reset_index(drop=True)
    if (wl.duration_s is not None and wl.target_rate_rps is not None and wl.trace is not None
            and math.isfinite(wl.target_rate_rps)):
        # A trace longer than the span at that rate: its first rate x span requests, rescaled to the rate
        # (so that the rate holds for the requests replayed, as with max_requests).
        need = int(math.ceil(wl.target_rate_rps * wl.duration_s)) + 1
        if len(frame) > need:
            skipped[BEYOND_DURATION] = len(frame) - need
            frame = frame.iloc[:need].reset_index(drop=True)
    arrival = frame["arrival_s"].to_numpy(dtype=np.float64, copy=True)
    arrival -= arrival[0]
    arrival = _rescale(scenario, arrival, notes)
    if wl.burstiness is not None and wl.trace is not None:
        arrival = _gamma_arrivals(scenario, arrival, notes)
    if wl.duration_s is not None:
        frame, arrival = _fill(frame, arrival, wl.duration_s, notes, synthetic=wl.synthetic is not None)

    n = len(frame)
    models = _assign(scenario, trace, frame, "model", wl.model, scenario.models, rng, notes)
    classes = _assign(scenario, trace, frame, "slo_class", wl.slo_class, list(spec.slo_classes), rng, notes)
    if wl.lengths_by_class:
        frame = _class_lengths(scenario, frame, classes)
    prefixes = _prefixes(scenario, trace, frame, notes)

    slo = {
        name: (c.ttft_s, c.tpot_s, scenario.slo_priority(name)) for name, c in spec.slo_classes.items()
    }
    # Each request's model and class as the scenario's own name object, not a string of its own (what `tolist`
    # makes): the simulator looks them up in dicts keyed by those names, and finds the same object without
    # comparing characters.
    names = {name: name for name in (*scenario.models, *spec.slo_classes)}
    prompt = frame["prompt_tokens"].to_numpy(dtype=np.int64).tolist()
    output = frame["output_tokens"].to_numpy(dtype=np.int64).tolist()
    # The cyclic GC would rescan the growing list many times while a million objects are made;
    # Requests hold no cycles, so pausing it is safe and halves the build time.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        requests = [
            Request(
                request_id=i,
                arrival_s=a,
                model=names.get(m, m),
                slo_class=names.get(c, c),
                ttft_slo_s=slo[c][0],
                tpot_slo_s=slo[c][1],
                priority=slo[c][2],
                prompt_tokens=pt,
                output_tokens=ot,
            )
            for i, (a, m, c, pt, ot) in enumerate(
                zip(arrival.tolist(), models.tolist(), classes.tolist(), prompt, output)
            )
        ]
        if prefixes is not None:
            for r, pre in zip(requests, prefixes):
                r.prefix = pre
    finally:
        if gc_was_enabled:
            gc.enable()

    duration = float(arrival[-1] - arrival[0]) if n else 0.0
    report = WorkloadReport(
        source=str(trace.path) if trace.path is not None else "synthetic",
        format=trace.format,
        rows_read=trace.rows_read,
        skipped=skipped,
        num_requests=n,
        duration_s=duration,
        mean_rate_rps=(n - 1) / duration if n >= 2 and duration > 0 else 0.0,
        per_class=_counts(classes, list(spec.slo_classes)),
        per_model=_counts(models, scenario.models),
        notes=notes,
    )
    return requests, report


BURSTINESS_STREAM = 0xB0257
"""Second key of the random stream for `workload.burstiness` arrivals (the other draws stay as they were)."""


def _gamma_arrivals(scenario: Scenario, arrival: np.ndarray, notes: list[str]) -> np.ndarray:
    """As many arrivals as `arrival` holds, drawn as vLLM's benchmark does: gaps gamma-distributed with shape
    `burstiness` and mean 1/rate, the rate being the target rate (else the trace's own mean rate)."""
    wl = scenario.spec.workload
    n = len(arrival)
    span = float(arrival[-1] - arrival[0]) if n else 0.0
    rate = wl.target_rate_rps or ((n - 1) / span if n >= 2 and span > 0 else None)
    if rate is None or math.isinf(rate) or n < 2:
        return arrival  # all at once: no gaps to draw
    shape = float(wl.burstiness)  # type: ignore[arg-type]
    rng = np.random.default_rng([scenario.spec.seed, BURSTINESS_STREAM])
    gaps = rng.gamma(shape, 1.0 / (rate * shape), size=n - 1)
    notes.append(f"arrival times drawn anew: gamma gaps of shape {shape:g} (burstiness) at {rate:.4g} req/s")
    return np.concatenate(([0.0], np.cumsum(gaps)))


def _fill(frame: pd.DataFrame, arrival: np.ndarray, duration_s: float, notes: list[str],
          synthetic: bool) -> tuple[pd.DataFrame, np.ndarray]:
    """The rows arriving within `duration_s`; a trace shorter than that is repeated end to end first (each copy
    one mean gap after the previous one ends), so that its arrival pattern and rate hold throughout."""
    n = len(arrival)
    span = float(arrival[-1] - arrival[0]) if n else 0.0
    if not synthetic and n and span < duration_s:
        gap = span / (n - 1) if n >= 2 and span > 0 else duration_s
        period = span + gap
        copies = int(math.ceil(duration_s / period))
        arrival = (arrival[None, :] + period * np.arange(copies)[:, None]).ravel()
        frame = frame.iloc[np.tile(np.arange(n), copies)].reset_index(drop=True)
        notes.append(f"trace repeated {duration_s / period:.3g} times to fill {duration_s:g} s of arrivals")
    keep = arrival < duration_s
    if not keep.all():
        if synthetic or span >= duration_s:
            notes.append(f"arrivals cut at {duration_s:g} s ({int(keep.sum())} requests)")
        frame = frame.loc[keep].reset_index(drop=True)
        arrival = arrival[keep]
    return frame, arrival


def _load(scenario: Scenario, rng: np.random.Generator) -> LoadedTrace:
    wl = scenario.spec.workload
    if wl.trace is not None:
        return load_trace(scenario.resolve_path(wl.trace), wl.format)
    assert wl.synthetic is not None
    spec = wl.synthetic
    if wl.burstiness is not None:  # vLLM's burstiness is a gamma shape: cv = 1/sqrt(shape)
        spec = spec.model_copy(update={"arrival": "gamma", "cv": 1.0 / math.sqrt(wl.burstiness)})
    if wl.duration_s is not None:
        # Enough arrivals to pass duration_s (cut there later): the mean count, plus a margin of many
        # standard deviations of a gamma renewal process's count (var ~ rate * t * cv^2).
        mean = spec.rate_rps * wl.duration_s
        cv = spec.cv if spec.arrival == "gamma" else 1.0
        spec = spec.model_copy(update={"num_requests": int(mean + 8.0 * math.sqrt(mean) * max(cv, 1.0) + 16)})
    lengths = None
    if spec.lengths_from is not None:
        lengths = load_trace(scenario.resolve_path(spec.lengths_from)).frame
    return synthetic_trace(spec, rng, lengths, lengths_later=_lengths_later(scenario))


def _lengths_later(scenario: Scenario) -> bool:
    """Every request's lengths are drawn per SLO class later (`lengths_by_class` covers every class used)."""
    wl = scenario.spec.workload
    classes = set(wl.slo_class.split) if wl.slo_class is not None and wl.slo_class.split else (
        {wl.slo_class.constant} if wl.slo_class is not None and wl.slo_class.constant else
        (set(scenario.spec.slo_classes) if len(scenario.spec.slo_classes) == 1 else set()))
    return bool(classes) and classes <= set(wl.lengths_by_class)


LENGTHS_STREAM = 0x1E6
"""Second key of the random stream for per-class lengths, so adding them leaves every other draw as it was."""


def _prefixes(scenario: Scenario, trace: LoadedTrace, frame: pd.DataFrame,
              notes: list[str]) -> list[PromptBlocks | None] | None:
    """Per request, what its prompt shares with others (None: no sharing known): the trace's block hashes, or
    the workload's shared system prompts. A request whose prompt is no longer than a system prompt gets none
    (it would cache only part of that prompt under the prompt's name)."""
    wl = scenario.spec.workload
    if wl.shared_prefix is not None:
        sp = wl.shared_prefix
        rng = np.random.default_rng([scenario.spec.seed, 0x5EED])  # its own stream: the other draws stay put
        n = len(frame)
        shares = rng.random(n) < sp.fraction
        variant = rng.integers(0, sp.variants, n)
        prompts = frame["prompt_tokens"].to_numpy(dtype=np.int64)
        blocks = [PromptBlocks(sp.tokens, (v,)) for v in range(sp.variants)]
        out: list[PromptBlocks | None] = [blocks[v] if s and p > sp.tokens else None
                                          for s, v, p in zip(shares.tolist(), variant.tolist(), prompts.tolist())]
        notes.append(f"{sum(x is not None for x in out)} requests begin with one of {sp.variants} shared "
                     f"{sp.tokens}-token system prompt(s)")
        return out
    if trace.hash_block_tokens is None or HASHES not in frame:
        return None
    if wl.lengths_by_class:
        notes.append("the trace's prompt block hashes are not used: lengths_by_class replaced its prompt lengths")
        return None
    bt = trace.hash_block_tokens
    return [PromptBlocks(bt, h) if h else None for h in frame[HASHES].tolist()]


def _class_lengths(scenario: Scenario, frame: pd.DataFrame, classes: np.ndarray) -> pd.DataFrame:
    """`frame` with the lengths of the classes in `workload.lengths_by_class` drawn anew, class by class."""
    rng = np.random.default_rng([scenario.spec.seed, LENGTHS_STREAM])
    prompt = frame["prompt_tokens"].to_numpy(dtype=np.int64, copy=True)
    output = frame["output_tokens"].to_numpy(dtype=np.int64, copy=True)
    for cls, spec in scenario.spec.workload.lengths_by_class.items():
        rows = np.flatnonzero(classes == cls)
        if not len(rows):
            continue
        if spec.lengths_from is not None:
            src = load_trace(scenario.resolve_path(spec.lengths_from)).frame
            if not len(src):
                raise UserError("the lengths trace has no rows", scenario.path,
                                field=f"workload.lengths_by_class.{cls}.lengths_from")
            idx = rng.integers(0, len(src), size=len(rows))
            prompt[rows] = src["prompt_tokens"].to_numpy(dtype=np.int64)[idx]
            output[rows] = src["output_tokens"].to_numpy(dtype=np.int64)[idx]
        else:
            assert spec.prompt is not None and spec.output is not None
            prompt[rows] = lognormal_lengths(spec.prompt.mean, spec.prompt.cv, spec.prompt.min, spec.prompt.max,
                                             len(rows), rng)
            output[rows] = lognormal_lengths(spec.output.mean, spec.output.cv, spec.output.min, spec.output.max,
                                             len(rows), rng)
    frame = frame.copy()
    frame["prompt_tokens"] = prompt
    frame["output_tokens"] = output
    return frame


def lognormal_lengths(mean: float, cv: float, lo: int, hi: int | None, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` whole token lengths from a log-normal with this mean and coefficient of variation, within [lo, hi]."""
    if cv <= 0:
        x = np.full(n, mean)
    else:
        sigma2 = np.log1p(cv * cv)
        x = rng.lognormal(np.log(mean) - sigma2 / 2.0, np.sqrt(sigma2), size=n)
    return np.clip(np.rint(x), lo, hi if hi is not None else None).astype(np.int64)


def _rescale(scenario: Scenario, arrival: np.ndarray, notes: list[str]) -> np.ndarray:
    wl = scenario.spec.workload
    if wl.time_scale != 1.0:
        return arrival * wl.time_scale
    if wl.target_rate_rps is None:
        return arrival
    n = len(arrival)
    span = float(arrival[-1] - arrival[0])
    if math.isinf(wl.target_rate_rps):
        notes.append("every request arrives at time 0 (request rate inf)")
        return np.zeros_like(arrival)
    if n < 2:
        notes.append("target_rate_rps ignored: a single request has no rate")
        return arrival
    if span <= 0:
        raise UserError(
            "cannot rescale to target_rate_rps: all requests arrive at the same time",
            scenario.path, field="workload.target_rate_rps",
        )
    factor = (n - 1) / (span * wl.target_rate_rps)
    notes.append(f"arrival times scaled by {factor:.4g} to reach {wl.target_rate_rps:g} req/s")
    return arrival * factor


def _assign(
    scenario: Scenario,
    trace: LoadedTrace,
    frame: pd.DataFrame,
    what: str,
    mapping: MappingSpec | None,
    known: list[str],
    rng: np.random.Generator,
    notes: list[str],
) -> np.ndarray:
    """Per row, a model (what="model") or an SLO class (what="slo_class"), as an object array."""
    n = len(frame)
    where = f"workload.{what}"
    noun, nouns = ("model", "models") if what == "model" else ("SLO class", "SLO classes")
    if mapping is None:
        present = frame[what].notna().to_numpy()
        if present.any():
            values = frame[what].to_numpy(dtype=object)
            unknown = _unknown(values, known)
            if present.all() and not unknown:
                return values
            why = (
                f"values not in the scenario: {', '.join(unknown[:5])}" if unknown else "some rows have none"
            )
            if len(known) != 1:
                raise UserError(
                    f"the trace's {what} column cannot be used ({why}) and the scenario has {len(known)} "
                    f"{nouns}; set {where} (column, constant or split)",
                    scenario.path, field=where,
                )
            notes.append(f"trace {what} column not used ({why}); every request gets {noun} '{known[0]}'")
        if len(known) == 1:
            return np.full(n, known[0], dtype=object)
        raise UserError(
            f"the trace gives no {noun} and the scenario has {len(known)} {nouns} ({', '.join(known)}); "
            f"set {where} (column, constant or split)",
            scenario.path, field=where,
        )
    if mapping.constant is not None:
        if mapping.constant not in known:
            raise UserError(
                f"unknown {noun} '{mapping.constant}'; known: {', '.join(known)}", scenario.path,
                field=f"{where}.constant",
            )
        return np.full(n, mapping.constant, dtype=object)
    if mapping.split is not None:
        bad = [k for k in mapping.split if k not in known]
        if bad:
            raise UserError(
                f"unknown {noun} '{bad[0]}' in split; known: {', '.join(known)}", scenario.path,
                field=f"{where}.split.{bad[0]}",
            )
        names = list(mapping.split)
        weights = np.array([mapping.split[k] for k in names], dtype=np.float64)
        idx = rng.choice(len(names), size=n, p=weights / weights.sum())
        return np.array(names, dtype=object)[idx]
    assert mapping.column is not None
    col = mapping.column
    if col not in ("model", "slo_class"):
        raise UserError(
            f"unknown trace column '{col}'; a mapping column is 'model' or 'slo_class'", scenario.path,
            field=f"{where}.column",
        )
    values = frame[col].to_numpy(dtype=object)
    ok = frame[col].isin(known).to_numpy()
    if not ok.all():
        row = int(np.flatnonzero(~ok)[0])
        value = values[row]
        msg = (
            f"no {col} value in this row (needed by {where}.column)"
            if value is None
            else f"unknown {noun} '{value}' (needed by {where}.column); known: {', '.join(known)}"
        )
        line = int(frame["source_line"].iloc[row]) if trace.path is not None else None
        raise UserError(msg, trace.path, line, trace.source_columns.get(col, col))
    return values


def _unknown(values: np.ndarray, known: list[str]) -> list[str]:
    """Distinct non-None values outside `known`, sorted."""
    distinct = set(pd.unique(values[pd.notna(values)]))
    return sorted(str(v) for v in distinct - set(known))


def _counts(values: np.ndarray, order: list[str]) -> dict[str, int]:
    """Count of each name, in the order of `order`, leaving out names with none."""
    got = pd.Series(values, dtype=object).value_counts()
    return {k: int(got[k]) for k in order if k in got.index}
