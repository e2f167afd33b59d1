"""`vllm bench serve`'s conventions: its run keys in every summary, its options, its result files.

A qlmctl run's `summary.json` carries vLLM's result keys beside qlmctl's own: the run header (`date`,
`backend`, `label`, `model_id`, `tokenizer_id`, `num_prompts`, `request_rate`, `burstiness`,
`max_concurrency`) from `run_header`, and the metrics (`duration`, `completed`, `request_throughput`,
`mean_ttft_ms`, ...) from `qlmctl.metrics.summarize`. `--metric-percentiles`, `--percentile-metrics` and
`--goodput` add what they add in vLLM (`qlmctl.metrics.bench_metrics`), `--metadata KEY=VALUE` adds
top-level keys, and `--save-result` writes vLLM's result file (`write_result_file`; the per-request
arrays only with `--save-detailed`, as vLLM). `read_result_file` reads one back, `vllm bench serve`'s
own included, so that `qlmctl plot` and `qlmctl compare` lay real runs beside simulated ones.

How the options map onto a workload: `--request-rate` is the target rate (a trace's arrivals rescaled
to it, a synthetic workload's rate; `inf`: every request at time 0); `--burstiness B` replaces the
arrival times by a gamma process of shape B (coefficient of variation 1/sqrt(B); 1 is Poisson) at that
rate, as vLLM draws them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qlmctl.errors import UserError
from qlmctl.metrics import GOODPUT_METRICS, LATENCY_METRICS, bench_metrics

if TYPE_CHECKING:
    import pandas as pd

    from qlmctl.core.request import Request
    from qlmctl.scenario import Scenario
    from qlmctl.workload import WorkloadReport

DATE_FORMAT = "%Y%m%d-%H%M%S"
"""vLLM's `date` (local time, to the second)."""

HEADER_KEYS: tuple[str, ...] = ("date", "backend", "label", "model_id", "tokenizer_id", "num_prompts",
                                "request_rate", "burstiness", "max_concurrency")
"""vLLM's run keys, in its order."""

DETAIL_KEYS: tuple[str, ...] = ("input_lens", "output_lens", "ttfts", "itls", "latencies", "start_times",
                                "generated_texts", "errors")
"""vLLM's per-request arrays (written with --save-detailed)."""


def version() -> str:
    try:
        from importlib.metadata import version as v

        return v("qlmctl")
    except Exception:  # noqa: BLE001 - not installed (run from a checkout)
        return "unknown"


def now() -> str:
    """The date as vLLM writes it."""
    return dt.datetime.now().strftime(DATE_FORMAT)


def command_line() -> str:
    """The command as typed (`qlmctl simulate ...`)."""
    args = sys.argv[1:]
    return "qlmctl " + " ".join(shlex.quote(a) for a in args) if args else "qlmctl"


def workload_id(requests: Sequence[Request]) -> str:
    """A digest of what a run replays (arrival times, lengths, models, SLO classes): runs with equal ids saw
    the same workload, whatever their policy or world."""
    h = hashlib.sha256()
    h.update(np.fromiter((r.arrival_s for r in requests), dtype=np.float64, count=len(requests)).round(6).tobytes())
    h.update(np.fromiter((r.prompt_tokens for r in requests), dtype=np.int64, count=len(requests)).tobytes())
    h.update(np.fromiter((r.output_tokens for r in requests), dtype=np.int64, count=len(requests)).tobytes())
    h.update("\0".join(f"{r.model}\1{r.slo_class}" for r in requests).encode())
    return h.hexdigest()[:12]


def configured_rate(scenario: Scenario) -> float | None:
    """The arrival rate the scenario asks for (req/s; inf: all at once), None when a trace keeps its own pace."""
    wl = scenario.spec.workload
    if wl.synthetic is not None:
        return wl.synthetic.rate_rps
    return wl.target_rate_rps


def configured_burstiness(scenario: Scenario) -> float | None:
    """vLLM's burstiness (gamma shape) of the scenario's arrivals; None for a trace's own arrivals."""
    wl = scenario.spec.workload
    if wl.burstiness is not None:
        return wl.burstiness
    if wl.synthetic is not None:
        return 1.0 if wl.synthetic.arrival == "poisson" else 1.0 / wl.synthetic.cv ** 2
    return None


def run_header(scenario: Scenario, report: WorkloadReport, requests: Sequence[Request], *, backend: str,
               label: str, max_concurrency: int | None = None, tokenizer_id: str | None = None,
               metadata: dict[str, str] | None = None, date: str | None = None) -> dict[str, Any]:
    """vLLM's run keys, and qlmctl's record of the run (offered rate, workload id, command, version).

    `date`: the run's (`DATE_FORMAT`; default now): one command's runs under several policies share it."""
    rate = configured_rate(scenario)
    models = list(dict.fromkeys(r.model for r in requests)) or scenario.models
    header: dict[str, Any] = {
        "date": date or now(),
        "label": label,
        "model_id": ",".join(models),
        "tokenizer_id": tokenizer_id,
        "num_prompts": len(requests),
        "request_rate": "inf" if rate is not None and math.isinf(rate) else (rate if rate is not None
                                                                            else report.mean_rate_rps),
        "burstiness": configured_burstiness(scenario),
        "max_concurrency": max_concurrency,
        "target_rate_rps": None if rate is None or math.isinf(rate) else rate,
        "offered_rate_rps": report.mean_rate_rps,
        "arrival_span_s": report.duration_s,
        "workload_id": workload_id(requests),
        "command": command_line(),
        "qlmctl_version": version(),
    }
    if backend:
        header["backend"] = backend
    for k, v in (metadata or {}).items():
        if k in header or k in HEADER_KEYS:
            raise UserError(f"metadata key '{k}' is one of the run's own keys", field="--metadata")
        header[k] = v
    return header


# --- options --------------------------------------------------------------------------------------


@dataclass
class BenchOptions:
    """`vllm bench serve`'s reporting options, as given on a command line."""

    percentiles: list[float] = field(default_factory=list)
    percentile_metrics: list[str] | None = None
    """None: every metric (ttft, tpot, itl, e2el) in the summary, those with values in the table."""
    goodput: dict[str, float] | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    save_result: bool = False
    save_detailed: bool = False
    result_dir: Path | None = None
    result_filename: str | None = None

    @classmethod
    def parse(cls, *, metric_percentiles: str | None = None, percentile_metrics: str | None = None,
              goodput: Sequence[str] | None = None, metadata: Sequence[str] | None = None,
              save_result: bool = False, save_detailed: bool = False, result_dir: Path | None = None,
              result_filename: str | None = None) -> "BenchOptions":
        """From the options' text; UserError naming the option for a bad value."""
        opts = cls(save_result=save_result or save_detailed, save_detailed=save_detailed, result_dir=result_dir,
                   result_filename=result_filename)
        if metric_percentiles:
            try:
                opts.percentiles = [float(p) for p in metric_percentiles.split(",") if p.strip()]
            except ValueError:
                raise UserError(f"expected comma-separated numbers, got '{metric_percentiles}'",
                                field="--metric-percentiles") from None
            if any(not 0 < p <= 100 for p in opts.percentiles):
                raise UserError("percentiles must be in (0, 100]", field="--metric-percentiles")
        if percentile_metrics:
            names = [m.strip() for m in percentile_metrics.split(",") if m.strip()]
            bad = [m for m in names if m not in LATENCY_METRICS]
            if bad:
                raise UserError(f"unknown metric '{bad[0]}'; choose from {', '.join(LATENCY_METRICS)}",
                                field="--percentile-metrics")
            opts.percentile_metrics = names
        if goodput:
            opts.goodput = {}
            for item in goodput:
                name, _, value = item.partition(":")
                try:
                    ms = float(value)
                except ValueError:
                    raise UserError(f"expected METRIC:MS pairs (e.g. ttft:500 tpot:50), got '{item}'",
                                    field="--goodput") from None
                if name not in GOODPUT_METRICS or ms < 0:
                    raise UserError(f"bad '{item}': the metric is one of {', '.join(GOODPUT_METRICS)}, the "
                                    f"threshold a non-negative number of ms", field="--goodput")
                opts.goodput[name] = ms
        for item in metadata or ():
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise UserError(f"expected KEY=VALUE, got '{item}'", field="--metadata")
            opts.metadata[key.strip()] = value.strip()
        return opts

    def apply(self, summary: dict[str, Any], requests: Sequence[Request],
              itls: Sequence[Sequence[float]] | None = None) -> None:
        """Add the percentiles and goodput asked for to `summary` (in place)."""
        extra = bench_metrics(requests, itls=itls, percentiles=self.percentiles,
                              percentile_metrics=self.percentile_metrics or LATENCY_METRICS, goodput=self.goodput)
        if self.goodput:
            summary["slo_goodput"] = summary.get("request_goodput")
        for k, v in extra.items():
            if k == "request_goodput" or k not in summary:
                summary[k] = v

    def table_percentiles(self) -> list[float] | None:
        """Percentiles the console table shows (None: its own)."""
        return self.percentiles or None


def parse_rate(text: str | float | None, option: str = "--request-rate") -> float | None:
    """A request rate: a positive number, or inf (every request at once)."""
    if text is None:
        return None
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise UserError(f"expected a rate in requests/s (a positive number, or inf), got '{text}'", field=option) from None
    if not v > 0 or math.isnan(v):
        raise UserError(f"must be > 0 requests/s (or inf: every request at once), got '{text}'", field=option)
    return v


# --- result files ---------------------------------------------------------------------------------


def result_filename(summary: dict[str, Any], label: str) -> str:
    """vLLM's default name: `<label>-<request_rate>qps[-concurrency<N>]-<model>-<date>.json`."""
    rate = summary.get("request_rate")
    rate_text = "inf" if rate in ("inf", None) or (isinstance(rate, float) and math.isinf(rate)) else f"{float(rate)}"
    conc = summary.get("max_concurrency")
    model = str(summary.get("model_id") or "model").split(",")[0].split("/")[-1]
    return (f"{label}-{rate_text}qps{f'-concurrency{conc}' if conc is not None else ''}-{model}-"
            f"{summary.get('date') or dt.datetime.now().strftime(DATE_FORMAT)}.json")


def result_json(summary: dict[str, Any], requests: Sequence[Request] | None = None,
                itls: Sequence[Sequence[float]] | None = None, texts: Sequence[str] | None = None,
                detailed: bool = False) -> dict[str, Any]:
    """The run as `vllm bench serve --save-result` writes it: its keys first, then qlmctl's summary; with
    `detailed`, the per-request arrays (s; a failed request has ttft 0 and its error, as in vLLM)."""
    from qlmctl.report import plain

    head = {k: summary.get(k) for k in HEADER_KEYS}
    head["endpoint_type"] = summary.get("backend")
    out = {**head, **{k: v for k, v in summary.items() if k not in head}}
    if detailed and requests is not None:
        t0 = min((r.arrival_s for r in requests), default=0.0)
        out["input_lens"] = [r.prompt_tokens for r in requests]
        out["output_lens"] = [r.generated_tokens if r.error is None else 0 for r in requests]
        out["ttfts"] = [r.ttft_s if r.ttft_s is not None and r.error is None else 0.0 for r in requests]
        out["itls"] = [list(x) for x in itls] if itls is not None else [[] for _ in requests]
        out["latencies"] = [r.e2el_s if r.e2el_s is not None and r.error is None else 0.0 for r in requests]
        out["start_times"] = [r.arrival_s - t0 for r in requests]
        out["generated_texts"] = list(texts) if texts is not None else ["" for _ in requests]
        out["errors"] = [r.error or "" for r in requests]
    return plain(out)


def write_result_file(opts: BenchOptions, summary: dict[str, Any], requests: Sequence[Request] | None = None,
                      itls: Sequence[Sequence[float]] | None = None, texts: Sequence[str] | None = None,
                      label: str | None = None) -> Path:
    """Write vLLM's result file for one run (`--result-dir`/`--result-filename`, else vLLM's name in the cwd)."""
    name = opts.result_filename or result_filename(summary, label or str(summary.get("label") or "qlmctl"))
    folder = Path(opts.result_dir) if opts.result_dir is not None else Path.cwd()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    data = result_json(summary, requests, itls, texts, opts.save_detailed)
    path.write_text(json.dumps(data, allow_nan=False) + "\n", encoding="utf-8")
    return path


def read_result_file(path: Path) -> list[dict[str, Any]]:
    """The results in a `vllm bench serve` result file: one JSON object, or several one per line (its
    --append-result). Raises UserError when it is not one."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot read: {e.strerror or e}", path) from None
    results: list[dict[str, Any]] = []
    decoder = json.JSONDecoder()
    pos, n = 0, len(text)
    while pos < n:
        while pos < n and text[pos].isspace():
            pos += 1
        if pos >= n:
            break
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise UserError(f"not a vllm bench serve result file: invalid JSON ({e.msg})", path, e.lineno) from None
        if not isinstance(obj, dict) or not is_result(obj):
            raise UserError("not a vllm bench serve result file (no completed / request_throughput keys)", path)
        results.append(obj)
    if not results:
        raise UserError("empty result file", path)
    return results


def is_result(obj: dict[str, Any]) -> bool:
    return "completed" in obj and "request_throughput" in obj and "duration" in obj


def requests_frame_of(result: dict[str, Any]) -> pd.DataFrame | None:
    """A requests frame (`qlmctl.metrics.FRAME_COLUMNS`, as far as the file tells) from a result's per-request
    arrays; None when it has none (saved without --save-detailed). Arrival times come from `start_times`
    (newer vLLM), else every request starts at 0; every request is in one SLO class, `all`, without a
    deadline (ttft_slo_s inf), unless the file was written by qlmctl."""
    import pandas as pd

    ttfts = result.get("ttfts")
    if not isinstance(ttfts, list) or not ttfts:
        return None
    n = len(ttfts)

    def col(name: str, default: Any) -> list:
        v = result.get(name)
        return list(v) if isinstance(v, list) and len(v) == n else [default] * n

    errors = [e or None for e in col("errors", "")]
    itls = col("itls", [])
    lat = result.get("latencies")
    if isinstance(lat, list) and len(lat) == n:
        e2el = [float(x) for x in lat]
    else:  # older vLLM: the latency is the first token plus every gap after it
        e2el = [float(t) + float(sum(g)) for t, g in zip(ttfts, itls)]
    start = [float(x) for x in col("start_times", 0.0)]
    ttft = np.array([np.nan if e else float(t) for t, e in zip(ttfts, errors)], dtype=float)
    e2el_a = np.array([np.nan if e else x for x, e in zip(e2el, errors)], dtype=float)
    arrival = np.array(start, dtype=float)
    out_lens = np.array([int(x or 0) for x in col("output_lens", 0)], dtype=np.int64)
    tpot = np.where(out_lens > 1, (e2el_a - ttft) / np.maximum(out_lens - 1, 1), np.nan)
    model = str(result.get("model_id") or "model")
    return pd.DataFrame({
        "request_id": np.arange(n, dtype=np.int64),
        "model": [model] * n,
        "slo_class": ["all"] * n,
        "arrival_s": arrival,
        "dispatch_s": arrival,
        "first_token_s": arrival + ttft,
        "finish_s": arrival + e2el_a,
        "ttft_s": ttft,
        "tpot_s": tpot,
        "e2el_s": e2el_a,
        "prompt_tokens": np.array([int(x or 0) for x in col("input_lens", 0)], dtype=np.int64),
        "output_tokens": out_lens,
        "generated_tokens": out_lens,
        "instance_id": pd.array([None] * n, dtype="Int64"),
        "num_preemptions": np.zeros(n, dtype=np.int64),
        "num_evictions": np.zeros(n, dtype=np.int64),
        "slo_met": np.zeros(n, dtype=bool),
        "ttft_slo_s": np.full(n, np.inf),
        "tpot_slo_s": np.full(n, np.nan),
        "error": pd.Series(errors, dtype=object),
    })


def summary_of(result: dict[str, Any], path: Path) -> dict[str, Any]:
    """A `vllm bench serve` result as a qlmctl summary: its keys as they are (the same names), with what
    qlmctl adds left undefined (no SLO classes: no attainment) and `policy`/`scenario`/`backend` set from
    its label, model and backend so that tables and figures can name it."""
    s = {k: v for k, v in result.items() if k not in DETAIL_KEYS}
    s["source_file"] = str(path)
    if "qlmctl_version" in result:  # written by qlmctl (--save-result): its own names stand
        return s
    s.setdefault("num_requests", (result.get("completed") or 0) + (result.get("failed") or 0))
    label = result.get("label") or result.get("backend") or "vllm"
    s["policy"] = f"vllm:{label}"
    s["scenario"] = s.get("scenario") or f"vllm bench serve ({result.get('model_id') or 'model'})"
    s["backend"] = f"vllm bench serve ({result.get('backend') or 'openai'})"
    rate = result.get("request_rate")
    if isinstance(rate, (int, float)) and math.isfinite(rate):
        s.setdefault("target_rate_rps", float(rate))
    return s
