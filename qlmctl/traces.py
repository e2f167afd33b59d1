"""Request traces: load the supported trace formats into one frame, or make a synthetic trace.

Every format becomes the same frame (see `LoadedTrace`). Bad input raises `UserError` naming the
file, the 1-based line and the column; rows left out on purpose are counted in `LoadedTrace.skipped`,
never dropped silently. Validation is vectorised (coerce a column, then locate its first bad row),
so a 20k-row trace loads in tens of milliseconds. The formats are described in traces/README.md.
"""

from __future__ import annotations

import csv
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from qlmctl.errors import UserError
from qlmctl.scenario import SyntheticSpec

FORMATS = ("qlmctl", "azure", "burstgpt", "mooncake", "vidur")
"""Trace formats accepted by `load_trace` (besides "auto")."""

COLUMNS = ("arrival_s", "prompt_tokens", "output_tokens", "model", "slo_class", "source_line")
"""Columns of `LoadedTrace.frame`, in order."""

NATIVE_COLUMNS = ("arrival_s", "model", "slo_class", "prompt_tokens", "output_tokens")
"""Header of the native qlmctl CSV, in the order `write_native_csv` writes it."""

BURSTGPT_FAILED = "burstgpt failed request (0 response tokens)"
"""`skipped` reason for BurstGPT rows with Response tokens == 0 (failed requests)."""

HASHES = "prefix_hashes"
"""Frame column of a trace's prompt block hashes (see `LoadedTrace.hash_block_tokens`)."""

MAX_TOKENS = 2**31 - 1
"""Largest token count accepted; beyond it a count is surely corrupt (and would overflow int32 users)."""


@dataclass
class LoadedTrace:
    """A trace in the common form.

    `frame` has the columns of `COLUMNS`: arrival_s (float64, seconds, sorted stably, first = 0.0),
    prompt_tokens and output_tokens (int64, >= 1), model and slo_class (object: str, or None where
    the trace has none), source_line (int64: the row's 1-based line in the file; for a synthetic
    trace, the row's 1-based index).
    """

    frame: pd.DataFrame
    format: str
    path: Path | None
    rows_read: int
    """Data rows read from the file (blank lines excluded); equals len(frame) + sum(skipped)."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Rows left out, by reason."""
    source_columns: dict[str, str] = field(default_factory=dict)
    """Frame column -> the file's name for it (e.g. "model" -> "Model"), for error messages."""
    hash_block_tokens: int | None = None
    """For a trace whose rows carry prompt block hashes (mooncake's hash_ids): tokens per block; the frame then
    has a `prefix_hashes` column (a tuple of ints per row, None where a row has none)."""

    def __len__(self) -> int:
        return len(self.frame)


@dataclass(frozen=True)
class _Format:
    """Where a format keeps each field; None where it has no such field."""

    name: str
    arrival: str
    arrival_unit: Literal["s", "ms", "datetime"]
    prompt: str
    output: str
    model: str | None = None
    slo_class: str | None = None
    optional: tuple[str, ...] = ()
    """Columns that may be absent from the header."""
    hashes: str | None = None
    """A field holding the prompt's block hashes (prefix caching), and the tokens each stands for."""
    hash_block_tokens: int | None = None

    @property
    def required(self) -> list[str]:
        cols = [self.arrival, self.prompt, self.output, self.model, self.slo_class]
        return [c for c in cols if c is not None and c not in self.optional]


_FORMATS: dict[str, _Format] = {
    "qlmctl": _Format(
        "qlmctl", "arrival_s", "s", "prompt_tokens", "output_tokens", "model", "slo_class",
        optional=("model", "slo_class"),
    ),
    "azure": _Format("azure", "TIMESTAMP", "datetime", "ContextTokens", "GeneratedTokens"),
    "burstgpt": _Format("burstgpt", "Timestamp", "s", "Request tokens", "Response tokens", "Model"),
    "mooncake": _Format("mooncake", "timestamp", "ms", "input_length", "output_length", hashes="hash_ids",
                        hash_block_tokens=512),
    "vidur": _Format("vidur", "arrived_at", "s", "num_prefill_tokens", "num_decode_tokens"),
}


def load_trace(path: str | Path, fmt: str = "auto") -> LoadedTrace:
    """Load a trace file in one of `FORMATS`.

    Args:
        path: The trace file (CSV, or JSON lines for mooncake).
        fmt: One of `FORMATS`, or "auto" to detect the format from the header (the first JSON line).

    Raises:
        UserError: unknown format, unreadable or empty file, or a bad row (naming its line and column).
    """
    p = Path(path)
    if fmt != "auto" and fmt not in _FORMATS:
        raise UserError(f"unknown trace format '{fmt}'; supported: auto, {', '.join(FORMATS)}", p, field="format")
    found = _first_line(p)
    if found is None:
        raise UserError("empty trace: the file has no lines", p)
    first, header_line = found
    if fmt == "auto":
        fmt = _detect(p, first, header_line)
    spec = _FORMATS[fmt]
    if fmt == "mooncake":
        raw, lines, rows_read = _read_jsonl(p, spec)
    else:
        raw, lines, rows_read = _read_csv(p, spec, first, header_line)
    if rows_read == 0:
        raise UserError("empty trace: no data rows", p)
    return _to_trace(p, spec, raw, lines, rows_read)


def _first_line(p: Path) -> tuple[str, int] | None:
    """The first non-blank line and its 1-based number; None for a blank file."""
    try:
        with p.open(encoding="utf-8-sig", newline="") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    return line.rstrip("\r\n"), number
    except FileNotFoundError:
        raise UserError("trace file not found", p) from None
    except IsADirectoryError:
        raise UserError("trace path is a directory, not a file", p) from None
    except UnicodeDecodeError:
        raise UserError("not a text file (not UTF-8)", p) from None
    except OSError as e:
        raise UserError(f"cannot read trace: {e.strerror}", p) from None
    return None


def _header(first: str) -> list[str]:
    return [c.strip() for c in next(csv.reader([first]))]


def _detect(p: Path, first: str, line: int) -> str:
    if first.lstrip().startswith("{"):
        try:
            keys = set(json.loads(first))
        except (json.JSONDecodeError, TypeError):
            keys = set()
        if set(_FORMATS["mooncake"].required) <= keys:
            return "mooncake"
        found = ", ".join(sorted(keys)) or "none"
        raise UserError(
            f"unknown trace format: JSON keys ({found}) match no supported format; {_supported()}", p, line
        )
    header = set(_header(first))
    for name, spec in _FORMATS.items():
        if name != "mooncake" and set(spec.required) <= header:
            return name
    raise UserError(
        f"unknown trace format: header '{first.strip()}' matches no supported format; {_supported()}", p, line
    )


def _supported() -> str:
    parts = []
    for spec in _FORMATS.values():
        cols = ",".join(c for c in (spec.arrival, spec.model, spec.slo_class, spec.prompt, spec.output) if c)
        parts.append(f"{spec.name} ({'JSON lines: ' if spec.name == 'mooncake' else ''}{cols})")
    return "supported: " + "; ".join(parts)


def _first_long_row(p: Path, header_line: int, width: int) -> tuple[int | None, int]:
    """(line, field count) of the first data row with more fields than the header (error path only)."""
    with p.open(newline="", encoding="utf-8-sig") as f:
        for i, row in enumerate(csv.reader(f), start=1):
            if i > header_line and len(row) > width:
                return i, len(row)
    return None, width + 1


def _read_csv(p: Path, spec: _Format, first: str, header_line: int) -> tuple[pd.DataFrame, np.ndarray, int]:
    """The raw cells (object: str), each row's file line, and the number of data rows."""
    header = _header(first)
    missing = [c for c in spec.required if c not in header]
    if missing:
        raise UserError(
            f"not a {spec.name} trace: missing column(s) {', '.join(missing)}", p, header_line, missing[0]
        )
    try:
        # All as strings, no "NA"-like text turned into NaN, blank lines kept: row i is then exactly
        # line header_line + 1 + i (quoted multi-line fields aside).
        with warnings.catch_warnings():
            # index_col=False makes pandas drop a row's extra fields with only a warning: an error here.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            raw = pd.read_csv(
                p, dtype=str, keep_default_na=False, skip_blank_lines=False, index_col=False,
                encoding="utf-8-sig", skipinitialspace=True, skiprows=header_line - 1,
            )
    except pd.errors.ParserWarning:
        line, n = _first_long_row(p, header_line, len(header))
        raise UserError(f"malformed CSV row: {n} fields, the header has {len(header)}", p, line) from None
    except pd.errors.ParserError as e:
        text = str(e).splitlines()[0]
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", text)
        if m:
            raise UserError(f"malformed CSV row: {m[3]} fields, the header has {m[1]}", p, int(m[2])) from None
        raise UserError(f"malformed CSV: {text}", p) from None
    except UnicodeDecodeError:
        raise UserError("not a text file (not UTF-8)", p) from None
    except pd.errors.EmptyDataError:
        raise UserError("empty trace: no data rows", p) from None
    raw.columns = [str(c).strip() for c in raw.columns]
    # Cells as Python str (NaN where a short row lacks them) whatever pandas' default string dtype.
    raw = raw.astype(object)
    lines = np.arange(header_line + 1, header_line + 1 + len(raw), dtype=np.int64)
    # A fully blank line is not a row; rows with some empty fields are (and get reported).
    blank = (raw.apply(lambda s: s.str.strip()) == "").all(axis=1).to_numpy()
    if blank.any():
        raw, lines = raw.loc[~blank].reset_index(drop=True), lines[~blank]
    return raw, lines, len(raw)


def _read_jsonl(p: Path, spec: _Format) -> tuple[pd.DataFrame, np.ndarray, int]:
    text = p.read_text(encoding="utf-8-sig")
    keys = [c for c in (spec.arrival, spec.prompt, spec.output) if c is not None]
    cols: dict[str, list[object]] = {k: [] for k in keys}
    hashes: list[tuple[int, ...] | None] | None = [] if spec.hashes else None
    lines: list[int] = []
    # JSON has to be parsed line by line; checking the values is then vectorised like the CSVs.
    # split("\n"), not splitlines(): the latter also splits at \u2028 and friends, shifting line numbers.
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"invalid JSON: {e.msg} (column {e.colno})", p, i) from None
        if not isinstance(rec, dict):
            raise UserError("expected a JSON object on each line", p, i)
        for k in keys:
            # Kept as JSON text, so CSV and JSON cells are checked alike and errors quote the file.
            v = rec.get(k)
            if v is not None and not isinstance(v, str):
                v = str(v) if isinstance(v, (int, float)) else json.dumps(v)
            cols[k].append(v)
        if hashes is not None:
            h = rec.get(spec.hashes)
            ok = isinstance(h, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in h)
            if h is not None and not ok:
                raise UserError(f"{spec.hashes} must be a list of integers", p, i, spec.hashes)
            hashes.append(tuple(h) if h else None)
        lines.append(i)
    raw = pd.DataFrame({k: pd.Series(v, dtype=object) for k, v in cols.items()})
    if hashes is not None:
        raw[HASHES] = pd.Series(hashes, dtype=object)
    return raw, np.asarray(lines, dtype=np.int64), len(lines)


class _Problems:
    """Collects the first bad row of each check; raises the one on the earliest line."""

    def __init__(self, path: Path, lines: np.ndarray, raw: pd.DataFrame) -> None:
        self.path, self.lines, self.raw = path, lines, raw
        self.found: list[tuple[int, int, str, str]] = []  # (row, check order, column, message)

    def flag(self, column: str, bad: np.ndarray, message: str) -> None:
        """`message` may hold {value}: the raw text of the first bad cell."""
        idx = np.flatnonzero(bad)
        if idx.size:
            row = int(idx[0])
            value = self.raw[column].iloc[row] if column in self.raw else None
            self.found.append((row, len(self.found), column, message.format(value=value)))

    def raise_first(self) -> None:
        if self.found:
            row, _, column, message = min(self.found)
            raise UserError(message, self.path, int(self.lines[row]), column)


def _is_missing(raw: pd.Series) -> np.ndarray:
    """Absent cells: None/NaN, or empty or blank text."""
    miss = raw.isna().to_numpy(dtype=bool, copy=True)
    miss |= (raw.str.strip() == "").to_numpy(dtype=bool, na_value=False)
    return miss


def _numbers(raw: pd.Series) -> np.ndarray:
    """float64 values; NaN where the cell is missing or not a number."""
    text = raw.str.strip()
    try:
        # numpy parses each str with Python's float(): exact (round-trips repr), unlike the fast
        # parser of pd.to_numeric in pandas < 3. Fails on any bad cell.
        return np.asarray(text.to_numpy(dtype=object), dtype=np.float64)
    except (TypeError, ValueError):
        return np.asarray(pd.to_numeric(text, errors="coerce"), dtype=np.float64)


def _check_tokens(probs: _Problems, raw: pd.Series, column: str) -> tuple[np.ndarray, np.ndarray]:
    """Token counts as float64 (NaN where bad) and the mask of valid ones; flags bad cells."""
    miss = _is_missing(raw)
    num = _numbers(raw)
    nonnum = ~miss & np.isnan(num)
    with np.errstate(invalid="ignore"):
        nonfinite = np.isinf(num)
        neg = ~nonfinite & (num < 0)
        frac = ~nonfinite & ~neg & (np.mod(num, 1) != 0)
        big = ~nonfinite & (num > MAX_TOKENS)
    probs.flag(column, miss, "missing token count")
    probs.flag(column, nonnum, "token count is not a number: '{value}'")
    probs.flag(column, nonfinite, "token count is not finite: '{value}'")
    probs.flag(column, neg, "negative token count: {value}")
    probs.flag(column, frac, "token count is not a whole number: {value}")
    probs.flag(column, big, f"token count too large (over {MAX_TOKENS}): " + "{value}")
    ok = ~(miss | nonnum | nonfinite | neg | frac | big)
    return num, ok


def _check_arrival(probs: _Problems, raw: pd.Series, spec: _Format) -> np.ndarray:
    """Arrival times in seconds from an arbitrary origin; flags bad cells."""
    column = spec.arrival
    miss = _is_missing(raw)
    if spec.arrival_unit == "datetime":
        # ISO8601 parsing copes with 7 fractional digits (Azure's) and is vectorised; utc=True
        # makes naive and offset-carrying stamps comparable.
        ts = pd.to_datetime(raw.astype(object).where(~miss, None), format="ISO8601", errors="coerce", utc=True)
        bad = ~miss & ts.isna().to_numpy()
        probs.flag(column, miss, "missing timestamp")
        probs.flag(column, bad, "cannot parse date-time: '{value}'")
        ok = ~(miss | bad)
        secs = np.full(len(raw), np.nan)
        if ok.any():
            origin = ts[ok].min()
            secs[ok] = ((ts[ok] - origin) / pd.Timedelta(seconds=1)).to_numpy(dtype=np.float64)
        return secs
    num = _numbers(raw)
    nonnum = ~miss & np.isnan(num)
    nonfinite = np.isinf(num)
    probs.flag(column, miss, "missing timestamp")
    probs.flag(column, nonnum, "timestamp is not a number: '{value}'")
    probs.flag(column, nonfinite, "timestamp is not finite: '{value}'")
    return num / 1000.0 if spec.arrival_unit == "ms" else num


def _labels(raw: pd.DataFrame, column: str | None, n: int) -> np.ndarray:
    """A text column as an object array of stripped str, None where absent or empty."""
    if column is None or column not in raw:
        return np.full(n, None, dtype=object)
    s = raw[column].str.strip()
    out = s.to_numpy(dtype=object, na_value=None, copy=True)
    out[(s == "").to_numpy(dtype=bool, na_value=False)] = None
    return out


def _to_trace(p: Path, spec: _Format, raw: pd.DataFrame, lines: np.ndarray, rows_read: int) -> LoadedTrace:
    probs = _Problems(p, lines, raw)
    arrival = _check_arrival(probs, raw[spec.arrival], spec)
    prompt, prompt_ok = _check_tokens(probs, raw[spec.prompt], spec.prompt)
    output, output_ok = _check_tokens(probs, raw[spec.output], spec.output)
    skipped: dict[str, int] = {}
    keep = np.ones(len(raw), dtype=bool)
    if spec.name == "burstgpt":
        # BurstGPT logs failed requests with 0 response tokens: they never produced output, so a
        # replay has nothing to generate for them. Left out, and counted.
        failed = output_ok & (output == 0)
        if failed.any():
            skipped[BURSTGPT_FAILED] = int(failed.sum())
            keep &= ~failed
    probs.flag(spec.prompt, keep & prompt_ok & (prompt < 1), "prompt token count must be at least 1, got {value}")
    probs.flag(spec.output, keep & output_ok & (output < 1), "output token count must be at least 1, got {value}")
    probs.raise_first()
    n = len(raw)
    model = _labels(raw, spec.model, n)
    slo = _labels(raw, spec.slo_class, n)
    hashes = raw[HASHES].to_numpy(dtype=object) if HASHES in raw and raw[HASHES].notna().any() else None
    if not keep.all():
        arrival, prompt, output = arrival[keep], prompt[keep], output[keep]
        model, slo, lines = model[keep], slo[keep], lines[keep]
        hashes = hashes[keep] if hashes is not None else None
    if arrival.size == 0:
        reasons = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        raise UserError(f"empty trace: all {rows_read} rows were skipped ({reasons})", p)
    frame = _frame(arrival, prompt, output, model, slo, lines, hashes)
    source_columns = {"arrival_s": spec.arrival, "prompt_tokens": spec.prompt, "output_tokens": spec.output}
    for col, name in (("model", spec.model), ("slo_class", spec.slo_class)):
        if name is not None and name in raw:
            source_columns[col] = name
    return LoadedTrace(frame, spec.name, p, rows_read, skipped, source_columns,
                       hash_block_tokens=spec.hash_block_tokens if hashes is not None else None)


def _frame(
    arrival: np.ndarray,
    prompt: np.ndarray,
    output: np.ndarray,
    model: np.ndarray,
    slo: np.ndarray,
    lines: np.ndarray,
    hashes: np.ndarray | None = None,
) -> pd.DataFrame:
    """The common frame: sorted stably by arrival, shifted so the first arrival is 0.0 (with the rows' prompt
    block hashes as `prefix_hashes` when given)."""
    order = np.argsort(arrival, kind="stable")
    arr = np.asarray(arrival, dtype=np.float64)[order]
    arr = arr - arr[0]
    frame = pd.DataFrame(
        {
            "arrival_s": arr,
            "prompt_tokens": np.asarray(prompt)[order].astype(np.int64),
            "output_tokens": np.asarray(output)[order].astype(np.int64),
            "model": pd.Series(np.asarray(model, dtype=object)[order], dtype=object),
            "slo_class": pd.Series(np.asarray(slo, dtype=object)[order], dtype=object),
            "source_line": np.asarray(lines)[order].astype(np.int64),
        }
    )
    if hashes is not None:
        frame[HASHES] = pd.Series(np.asarray(hashes, dtype=object)[order], dtype=object)
    return frame


def synthetic_trace(spec: SyntheticSpec, rng: np.random.Generator, lengths: pd.DataFrame | None,
                    lengths_later: bool = False) -> LoadedTrace:
    """A synthetic trace: Poisson or gamma arrivals, token lengths resampled from a trace or fixed.

    Arrivals: the first at 0.0, then `num_requests - 1` gaps, exponential with mean 1/rate_rps
    ("poisson") or gamma with that mean and coefficient of variation `cv` (shape 1/cv^2, scale
    cv^2/rate_rps; cv > 1 is burstier than Poisson). Lengths: (prompt, output) pairs drawn with
    replacement from `lengths` (a loaded trace's frame) when given; `prompt_tokens` /
    `output_tokens` of the spec, when set, override the drawn values. Draws arrivals first, then
    lengths, from `rng`. source_line is the 1-based request index.

    `lengths_later`: every request's lengths are drawn afterwards (per SLO class), so none are needed here.

    Raises:
        UserError: no lengths source and no fixed prompt_tokens and output_tokens.
    """
    n = spec.num_requests
    if lengths is None and (spec.prompt_tokens is None or spec.output_tokens is None) and not lengths_later:
        missing = "prompt_tokens" if spec.prompt_tokens is None else "output_tokens"
        raise UserError(
            "synthetic workload needs token lengths: give lengths_from (a trace), "
            "or both prompt_tokens and output_tokens",
            field=f"workload.synthetic.{missing}",
        )
    if lengths is not None and len(lengths) == 0:
        raise UserError("synthetic workload: the lengths trace has no rows", field="workload.synthetic.lengths_from")
    if spec.arrival == "poisson":
        gaps = rng.exponential(1.0 / spec.rate_rps, size=n - 1)
    else:
        gaps = rng.gamma(1.0 / spec.cv**2, spec.cv**2 / spec.rate_rps, size=n - 1)
    arrival = np.concatenate(([0.0], np.cumsum(gaps)))
    if lengths is not None:
        idx = rng.integers(0, len(lengths), size=n)
        prompt = lengths["prompt_tokens"].to_numpy(dtype=np.int64)[idx]
        output = lengths["output_tokens"].to_numpy(dtype=np.int64)[idx]
    else:
        prompt = np.ones(n, dtype=np.int64)
        output = np.ones(n, dtype=np.int64)
    if spec.prompt_tokens is not None:
        prompt[:] = spec.prompt_tokens
    if spec.output_tokens is not None:
        output[:] = spec.output_tokens
    none = np.full(n, None, dtype=object)
    frame = _frame(arrival, prompt, output, none, none, np.arange(1, n + 1, dtype=np.int64))
    return LoadedTrace(frame, "synthetic", None, n, {}, {})


def write_native_csv(frame: pd.DataFrame, path: str | Path) -> None:
    """Write a frame in the native qlmctl CSV format (header `NATIVE_COLUMNS`).

    `frame` needs arrival_s, prompt_tokens and output_tokens; model and slo_class are written
    empty where absent or None. Floats are written at full precision, so a load reads back the
    same values (up to the shift of the first arrival to 0).
    """
    missing = [c for c in ("arrival_s", "prompt_tokens", "output_tokens") if c not in frame]
    if missing:
        raise ValueError(f"frame lacks column(s) {', '.join(missing)}")
    out = pd.DataFrame(
        {
            "arrival_s": frame["arrival_s"].to_numpy(dtype=np.float64),
            "model": frame["model"].astype(object) if "model" in frame else None,
            "slo_class": frame["slo_class"].astype(object) if "slo_class" in frame else None,
            "prompt_tokens": frame["prompt_tokens"].to_numpy(dtype=np.int64),
            "output_tokens": frame["output_tokens"].to_numpy(dtype=np.int64),
        },
        columns=list(NATIVE_COLUMNS),
    )
    # repr-precision floats: to_csv's default float formatting round-trips.
    out.to_csv(path, index=False, lineterminator="\n")
