"""The sweep's tables: one row per point, one row per bisection; written as Parquet and markdown.

`results.parquet` holds every point (grid and bisection probes) with its parameters, status and
key metrics; `capacity.parquet` the highest rate each configuration sustains at the target
attainment; `results.md` both, for reading (the markdown keeps the headline columns).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from qlmctl.sweep.point import STEADY_METRICS, SUMMARY_METRICS
from qlmctl.sweep.runner import SweepResult

RESULTS_FILE = "results.parquet"
CAPACITY_FILE = "capacity.parquet"
MARKDOWN_FILE = "results.md"

PARAMETER_COLUMNS = ["scenario", "policy", "instances", "gpus", "seed", "max_requests", "duration_s", "rate_rps"]
CLASS_PREFIX = "attainment_"
"""Per-SLO-class attainment columns are `attainment_<class>`."""

_MISSING = "–"


def results_frame(result: SweepResult) -> pd.DataFrame:
    """One row per point of the sweep, sorted by parameters then rate.

    Columns: key, phase (grid or bisect), the parameters, status (ok or failed), attempts,
    error; `slo_attainment` and `attainment_<class>` (fractions, over the measured window: the
    arrival span less its warm-up); `steady` (the point completed at least the sweep's
    min_throughput_ratio of its offered rate over that window); `SUMMARY_METRICS` but
    slo_attainment with vLLM's names and units (ms, req/s, tok/s, s), over the whole run;
    `slo_attainment_run` (over every request); `STEADY_METRICS`' window figures;
    `offered_rate_rps` (the replayed requests' mean arrival rate), `wall_s` (seconds the point took
    in its worker) and `worker`.
    """
    grid = set(result.grid_keys)
    rows: list[dict[str, Any]] = []
    classes: dict[str, None] = {}
    for key in result.keys:
        rec = result.records[key]
        row: dict[str, Any] = {"key": key, "phase": "grid" if key in grid else "bisect"}
        row.update({c: rec.labels.get(c) for c in PARAMETER_COLUMNS})
        row.update({"status": "ok" if rec.ok else "failed", "attempts": rec.attempts, "error": rec.error})
        metrics = rec.metrics or {}
        row.update({m: metrics.get(m) for m in SUMMARY_METRICS})
        row["slo_attainment_run"] = metrics.get("slo_attainment_run")
        row.update({m: metrics.get(m) for m in STEADY_METRICS})
        for cls, value in (metrics.get("attainment_by_class") or {}).items():
            classes[cls] = None
            row[CLASS_PREFIX + cls] = value
        row["offered_rate_rps"] = metrics.get("offered_rate_rps")
        row.update({"wall_s": rec.wall_s, "worker": rec.worker})
        rows.append(row)
    head = ["key", "phase", *PARAMETER_COLUMNS, "status", "attempts", "error", "slo_attainment", "steady"]
    metric_cols = [m for m in SUMMARY_METRICS if m != "slo_attainment"] + ["slo_attainment_run"]
    metric_cols += [m for m in STEADY_METRICS if m != "steady"]
    columns = head + [CLASS_PREFIX + c for c in sorted(classes)] + metric_cols
    columns += ["offered_rate_rps", "wall_s", "worker"]
    frame = pd.DataFrame(rows, columns=columns)
    frame["max_requests"] = frame["max_requests"].astype("Int64")
    frame["duration_s"] = frame["duration_s"].astype("float64")
    for c in ("steady", "stopped_early"):
        frame[c] = frame[c].astype("boolean")
    return _in_sweep_order(frame, result).reset_index(drop=True)


def _in_sweep_order(frame: pd.DataFrame, result: SweepResult) -> pd.DataFrame:
    """Scenarios and policies in the sweep's order, then instances, seed (and rate) ascending."""
    scenarios = list(result.plan.scenarios)
    policies = list(dict.fromkeys(result.plan.spec.policies + list(frame["policy"])))
    by = {"scenario": scenarios.index, "policy": policies.index}

    def key(col: pd.Series) -> pd.Series:
        return col.map(by[col.name]) if col.name in by else col

    order = [c for c in ("scenario", "policy", "instances", "seed", "max_requests", "duration_s", "rate_rps")
             if c in frame]
    return frame.sort_values(order, key=key, kind="stable")


def capacity_frame(result: SweepResult) -> pd.DataFrame:
    """One row per bisection: the highest rate holding the target attainment (req/s).

    Columns: the configuration, target_attainment, max_rate_rps (None below the bracket or on
    failure), upper_rate_rps (lowest rate seen to miss the target), status, rounds, probes,
    attainment_at_max, error.
    """
    target = result.plan.spec.target_attainment
    rows = []
    for config, b in result.searches:
        rows.append({
            **config.labels(),
            "target_attainment": target,
            "max_rate_rps": b.max_rate,
            "upper_rate_rps": b.misses,
            "status": b.status.value,
            "rounds": b.rounds,
            "probes": len(b.probes),
            "attainment_at_max": b.probes.get(b.max_rate) if b.max_rate is not None else None,
            "unsteady_probes": len(b.unsteady),
            "error": b.error,
        })
    columns = [*[c for c in PARAMETER_COLUMNS if c != "rate_rps"], "target_attainment", "max_rate_rps",
               "upper_rate_rps", "status", "rounds", "probes", "attainment_at_max", "unsteady_probes", "error"]
    frame = pd.DataFrame(rows, columns=columns)
    frame["max_requests"] = frame["max_requests"].astype("Int64")
    frame["duration_s"] = frame["duration_s"].astype("float64")
    for c in ("max_rate_rps", "upper_rate_rps", "attainment_at_max"):
        frame[c] = frame[c].astype("float64")
    return _in_sweep_order(frame, result).reset_index(drop=True)


# --- markdown -----------------------------------------------------------------------------


def _is_missing(x: Any) -> bool:
    return x is None or x is pd.NA or (isinstance(x, float) and math.isnan(x))


def fmt_pct(x: Any) -> str:
    return _MISSING if _is_missing(x) else f"{100 * x:.1f}%"


def fmt_num(digits: int) -> Callable[[Any], str]:
    def fmt(x: Any) -> str:
        return _MISSING if _is_missing(x) else f"{x:,.{digits}f}"

    return fmt


def fmt_rate(x: Any) -> str:
    return _MISSING if _is_missing(x) else f"{x:.4g}"


def fmt_text(x: Any) -> str:
    if _is_missing(x):
        return _MISSING
    text = str(x).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 120 else text[:117] + "..."


def _formatter(column: str) -> Callable[[Any], str]:
    if column == "slo_attainment" or column.startswith(CLASS_PREFIX) or column == "target_attainment":
        return fmt_pct
    if column in ("rate_rps", "max_rate_rps", "upper_rate_rps"):
        return fmt_rate
    if column.endswith("_ms"):
        return fmt_num(1)
    if column in ("request_goodput", "request_throughput", "offered_rate_rps", "wall_s", "window_offered_rps",
                  "window_completed_rps"):
        return fmt_num(2)
    if column == "window_throughput_ratio":
        return fmt_pct
    if column == "steady":
        return lambda x: _MISSING if _is_missing(x) else ("yes" if x else "**no**")
    if column == "duration_s":
        return lambda x: "once" if _is_missing(x) else f"{x:g}"
    if column in ("attainment_at_max",):
        return fmt_pct
    return fmt_text


HEADERS = {
    "rate_rps": "rate (req/s)",
    "slo_attainment": "attainment",
    "request_goodput": "goodput (req/s)",
    "request_throughput": "throughput (req/s)",
    "p50_ttft_ms": "TTFT p50 (ms)",
    "p99_ttft_ms": "TTFT p99 (ms)",
    "num_swaps": "swaps",
    "num_evictions": "evictions",
    "wall_s": "wall (s)",
    "max_rate_rps": "max rate (req/s)",
    "upper_rate_rps": "misses at (req/s)",
    "target_attainment": "target",
    "attainment_at_max": "attainment at max",
    "steady": "steady",
    "window_throughput_ratio": "completed/offered",
    "window_offered_rps": "offered (req/s)",
    "window_completed_rps": "completed (req/s)",
    "duration_s": "arrivals (s)",
    "unsteady_probes": "unsteady probes",
}


def markdown_table(frame: pd.DataFrame, columns: Sequence[str]) -> str:
    """A GitHub markdown table of `columns` of `frame`, numbers right-aligned."""
    columns = [c for c in columns if c in frame.columns]
    header = [HEADERS.get(c, c.removeprefix(CLASS_PREFIX) if c.startswith(CLASS_PREFIX) else c) for c in columns]
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) for c in columns]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    fmts = [_formatter(c) for c in columns]
    for row in frame[columns].itertuples(index=False):
        lines.append("| " + " | ".join(f(v) for f, v in zip(fmts, row)) + " |")
    return "\n".join(lines)


def measuring(spec: Any) -> str:
    """One sentence on how the sweep measures a point (for its tables and its console output)."""
    span = (f"{spec.duration_s:g} s of arrivals per point (a trace repeated to fill them)" if spec.duration_s
            else "each scenario's requests once per point (burst capacity: a high rate replays them in a short "
                 "burst the deadlines may absorb)")
    return (f"Measured over {span}, the first {100 * spec.warmup_fraction:g} % left out as warm-up; attainment is "
            f"the fraction of the measured requests meeting their SLO; a point is steady when it completes at least "
            f"{100 * spec.min_throughput_ratio:g} % of its offered rate over that window, and only a steady point "
            f"can hold the target.")


def write_tables(result: SweepResult, out_dir: Path) -> dict[str, Path]:
    """Write results.parquet, capacity.parquet (with bisection) and results.md; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = result.plan.spec
    points = results_frame(result)
    written = {"results": out_dir / RESULTS_FILE, "markdown": out_dir / MARKDOWN_FILE}
    points.to_parquet(written["results"], index=False)
    capacity = capacity_frame(result) if result.searches else None
    if capacity is not None:
        written["capacity"] = out_dir / CAPACITY_FILE
        capacity.to_parquet(written["capacity"], index=False)
    else:
        (out_dir / CAPACITY_FILE).unlink(missing_ok=True)

    failed = points[points["status"] != "ok"]
    parts = [f"# Sweep {spec.name}", ""]
    if spec.description:
        parts += [spec.description, ""]
    parts.append(
        f"{len(points)} points ({(points['phase'] == 'grid').sum()} grid, {(points['phase'] == 'bisect').sum()} "
        f"bisection probes), {len(failed)} failed. {measuring(spec)}"
    )
    if capacity is not None:
        parts += ["", f"## Highest rate holding {100 * spec.target_attainment:g}% SLO attainment in a steady state", ""]
        parts.append(markdown_table(capacity, [
            "scenario", "policy", "instances", "gpus", "seed", "max_rate_rps", "upper_rate_rps", "status",
            "probes", "unsteady_probes", "attainment_at_max", "error",
        ]))
    if len(failed):
        parts += ["", "## Failed points", ""]
        parts.append(markdown_table(failed, [*PARAMETER_COLUMNS, "attempts", "error"]))
    classes = [c for c in points.columns if c.startswith(CLASS_PREFIX)]
    parts += ["", "## Points", ""]
    parts.append(markdown_table(points, [
        "phase", "scenario", "policy", "instances", "gpus", "seed", "rate_rps", "status", "slo_attainment",
        *classes, "steady", "window_offered_rps", "window_completed_rps", "window_throughput_ratio",
        "p50_ttft_ms", "p99_ttft_ms", "num_swaps", "num_evictions", "wall_s",
    ]))
    written["markdown"].write_text("\n".join(parts) + "\n", encoding="utf-8")
    return written
