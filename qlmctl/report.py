"""Writing a run's results to disk, reading them back, and the side-by-side policy table.

One policy's results live in `<out_dir>/<policy>/`:

- `requests.parquet` (or `requests.csv` when parquet cannot be written): `requests_frame` rows;
- `summary.json`: `metrics.summarize`'s dict;
- `scenario.yaml`: the resolved scenario;
- `timeline.parquet` (or `.csv`), only when a timeline was given: events over time, for plots.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from qlmctl.core.request import Request
from qlmctl.metrics import percentile_key, requests_frame

REQUESTS_FILE = "requests"
SUMMARY_FILE = "summary.json"
SCENARIO_FILE = "scenario.yaml"
TIMELINE_FILE = "timeline"
TIMELINE_COLUMNS = ["time_s", "kind", "instance_id", "model", "slo_class", "value"]
"""Columns of a run's timeline rows (queue depth samples, swaps, evictions, retries...), in both worlds."""

_MISSING = "–"


def _plain(value: Any) -> Any:
    """`value` as plain JSON/YAML data: numpy scalars unwrapped, NaN/inf as None, tuples as lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def plain(value: Any) -> Any:
    """`value` as plain JSON/YAML data (numpy unwrapped, NaN and infinity as None, tuples as lists)."""
    return _plain(value)


def _write_frame(frame: pd.DataFrame, folder: Path, stem: str) -> Path:
    """Write `frame` as `<stem>.parquet`, else as `<stem>.csv`; remove the other, stale one."""
    parquet, csv = folder / f"{stem}.parquet", folder / f"{stem}.csv"
    try:
        frame.to_parquet(parquet, engine="pyarrow", index=False)
        written, stale = parquet, csv
    except Exception:  # noqa: BLE001 - pyarrow missing or a column it cannot type: CSV still works
        parquet.unlink(missing_ok=True)
        frame.to_csv(csv, index=False)
        written, stale = csv, parquet
    # A leftover from an earlier run would shadow this one in read_results.
    stale.unlink(missing_ok=True)
    return written


def _read_frame(folder: Path, stem: str) -> pd.DataFrame | None:
    parquet, csv = folder / f"{stem}.parquet", folder / f"{stem}.csv"
    if parquet.exists():
        return pd.read_parquet(parquet)
    if csv.exists():
        return pd.read_csv(csv)
    return None


def timeline_frame(rows: Sequence[tuple[float, str, int, str, str, float]]) -> pd.DataFrame:
    """A run's timeline rows as a frame with `TIMELINE_COLUMNS`."""
    return pd.DataFrame(rows, columns=TIMELINE_COLUMNS)


def write_results(
    out_dir: Path,
    policy: str,
    requests: Sequence[Request] | pd.DataFrame,
    summary: dict,
    scenario_dump: dict,
    timeline: pd.DataFrame | None = None,
) -> Path:
    """Write one policy's results to `out_dir/policy/` (created if needed) and return that folder.

    `requests` may be the Request objects or an already built `requests_frame`. Files of an
    earlier run in the folder are replaced; a stale timeline is removed when none is given.
    """
    folder = Path(out_dir) / policy
    folder.mkdir(parents=True, exist_ok=True)

    frame = requests if isinstance(requests, pd.DataFrame) else requests_frame(requests)
    _write_frame(frame, folder, REQUESTS_FILE)

    with open(folder / SUMMARY_FILE, "w", encoding="utf-8") as f:
        json.dump(_plain(summary), f, indent=2, allow_nan=False)
        f.write("\n")
    with open(folder / SCENARIO_FILE, "w", encoding="utf-8") as f:
        yaml.safe_dump(_plain(scenario_dump), f, sort_keys=False)

    if timeline is not None:
        _write_frame(timeline, folder, TIMELINE_FILE)
    else:
        for suffix in (".parquet", ".csv"):
            (folder / f"{TIMELINE_FILE}{suffix}").unlink(missing_ok=True)
    return folder


def read_results(folder: Path) -> tuple[dict, pd.DataFrame]:
    """Read back a folder written by `write_results`: its summary and its requests frame.

    Raises:
        FileNotFoundError: the folder lacks summary.json or a requests file.
    """
    folder = Path(folder)
    with open(folder / SUMMARY_FILE, encoding="utf-8") as f:
        summary = json.load(f)
    frame = _read_frame(folder, REQUESTS_FILE)
    if frame is None:
        raise FileNotFoundError(f"no {REQUESTS_FILE}.parquet or {REQUESTS_FILE}.csv in {folder}")
    return summary, frame


def read_timeline(folder: Path) -> pd.DataFrame | None:
    """The timeline written by `write_results`, or None when the run wrote none."""
    return _read_frame(Path(folder), TIMELINE_FILE)


# --- The results table ---------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return _MISSING if x is None else f"{100 * x:.1f}%"


def _fixed(digits: int, scale: float = 1.0):
    def fmt(x: float | None) -> str:
        return _MISSING if x is None else f"{x * scale:,.{digits}f}"

    return fmt


def _tokens_per_s(x: float | None) -> str:
    # Decimals only while they carry information.
    if x is None:
        return _MISSING
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def _int(x: int | None) -> str:
    return _MISSING if x is None else f"{x:,}"


def _latency_rows(
    metric: str, percentiles: Sequence[int], summaries: Sequence[dict]
) -> Iterator[tuple[str, list[str]]]:
    """Rows `<METRIC> pXX (unit)` from the `pXX_<metric>_ms` keys.

    One unit for the whole group, so its rows compare at a glance: s when any value reaches
    1 s, else ms.
    """
    keys = [percentile_key(p, metric) for p in percentiles]
    values = [[s.get(k) for s in summaries] for k in keys]
    in_s = any(v is not None and v >= 1000 for vs in values for v in vs)
    unit, fmt = ("s", _fixed(2, 1e-3)) if in_s else ("ms", _fixed(1))
    for p, vs in zip(percentiles, values):
        yield f"{metric.upper()} p{percentile_key(p, metric)[1:].split('_')[0]} ({unit})", [fmt(v) for v in vs]


def _classes(summaries: Sequence[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for s in summaries:
        seen.update(dict.fromkeys(s.get("slo_attainment_by_class") or {}))
    return list(seen)


def _completed(s: dict) -> str:
    done, total = s.get("completed"), s.get("num_requests")
    if done is None:
        return _MISSING
    return f"{done:,}" if total is None else f"{done:,}/{total:,}"


def results_table(summaries: dict[str, dict], title: str, percentiles: Sequence[float] | None = None,
                  metrics: Sequence[str] | None = None) -> Table:
    """Policies side by side (one column each), metrics as rows; the best attainment in bold green.

    Args:
        summaries: {policy: `metrics.summarize` dict}, in the column order wanted.
        title: The table's title.
        percentiles: Latency percentiles to show (vLLM's --metric-percentiles); None: TTFT p50/p90/p99,
            TPOT p50/p99, E2EL p50/p99.
        metrics: With `percentiles`, the latency metrics to show them for (default ttft, tpot, e2el, and itl
            where any run has it).
    """
    names = list(summaries)
    runs = [summaries[p] for p in names]

    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, title_style="bold")
    table.add_column("metric", no_wrap=True)
    for name in names:
        table.add_column(name, justify="right", no_wrap=True)

    def row(label: str, cells: Sequence[str | Text], *, end_section: bool = False) -> None:
        table.add_row(label, *cells, end_section=end_section)

    # SLO attainment: the headline, best in bold green (all of them on a tie).
    overall = [s.get("slo_attainment") for s in runs]
    best = max((v for v in overall if v is not None), default=None)
    classes = _classes(runs)
    row(
        "SLO attainment",
        [Text(_pct(v), style="bold green" if v is not None and v == best else "") for v in overall],
        end_section=not classes,
    )
    for i, cls in enumerate(classes):
        row(
            f"  {cls}",
            [_pct((s.get("slo_attainment_by_class") or {}).get(cls)) for s in runs],
            end_section=i == len(classes) - 1,
        )

    fmt2 = _fixed(2)
    vllm_goodput = any(s.get("goodput_config") for s in runs)
    row("Goodput (req/s)" + (" (--goodput)" if vllm_goodput else ""), [fmt2(s.get("request_goodput")) for s in runs])
    if vllm_goodput:
        row("SLO-class goodput (req/s)", [fmt2(s.get("slo_goodput")) for s in runs])
    row("Throughput (req/s)", [fmt2(s.get("request_throughput")) for s in runs])
    row(
        "Output throughput (tok/s)",
        [_tokens_per_s(s.get("output_throughput")) for s in runs],
        end_section=True,
    )

    if percentiles:
        chosen = list(metrics) if metrics else [
            m for m in ("ttft", "tpot", "itl", "e2el") if m != "itl" or any(s.get("mean_itl_ms") is not None for s in runs)]
        rows = [r for m in chosen for r in _latency_rows(m, percentiles, runs)]
        for k, (label, cells) in enumerate(rows):
            row(label, cells, end_section=k == len(rows) - 1)
    else:
        for label, cells in _latency_rows("ttft", (50, 90, 99), runs):
            row(label, cells)
        for label, cells in _latency_rows("tpot", (50, 90, 99), runs):
            row(label, cells)
        row("E2EL p50 (s)", [_fixed(2, 1e-3)(s.get("p50_e2el_ms")) for s in runs])
        row("E2EL p90 (s)", [_fixed(2, 1e-3)(s.get("p90_e2el_ms")) for s in runs])
        row("E2EL p99 (s)", [_fixed(2, 1e-3)(s.get("p99_e2el_ms")) for s in runs], end_section=True)

    row("Completed/total", [_completed(s) for s in runs])
    row("Preemptions", [_int(s.get("num_preemptions")) for s in runs])
    if any(s.get("peak_running") is not None for s in runs):
        row("Peak running (an instance)", [_int(s.get("peak_running")) for s in runs])
        row("Peak KV use (an instance)", [_pct(s.get("peak_kv_usage")) for s in runs])
    row("Evictions", [_int(s.get("num_evictions")) for s in runs])
    row("Swaps", [_int(s.get("num_swaps")) for s in runs])
    row("Mean utilisation", [_pct(s.get("mean_utilisation")) for s in runs])
    return table


def policy_progress(console: Console) -> Progress:
    """The progress display of a run over several policies: one bar per policy, requests done of total."""
    return Progress(TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


def print_results(console: Console, summaries: dict[str, dict], title: str,
                  percentiles: Sequence[float] | None = None, metrics: Sequence[str] | None = None) -> None:
    """Print `results_table(summaries, title, percentiles, metrics)` on `console`."""
    console.print(results_table(summaries, title, percentiles, metrics))
