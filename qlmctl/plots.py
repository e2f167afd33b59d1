"""Figures from results folders, written by `qlmctl simulate`, the live mode, or `qlmctl evaluate`.

A *run* is one policy's folder (`summary.json` + `requests.parquet|csv`, optionally `timeline.*` and
`scenario.yaml`; see qlmctl/report.py). Runs are compared in *groups*: the runs of one scenario at one
offered load, i.e. with the same `scenario` and `target_rate_rps` in their summaries (a simulated and
a live run of one trace therefore land in one group, labelled by their backend). Each group gets:

- `slo_attainment`: SLO attainment by policy, overall and per SLO class (bars, %);
- `latency_cdf`: CDFs of TTFT and E2EL per SLO class (s, log scale), a dashed line at the TTFT SLO;
  requests that never completed keep the curve below 1;
- `queue_depth`: requests waiting in the scheduler (arrived, not yet dispatched) per SLO class over
  time, one panel per run (from the requests, so exact; a request waiting again after an eviction
  is not counted again);
- `throughput`: completed and SLO-meeting requests per second over time;
- `timeline-<run>`: per instance, the requests running by SLO class, the model loaded (background
  colour), swaps (grey, the new model named) and evictions (red ticks);

and when runs of one scenario span two or more offered rates (`target_rate_rps`, else
`offered_rate_rps` in the summaries, as `qlmctl evaluate` writes them), `attainment_vs_rate`: SLO
attainment overall and per class, and goodput, against the offered rate.

Every policy keeps one colour in every figure (`policy_color`). Matplotlib runs headless (Agg).
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import yaml

from qlmctl.errors import UserError
from qlmctl.report import SUMMARY_FILE, read_results, read_timeline

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

ALL_REQUESTS = "\0all"
"""The latency CDF's column over every request (beside the SLO classes), for results without classes."""

FIGURES = ("slo_attainment", "latency_cdf", "queue_depth", "throughput", "timeline", "attainment_vs_rate")
"""Figure kinds `plot_results` can draw (file stems; timelines get `-<run>` appended)."""

FORMATS = ("png", "svg")

# One colour per policy, everywhere. Known policies first (tab10 order); others take the rest in
# name order, so a colour never depends on which runs happen to be plotted together.
# The order is also the drawing order: qlm and qlm-lp are kept apart so that, when their curves
# coincide, the thicker qlm line still shows under the thin qlm-lp one.
_POLICY_COLORS = {
    "fcfs": "#7f7f7f",
    "priority": "#8c564b",
    "edf": "#1f77b4",
    "qlm": "#d62728",
    "shepherd": "#9467bd",
    "sjf-oracle": "#bcbd22",
    "qlm-lp": "#ff7f0e",
}
_SPARE_COLORS = ("#2ca02c", "#17becf", "#e377c2", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173")
_CLASS_COLORS = ("#e41a1c", "#ff7f00", "#4daf4a", "#377eb8", "#984ea3", "#a65628", "#f781bf", "#999999")
_MODEL_COLORS = ("#8dd3c7", "#bebada", "#fdb462", "#80b1d3", "#b3de69", "#fccde5", "#ffffb3", "#d9d9d9")
_MAX_SWAP_LABELS = 16
_LINESTYLES = ("-", "--", ":", "-.")
_CDF_POINTS = 400
_GRID_POINTS = 600
_MAX_TIMELINE_INSTANCES = 8


def policy_color(policy: str) -> str:
    """The colour of `policy` in every figure (stable across runs and figures)."""
    known = _POLICY_COLORS.get(policy)
    if known is not None:
        return known
    # Stable for a name: a hash of the name, not the order of appearance.
    h = sum((i + 1) * ord(c) for i, c in enumerate(policy))
    return _SPARE_COLORS[h % len(_SPARE_COLORS)]


def policy_label(policy: str) -> str:
    """How figures and tables name a policy: its class's `label` when it has one (e.g. oracles)."""
    try:
        from qlmctl.policies import policy_class

        return policy_class(policy).display_name()
    except UserError:
        return policy


# --- loading -------------------------------------------------------------------------------------


@dataclass
class Run:
    """One policy's results folder, or one result of a `vllm bench serve` result file (`external`). The
    summary is read at once; requests and timeline on first use."""

    folder: Path
    summary: dict[str, Any]
    scenario: dict[str, Any] | None
    label: str = ""
    """Legend label: the policy's, with the backend or folder added when two runs share a policy."""
    style: str = "-"
    external: dict[str, Any] | None = field(default=None, repr=False)
    """A vllm bench serve result (its requests come from its per-request arrays, if it has them)."""
    _requests: pd.DataFrame | None = field(default=None, repr=False)
    _timeline: pd.DataFrame | None = field(default=None, repr=False)
    _timeline_read: bool = field(default=False, repr=False)

    @property
    def requests(self) -> pd.DataFrame:
        if self._requests is None:
            if self.external is not None:
                from qlmctl.metrics import FRAME_COLUMNS
                from qlmctl.vllm_bench import requests_frame_of

                frame = requests_frame_of(self.external)
                self._requests = frame if frame is not None else pd.DataFrame(columns=list(FRAME_COLUMNS))
            else:
                self._requests = _read_requests(self.folder)
        return self._requests

    @property
    def has_requests(self) -> bool:
        """Per-request data to draw from (a vllm result saved without --save-detailed has none)."""
        return self.external is None or isinstance(self.external.get("ttfts"), list)

    @property
    def has_times(self) -> bool:
        """Arrival times (a vllm result has them from its start_times, in newer vLLM)."""
        return self.external is None or isinstance(self.external.get("start_times"), list)

    @property
    def timeline(self) -> pd.DataFrame | None:
        if self.external is not None:
            return None
        if not self._timeline_read:
            self._timeline = read_timeline(self.folder)
            self._timeline_read = True
        return self._timeline

    def release(self) -> None:
        """Drop the loaded frames (they are read again if needed)."""
        self._requests, self._timeline, self._timeline_read = None, None, False

    @property
    def policy(self) -> str:
        return str(self.summary.get("policy") or self.folder.name)

    @property
    def scenario_name(self) -> str:
        return str(self.summary.get("scenario") or (self.scenario or {}).get("name") or self.folder.parent.name)

    @property
    def rate(self) -> float | None:
        """The offered rate this run was made at (req/s), when recorded."""
        for key in ("target_rate_rps", "request_rate", "offered_rate_rps"):
            v = self.summary.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                return float(v)
        return None

    @property
    def workload(self) -> str | None:
        """The workload's digest (`qlmctl.vllm_bench.workload_id`), when recorded."""
        v = self.summary.get("workload_id")
        return str(v) if v else None

    def class_slos(self) -> dict[str, float]:
        """TTFT SLO (s) per SLO class, from the run's scenario, else from its requests."""
        classes = (self.scenario or {}).get("slo_classes")
        if isinstance(classes, dict):
            out = {str(k): float(v["ttft_s"]) for k, v in classes.items() if isinstance(v, dict) and "ttft_s" in v}
            if out:
                return out
        f = self.requests
        if "ttft_slo_s" not in f or not len(f):
            return {str(c): math.inf for c in f["slo_class"].unique()} if len(f) else {}
        return {str(k): float(v) for k, v in f.groupby("slo_class")["ttft_slo_s"].min().items()}


@dataclass
class RunGroup:
    """Runs of one workload (one scenario at one offered load), compared in one set of figures."""

    scenario: str
    rate: float | None
    runs: list[Run] = field(default_factory=list)
    workload: str | None = None
    """The runs' workload digest, when they record one."""
    mixed: bool = False
    """Runs of different workloads drawn together on request (`--mixed`)."""
    tag: str = ""
    """Told apart from a group of the same scenario and rate (a different workload)."""

    @property
    def title(self) -> str:
        text = self.scenario if self.rate is None else f"{self.scenario} at {self.rate:.3g} req/s"
        if self.tag:
            text += f" (workload {self.tag})"
        return text + (" (different workloads)" if self.mixed else "")

    @property
    def slug(self) -> str:
        base = _slug(self.scenario)
        base = base if self.rate is None else f"{base}-r{self.rate:.3g}"
        return f"{base}-{self.tag}" if self.tag else base


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def find_run_folders(paths: Sequence[Path]) -> list[Path]:
    """Every results folder (holding summary.json) at or under `paths`, sorted within each path; a path
    that is a `vllm bench serve` result file (JSON) is listed as it is.

    Raises:
        UserError: a path does not exist or holds no results folder.
    """
    found: list[Path] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise UserError("no such file or folder", p)
        if p.is_file():
            if p.name != SUMMARY_FILE:
                if p.suffix == ".json":
                    found.append(p)  # a vllm bench serve result file (checked when read)
                    continue
                raise UserError(f"not a results folder or a vllm bench serve result file (expected a folder "
                                f"with {SUMMARY_FILE}, or a .json result)", p)
            p = p.parent
        if (p / SUMMARY_FILE).exists():
            hits = [p]
        else:
            hits = sorted(s.parent for s in p.rglob(SUMMARY_FILE))
        if not hits:
            raise UserError(f"no results here: no {SUMMARY_FILE} in it or below it", p)
        found.extend(h for h in hits if h not in found)
    return found


def _read_requests(folder: Path) -> pd.DataFrame:
    try:
        _, frame = read_results(folder)
    except FileNotFoundError as e:
        raise UserError(str(e).replace(f" in {folder}", ""), folder) from None
    missing = [c for c in ("slo_class", "arrival_s", "dispatch_s", "finish_s", "ttft_s", "e2el_s", "slo_met")
               if c not in frame]
    if missing:
        raise UserError(f"requests file lacks column(s) {', '.join(missing)}", folder)
    return frame


def load_run(folder: Path) -> Run:
    """Read one results folder's summary and scenario (requests and timeline are read when used).

    Raises:
        UserError: unreadable summary.json, or no requests file.
    """
    folder = Path(folder)
    if not any((folder / f"requests.{ext}").exists() for ext in ("parquet", "csv")):
        raise UserError("no requests.parquet or requests.csv", folder)
    try:
        summary = json.loads((folder / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"unreadable {SUMMARY_FILE}: {e}", folder / SUMMARY_FILE) from None
    if not isinstance(summary, dict):
        raise UserError("expected a JSON object", folder / SUMMARY_FILE)
    scenario = None
    sc_path = folder / "scenario.yaml"
    if sc_path.exists():
        try:
            scenario = yaml.safe_load(sc_path.read_text())
        except yaml.YAMLError:
            scenario = None  # only used for class SLOs, instance names and initial models
    return Run(folder, summary, scenario if isinstance(scenario, dict) else None)


def load_vllm_runs(path: Path) -> list[Run]:
    """The results of a `vllm bench serve` result file, one run each."""
    from qlmctl.vllm_bench import read_result_file, summary_of

    results = read_result_file(path)
    runs = []
    for k, res in enumerate(results):
        run = Run(path if len(results) == 1 else path.with_name(f"{path.name}#{k + 1}"), summary_of(res, path), None,
                  external=res)
        runs.append(run)
    return runs


def load_runs(paths: Sequence[Path]) -> list[Run]:
    runs: list[Run] = []
    for f in find_run_folders(paths):
        runs.extend(load_vllm_runs(f) if f.is_file() else [load_run(f)])
    return runs


def _same_rate(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and abs(a - b) <= 0.02 * max(abs(a), abs(b))


def group_runs(runs: Sequence[Run], mixed: bool = False) -> list[RunGroup]:
    """Group runs by workload and give each run a unique legend label.

    A workload is (scenario, offered rate, workload digest) as the runs record them; runs of one scenario at
    one rate that replayed different requests land in different groups. A `vllm bench serve` result joins
    the one group of the same request count and rate, if there is exactly one (else it is a group of its
    own). `mixed`: every run in one group, whatever its workload.
    """
    groups: dict[tuple[str, float | None, str | None], RunGroup] = {}
    if mixed:
        names = list(dict.fromkeys(r.scenario_name for r in runs))
        rates = {r.rate for r in runs}
        workloads = {(r.scenario_name, r.rate, r.workload) for r in runs}
        g = RunGroup(" vs ".join(names), next(iter(rates)) if len(rates) == 1 else None, list(runs),
                     mixed=len(workloads) > 1)
        groups[("", None, None)] = g
    else:
        external = [r for r in runs if r.external is not None]
        for run in runs:
            if run.external is None:
                key = (run.scenario_name, run.rate, run.workload)
                groups.setdefault(key, RunGroup(key[0], key[1], workload=key[2])).runs.append(run)
        own = list(groups.values())
        for run in external:
            n = run.summary.get("num_prompts") or run.summary.get("num_requests")
            fits = [g for g in own if _same_rate(g.rate, run.rate)
                    and any((r.summary.get("num_prompts") or r.summary.get("num_requests")) == n for r in g.runs)]
            if len(fits) == 1:
                fits[0].runs.append(run)
            else:
                key = (run.scenario_name, run.rate, None)
                groups.setdefault(key, RunGroup(key[0], key[1])).runs.append(run)
        # Groups of one scenario and rate but different workloads: tell them apart by their digests.
        seen: dict[tuple[str, float | None], list[RunGroup]] = {}
        for g in groups.values():
            seen.setdefault((g.scenario, g.rate), []).append(g)
        for same in seen.values():
            if len(same) > 1:
                for g in same:
                    g.tag = (g.workload or "other")[:6]
    order = {p: i for i, p in enumerate(_POLICY_COLORS)}
    for g in groups.values():
        g.runs.sort(key=lambda r: (r.external is not None, order.get(r.policy, len(order)), r.policy, str(r.folder)))
        _label(g.runs)
    return sorted(groups.values(), key=lambda g: (g.scenario, -1.0 if g.rate is None else g.rate, g.tag))


def grouping_notes(groups: Sequence[RunGroup]) -> list[str]:
    """What a user should know about how runs were grouped (runs of one scenario drawn apart, or mixed)."""
    notes = []
    by_scenario: dict[str, list[RunGroup]] = {}
    for g in groups:
        by_scenario.setdefault(g.scenario, []).append(g)
    for name, gs in by_scenario.items():
        if len(gs) > 1:
            what = "; ".join(f"{g.title}: {', '.join(r.label for r in g.runs)}" for g in gs)
            notes.append(f"runs of {name} differ in workload or rate, so they are drawn apart ({what}); pass "
                         f"--mixed to draw them together")
    for g in groups:
        if g.mixed:
            notes.append(f"{g.title}: runs of different workloads or rates drawn together (--mixed)")
    return notes


def _label(runs: list[Run]) -> None:
    by_policy: dict[str, list[Run]] = {}
    for r in runs:
        by_policy.setdefault(r.policy, []).append(r)
    sources: list[str] = []
    for pol, rs in by_policy.items():
        if len(rs) == 1:
            rs[0].label = policy_label(pol)
            continue
        backends = [str(r.summary.get("backend") or "") for r in rs]
        distinct = len(set(backends)) == len(backends) and all(backends)
        for r, b in zip(rs, backends):
            src = b if distinct else r.folder.parent.name
            r.label = f"{policy_label(pol)} ({src})"
            if src not in sources:
                sources.append(src)
            r.style = _LINESTYLES[sources.index(src) % len(_LINESTYLES)]


# --- drawing helpers -----------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _classes(runs: Iterable[Run]) -> list[str]:
    """SLO classes, tightest TTFT SLO first."""
    slo: dict[str, float] = {}
    for r in runs:
        for cls, v in r.class_slos().items():
            slo[cls] = min(slo.get(cls, math.inf), v)
        for cls in r.summary.get("slo_attainment_by_class") or {}:
            slo.setdefault(str(cls), math.inf)
    return sorted(slo, key=lambda c: (slo[c], c))


_NAMED_CLASS_COLORS = {"interactive": "#e41a1c", "batch-1": "#ff7f00", "batch-2": "#4daf4a", "batch": "#377eb8",
                       "code": "#984ea3", "chat": "#a65628", "all": "#555555"}
"""Colours of common SLO class names; any other name takes one by a hash of its name."""


def _class_colors(classes: Sequence[str]) -> dict[str, str]:
    """A colour per SLO class, by its name (the same class has the same colour in every figure): the named
    ones, else a hash of the name into the palette (the next free colour on a clash within `classes`)."""
    out: dict[str, str] = {}
    for c in classes:
        if c in _NAMED_CLASS_COLORS:
            out[c] = _NAMED_CLASS_COLORS[c]
    used = set(out.values())
    for c in sorted(c for c in classes if c not in out):
        h = sum((i + 1) * ord(ch) for i, ch in enumerate(c)) % len(_CLASS_COLORS)
        for k in range(len(_CLASS_COLORS)):
            colour = _CLASS_COLORS[(h + k) % len(_CLASS_COLORS)]
            if colour not in used or k == len(_CLASS_COLORS) - 1:
                break
        out[c] = colour
        used.add(colour)
    return out


def _fmt_s(x: float) -> str:
    if x >= 3600:
        return f"{x / 3600:g} h"
    if x >= 60:
        return f"{x / 60:g} min"
    return f"{x:g} s"


def _class_title(cls: str, runs: Sequence[Run]) -> str:
    for r in runs:
        v = r.class_slos().get(cls)
        if v is not None and math.isfinite(v):
            return f"{cls} (TTFT SLO {_fmt_s(v)})"
    return cls


def _time_origin(runs: Sequence[Run]) -> float:
    starts = [float(r.requests["arrival_s"].min()) for r in runs if len(r.requests)]
    return min(starts) if starts else 0.0


def _time_unit(span_s: float) -> tuple[float, str]:
    """Divisor and name for a time axis spanning `span_s` seconds."""
    if span_s > 3 * 3600:
        return 3600.0, "h"
    if span_s > 3 * 60:
        return 60.0, "min"
    return 1.0, "s"


def _legend_below(fig: "Figure", handles: list, labels: list[str], ncol: int | None = None) -> None:
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=ncol or min(len(labels), 7), frameon=False,
                   bbox_to_anchor=(0.5, 0.0))


# --- figures for one group ------------------------------------------------------------------------


def fig_slo_attainment(group: RunGroup) -> "Figure | None":
    """Grouped bars: SLO attainment (%) overall and per class, one bar per run (runs without SLO classes, as
    vllm bench serve's, are left out)."""
    plt = _pyplot()
    runs = [r for r in group.runs if r.summary.get("slo_attainment") is not None or r.external is None]
    if not runs:
        return None
    classes = _classes(runs)
    cats = ["all", *classes]
    fig, ax = plt.subplots(figsize=(max(6.5, 1.4 * len(cats) + 0.35 * len(runs) * len(cats)), 4.4))
    width = 0.8 / max(1, len(runs))
    x = np.arange(len(cats))
    for i, run in enumerate(runs):
        by_class = run.summary.get("slo_attainment_by_class") or {}
        vals = [run.summary.get("slo_attainment")] + [by_class.get(c) for c in classes]
        ys = [np.nan if v is None else 100.0 * float(v) for v in vals]
        pos = x - 0.4 + width * (i + 0.5)
        bars = ax.bar(pos, ys, width * 0.92, color=policy_color(run.policy), label=run.label,
                      hatch=None if run.style == "-" else "//", edgecolor="white", linewidth=0.5)
        if len(runs) * len(cats) <= 36:
            for b, y in zip(bars, ys):
                if not np.isnan(y):
                    ax.text(b.get_x() + b.get_width() / 2, y + 1, f"{y:.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, ["all requests", *[_class_title(c, runs).replace(" (", "\n(") for c in classes]])
    ax.set_ylim(0, 110)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("SLO attainment (% of requests)")
    ax.set_title(f"SLO attainment by policy and SLO class: {group.title}")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    handles, labels = ax.get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    _legend_below(fig, handles, labels)
    return fig


def _cdf_points(values: np.ndarray, n_total: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, F(x)) for the finite `values` out of `n_total` requests, at most _CDF_POINTS points."""
    v = np.sort(values[np.isfinite(values)])
    if v.size == 0:
        return v, v
    frac = np.arange(1, v.size + 1) / n_total
    if v.size > _CDF_POINTS:
        idx = np.unique(np.linspace(0, v.size - 1, _CDF_POINTS).astype(int))
        v, frac = v[idx], frac[idx]
    return v, frac


def fig_latency_cdf(group: RunGroup) -> "Figure | None":
    """CDFs of TTFT (top) and E2EL (bottom) per SLO class, one line per run (with a vllm bench serve result
    among them, which has no SLO classes, a first column over all requests)."""
    plt = _pyplot()
    runs = [r for r in group.runs if r.has_requests]
    if not runs:
        return None
    classes = _classes([r for r in runs if r.external is None])
    if any(r.external is not None for r in runs):
        classes = [ALL_REQUESTS, *classes]
    ncol = max(1, len(classes))
    fig, axes = plt.subplots(2, ncol, figsize=(3.6 * ncol + 0.8, 6.4), squeeze=False, sharey=True)
    for j, cls in enumerate(classes):
        for i, (metric, name) in enumerate((("ttft_s", "TTFT"), ("e2el_s", "E2EL"))):
            ax: Axes = axes[i][j]
            slo = None
            for k, run in enumerate(runs):
                f = run.requests
                sub = f if cls == ALL_REQUESTS else f[f["slo_class"] == cls]
                if not len(sub):
                    continue
                # Only completed requests have an E2EL; the others keep the curve below 1.
                done = sub["finish_s"].notna() & (sub["error"].isna() if "error" in sub else True)
                vals = sub.loc[done, metric].to_numpy(dtype=float)
                xs, ys = _cdf_points(np.maximum(vals, 1e-3), len(sub))
                if xs.size:
                    ax.step(xs, ys, where="post", color=policy_color(run.policy), linestyle=run.style,
                            label=run.label, linewidth=_width(k, len(runs)))
                if slo is None and "ttft_slo_s" in sub and cls != ALL_REQUESTS:
                    slo = float(sub["ttft_slo_s"].iloc[0])
            if slo is not None and metric == "ttft_s":
                ax.axvline(slo, color="black", linestyle="--", linewidth=0.9)
                ax.text(slo, 0.03, " SLO", fontsize=8, ha="left")
            ax.set_xscale("log")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3, which="both")
            ax.set_xlabel(f"{name} (s, log scale)")
            if j == 0:
                ax.set_ylabel(f"fraction of requests\n({name})")
            if i == 0:
                ax.set_title("all requests" if cls == ALL_REQUESTS else _class_title(cls, runs), fontsize=10)
    fig.suptitle(f"TTFT and E2EL distributions per SLO class: {group.title}")
    handles, labels = _unique_handles(axes)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    _legend_below(fig, handles, labels)
    return fig


def _width(i: int, n: int) -> float:
    """Line width of the i-th of n lines: the first drawn thickest, so that identical curves stay visible."""
    return 1.0 + 2.4 * (n - 1 - i) / max(1, n - 1)


def _unique_handles(axes: Any) -> tuple[list, list[str]]:
    seen: dict[str, Any] = {}
    for ax in np.ravel(axes):
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    return list(seen.values()), list(seen)


def _queue_series(f: pd.DataFrame, classes: Sequence[str], grid: np.ndarray) -> dict[str, np.ndarray]:
    """Requests waiting in the scheduler per class at each grid time: arrived and not yet dispatched.

    Computed from the requests, not from the sampled timeline, so that it is exact between samples
    and works for runs without a timeline. A request never dispatched waits to the end.
    """
    out: dict[str, np.ndarray] = {}
    for cls in classes:
        sub = f[f["slo_class"] == cls]
        if "error" in sub:
            # Refused on arrival (e.g. too long for the model): never queued.
            sub = sub[sub["error"].isna() | sub["dispatch_s"].notna()]
        arr = sub["arrival_s"].to_numpy(dtype=float)
        dis = sub["dispatch_s"].to_numpy(dtype=float)
        dis = np.where(np.isnan(dis), np.inf, dis)
        out[cls] = _running_counts(arr, dis, grid)
    return out


def fig_queue_depth(group: RunGroup) -> "Figure | None":
    """Requests waiting in the scheduler per SLO class over time, one panel per run (qlmctl's runs: a vllm
    bench serve result does not say when a request left a queue)."""
    plt = _pyplot()
    runs = [r for r in group.runs if r.external is None]
    if not runs:
        return None
    classes = _classes(runs)
    colors = _class_colors(classes)
    t0 = _time_origin(runs)
    end = max((float(np.nanmax(r.requests["finish_s"])) for r in runs if r.requests["finish_s"].notna().any()),
              default=t0 + 1.0)
    grid = np.linspace(t0, max(end, t0 + 1e-3), _GRID_POINTS)
    div, unit = _time_unit(end - t0)
    ncol = 2 if len(runs) > 3 else 1
    nrow = -(-len(runs) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.2 * ncol + 0.5, 1.9 * nrow + 1.2), squeeze=False,
                             sharex=True, sharey=True)
    top = 1.0
    for k, run in enumerate(runs):
        ax = axes[k // ncol][k % ncol]
        per = _queue_series(run.requests, classes, grid)
        for cls in classes:
            ax.plot((grid - t0) / div, per[cls], color=colors[cls], linewidth=1.1, label=cls)
            top = max(top, float(per[cls].max()))
        ax.set_title(run.label, fontsize=9, color=policy_color(run.policy), loc="left")
        ax.grid(alpha=0.3)
        if k % ncol == 0:
            ax.set_ylabel("waiting requests")
    axes[0][0].set_ylim(0, top * 1.05)  # shared by every panel
    for k in range(len(runs), nrow * ncol):
        axes[k // ncol][k % ncol].set_visible(False)
    for k in range(len(runs)):
        if k + ncol >= len(runs):
            ax = axes[k // ncol][k % ncol]
            ax.set_xlabel(f"time since the first arrival ({unit})")
            ax.xaxis.set_tick_params(labelbottom=True)
    fig.suptitle(f"Requests waiting in the scheduler (arrived, not yet dispatched), per SLO class: {group.title}")
    handles, labels = _unique_handles(axes)
    fig.tight_layout(rect=(0, 0.06 if nrow > 1 else 0.1, 1, 1))
    _legend_below(fig, handles, labels)
    return fig


MIN_PER_BIN = 30
"""Completions a throughput bin should hold on average: fewer and the curve is mostly counting noise."""


def _bin_width(span_s: float, count: int = 0) -> float:
    """A round bin width (`_TIME_BINS`: 1, 2, 5, 10, 15, 30 s, 1, 2, 5 min...) giving at most about 60 bins over `span_s`, and on
    average at least `MIN_PER_BIN` of `count` events per bin (so that a rate per bin is readable)."""
    raw = max(span_s / 60.0, 1e-3)
    if count > 0:
        raw = max(raw, span_s * MIN_PER_BIN / count)
    raw = min(raw, max(span_s / 8.0, 1e-3))  # still a curve: 8 bins at least
    for w in _TIME_BINS:
        if raw <= w:
            return w
    return 3600.0 * math.ceil(raw / 3600.0)


_TIME_BINS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800,
              3600)
"""Bin widths a time axis reads easily, s."""


def fig_throughput(group: RunGroup) -> "Figure | None":
    """Completed (top) and SLO-meeting (bottom) requests per second over time, one line per run."""
    plt = _pyplot()
    runs = [r for r in group.runs if r.has_requests and r.has_times]
    if not runs:
        return None
    t0 = _time_origin(runs)
    end = max((float(np.nanmax(r.requests["finish_s"])) for r in runs if r.requests["finish_s"].notna().any()),
              default=t0 + 1.0)
    span = max(end - t0, 1e-3)
    width = _bin_width(span, min(int(r.requests["finish_s"].notna().sum()) for r in runs))
    edges = t0 + width * np.arange(int(math.ceil(span / width)) + 1)
    div, unit = _time_unit(span)
    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for k, run in enumerate(runs):
        f = run.requests
        done = f["finish_s"].notna()
        if "error" in f:
            done &= f["error"].isna()
        fin = f.loc[done, "finish_s"].to_numpy(dtype=float)
        good = f.loc[done & f["slo_met"].astype(bool), "finish_s"].to_numpy(dtype=float)
        centers = (edges[:-1] + edges[1:]) / 2
        for ax, vals in ((axes[0], fin), (axes[1], good)):
            counts, _ = np.histogram(vals, bins=edges)
            ax.plot((centers - t0) / div, counts / width, color=policy_color(run.policy), linestyle=run.style,
                    label=run.label, linewidth=_width(k, len(runs)), drawstyle="steps-mid")
    arr, _ = np.histogram(np.concatenate([r.requests["arrival_s"].to_numpy(dtype=float) for r in runs[:1]]),
                          bins=edges)
    centers = (edges[:-1] + edges[1:]) / 2
    axes[0].plot((centers - t0) / div, arr / width, color="black", linewidth=0.8, linestyle=":", label="arrivals")
    axes[0].set_ylabel("completed (req/s)")
    axes[1].set_ylabel("meeting their SLO (req/s)")
    axes[1].set_xlabel(f"time since the first arrival ({unit}); bins of {_fmt_s(width)}")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    axes[0].set_title(f"Throughput and goodput over time: {group.title}")
    handles, labels = _unique_handles(axes)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    _legend_below(fig, handles, labels)
    return fig


def _instances(run: Run) -> list[tuple[int, str, str | None]]:
    """(instance_id, name, model loaded at start) per instance, from the run's scenario when known."""
    out: list[tuple[int, str, str | None]] = []
    spec = (run.scenario or {}).get("cluster", {}).get("instances") if run.scenario else None
    if isinstance(spec, list):
        for inst in spec:
            if not isinstance(inst, dict):
                continue
            count = int(inst.get("count") or 1)
            for j in range(count):
                base = inst.get("name") or f"{str(inst.get('gpu', 'gpu')).lower()}-{len(out)}"
                out.append((len(out), base if count == 1 else f"{base}-{j}", inst.get("model")))
    ids = set(run.requests["instance_id"].dropna().astype(int).tolist()) if "instance_id" in run.requests else set()
    if run.timeline is not None:
        ids |= set(int(i) for i in run.timeline["instance_id"].unique() if int(i) >= 0)
    for iid in sorted(ids):
        if iid >= len(out):
            out.extend((k, f"instance-{k}", None) for k in range(len(out), iid + 1))
    return out


def _running_counts(starts: np.ndarray, ends: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Number of [start, end) intervals covering each grid time."""
    s = np.sort(starts)
    e = np.sort(ends)
    return np.searchsorted(s, grid, side="right") - np.searchsorted(e, grid, side="right")


def fig_timeline(run: Run, title: str = "") -> "Figure":
    """Per instance: requests running by SLO class (stacked), model loaded, swaps and evictions."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    f = run.requests
    classes = _classes([run])
    colors = _class_colors(classes)
    insts = _instances(run)[:_MAX_TIMELINE_INSTANCES]
    t0 = float(f["arrival_s"].min()) if len(f) else 0.0
    end = float(np.nanmax(f["finish_s"])) if f["finish_s"].notna().any() else t0 + 1.0
    span = max(end - t0, 1e-3)
    div, unit = _time_unit(span)
    grid = np.linspace(t0, end, _GRID_POINTS)
    tl = run.timeline if run.timeline is not None else pd.DataFrame(columns=["time_s", "kind", "instance_id",
                                                                           "model", "slo_class", "value"])
    models_seen: list[str] = []
    for _, _, m in insts:
        if m and m not in models_seen:
            models_seen.append(m)
    for m in list(f["model"].unique()) + list(tl.loc[tl["kind"] == "swap", "model"].unique()):
        if m and m not in models_seen:
            models_seen.append(str(m))
    model_colors = {m: _MODEL_COLORS[i % len(_MODEL_COLORS)] for i, m in enumerate(models_seen)}

    n = max(1, len(insts))
    fig, axes = plt.subplots(n, 1, figsize=(10, 1.7 * n + 1.6), sharex=True, squeeze=False)
    started = f["dispatch_s"].notna() & f["finish_s"].notna()
    drawn: set[str] = set()
    inferred = False
    for row, (iid, name, model0) in enumerate(insts):
        ax = axes[row][0]
        mine = f[started & (f["instance_id"] == iid)]
        # Model loaded over time: background spans between swaps; the swap itself in grey.
        swaps = tl[(tl["kind"] == "swap") & (tl["instance_id"] == iid)].sort_values("time_s")
        label_swaps = len(swaps) <= _MAX_SWAP_LABELS
        t, model = t0, model0

        def loaded(a: float, b: float, m: str | None, ax: "Axes" = ax) -> None:
            if m:  # a pale background, and a strip of full colour along the top
                c = model_colors.get(m, "#d9d9d9")
                ax.axvspan((a - t0) / div, (b - t0) / div, color=c, alpha=0.3, zorder=0, linewidth=0)
                ax.axvspan((a - t0) / div, (b - t0) / div, ymin=0.94, color=c, zorder=3, linewidth=0)
                drawn.add(m)

        if model0 is None and swaps.empty and len(mine):
            # No record of swaps or of the model at start (e.g. a live run without a timeline):
            # infer the model from the requests the instance ran, in dispatch order.
            inferred = True
            seq = mine.sort_values("dispatch_s")
            ms, ts = seq["model"].astype(str).to_numpy(), seq["dispatch_s"].to_numpy(float)
            cut = np.flatnonzero(ms[1:] != ms[:-1]) + 1
            starts = np.concatenate(([0], cut))
            for k, i0 in enumerate(starts):
                t_end = ts[starts[k + 1]] if k + 1 < len(starts) else end
                loaded(ts[i0] if k else t0, t_end, ms[i0])
            model = None
        for _, sw in swaps.iterrows():
            ts, dur = float(sw["time_s"]), float(sw["value"])
            loaded(t, ts, model)
            ax.axvspan((ts - t0) / div, (ts + dur - t0) / div, facecolor="#bdbdbd", edgecolor="#808080",
                       zorder=0, hatch="///", linewidth=0)
            if label_swaps:
                ax.annotate(f"→ {sw['model']}", ((ts - t0) / div, 0.93), xycoords=("data", "axes fraction"),
                            fontsize=6.5, rotation=90, va="top", ha="right", color="#404040")
            t, model = ts + dur, str(sw["model"])
        loaded(t, end, model)
        # Requests running here, per class (the interval of a request that was evicted and moved is
        # drawn on the instance that finished it: an approximation).
        stacks = []
        for cls in classes:
            sub = mine[mine["slo_class"] == cls]
            stacks.append(_running_counts(sub["dispatch_s"].to_numpy(float), sub["finish_s"].to_numpy(float), grid))
        if stacks:
            ax.stackplot((grid - t0) / div, *stacks, colors=[colors[c] for c in classes], alpha=0.85,
                         labels=classes, zorder=2, linewidth=0)
        peak = max(1.0, float(np.sum(stacks, axis=0).max()) if stacks else 0.0)
        ev = tl[(tl["kind"] == "evict") & (tl["instance_id"] == iid)]
        if len(ev):
            ax.plot((ev["time_s"].to_numpy(float) - t0) / div, np.full(len(ev), peak * 1.03), "|",
                    color="#b30000", markersize=7, zorder=3, label="eviction")
        ax.set_ylabel(f"{name}\nrunning", fontsize=8)
        ax.set_ylim(0, peak * 1.12)  # headroom: the model strip sits above the data
        ax.margins(x=0)
        ax.grid(alpha=0.25, zorder=1)
    axes[-1][0].set_xlabel(f"time since the first arrival ({unit})")
    extra = "" if len(_instances(run)) <= _MAX_TIMELINE_INSTANCES else f" (first {_MAX_TIMELINE_INSTANCES} instances)"
    if inferred:
        extra += "\n(no swap record: the model loaded is inferred from the requests each instance ran)"
    fig.suptitle(f"Instance timeline, {run.label}{': ' + title if title else ''}{extra}")
    handles = [Patch(color=colors[c], label=f"running: {c}") for c in classes]
    handles += [Patch(color=model_colors[m], label=f"model loaded: {m}") for m in models_seen if m in drawn]
    if (tl["kind"] == "swap").any():
        handles.append(Patch(facecolor="#bdbdbd", edgecolor="#808080", hatch="///", label="swapping (loading)"))
    if (tl["kind"] == "evict").any():
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], color="#b30000", marker="|", linestyle="", markersize=8, label="eviction"))
    fig.tight_layout(rect=(0, 0.05 + 0.02 * (len(handles) > 5), 1, 1))
    _legend_below(fig, handles, [h.get_label() for h in handles], ncol=min(len(handles), 4))
    return fig


# --- across rates ---------------------------------------------------------------------------------


def fig_attainment_vs_rate(scenario: str, runs: Sequence[Run]) -> "Figure":
    """SLO attainment (overall, per class) and goodput against the offered rate, one line per policy."""
    plt = _pyplot()
    classes = _classes(runs)
    panels = ["all", *classes, "goodput"]
    ncol = min(len(panels), 3)
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol + 0.4, 3.2 * nrow + 0.9), squeeze=False, sharex=True)
    by_label: dict[str, list[Run]] = {}
    for r in runs:
        by_label.setdefault(r.label or policy_label(r.policy), []).append(r)
    for k, panel in enumerate(panels):
        ax = axes[k // ncol][k % ncol]
        for i, (label, rs) in enumerate(by_label.items()):
            rs = sorted((r for r in rs if r.rate is not None), key=lambda r: r.rate)  # type: ignore[arg-type]
            xs = [r.rate for r in rs]
            if panel == "all":
                ys = [_pct(r.summary.get("slo_attainment")) for r in rs]
            elif panel == "goodput":
                ys = [r.summary.get("request_goodput") or 0.0 for r in rs]
            else:
                ys = [_pct((r.summary.get("slo_attainment_by_class") or {}).get(panel)) for r in rs]
            ax.plot(xs, ys, marker="o", markersize=3.5, color=policy_color(rs[0].policy) if rs else None,
                    linestyle=rs[0].style if rs else "-", label=label, linewidth=_width(i, len(by_label)))
        if panel == "goodput":
            xs_all = sorted({r.rate for r in runs if r.rate is not None})
            ax.plot(xs_all, xs_all, color="black", linestyle=":", linewidth=0.8, label="offered rate")
            ax.set_ylabel("goodput (req/s meeting SLO)")
            ax.set_title("goodput", fontsize=10)
        else:
            ax.set_ylim(-3, 103)
            ax.set_ylabel("SLO attainment (%)")
            ax.set_title("all requests" if panel == "all" else _class_title(panel, runs), fontsize=10)
        ax.grid(alpha=0.3)
    for k in range(len(panels), nrow * ncol):
        axes[k // ncol][k % ncol].set_visible(False)
    for k in range(len(panels)):
        if k + ncol >= len(panels):
            ax = axes[k // ncol][k % ncol]
            ax.set_xlabel("offered load (req/s)")
            ax.xaxis.set_tick_params(labelbottom=True)
    fig.suptitle(f"SLO attainment and goodput against offered load: {scenario}")
    handles, labels = _unique_handles(axes)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    _legend_below(fig, handles, labels)
    return fig


def _pct(x: Any) -> float:
    return float("nan") if x is None else 100.0 * float(x)


# --- driver ---------------------------------------------------------------------------------------


PNG_DPI = 100


def _save(fig: "Figure", out_dir: Path, stem: str, formats: Sequence[str]) -> list[Path]:
    plt = _pyplot()
    written = []
    for fmt in formats:
        path = out_dir / f"{stem}.{fmt}"
        if fmt == "png":
            _save_png(fig, path)
        else:
            fig.savefig(path, bbox_inches="tight", metadata=_metadata(fmt))
        written.append(path)
    plt.close(fig)
    return written


def _save_png(fig: "Figure", path: Path) -> None:
    # 100 dpi and a 256-colour palette: the repository's docs/figures hold ~95 of these, regenerated with every
    # evaluation, and travel with the tree to the GPU host (a 64 MiB limit). Line plots lose nothing visible;
    # the files are a third of full-colour ones.
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PNG_DPI, bbox_inches="tight", metadata=_metadata("png"))
    buf.seek(0)
    with Image.open(buf) as im:
        im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def _metadata(fmt: str) -> dict[str, Any] | None:
    # No creation dates: the same results give byte-identical SVGs (and stable diffs in docs/).
    if fmt == "svg":
        return {"Date": None}
    if fmt == "png":
        return {"Software": None}
    return None


@dataclass(slots=True)
class FigureJob:
    """One figure to draw: its file stem, how to draw it, and the runs it reads."""

    stem: str
    draw: Callable[[], "Figure | None"]
    runs: list[Run]


def plan_figures(
    groups: Sequence[RunGroup],
    figures: Sequence[str] = FIGURES,
    timeline_policies: Sequence[str] | None = None,
    prefix: bool | None = None,
) -> list[FigureJob]:
    """Every figure to write for `groups`, in group order (rate sweeps last).

    Stems carry the group's slug when `prefix` is True, or (None) when there are several groups.
    `timeline_policies` limits the per-run timelines to those policies (None: every run).
    """
    jobs: list[FigureJob] = []
    several = len(groups) > 1 if prefix is None else prefix
    per_group = {
        "slo_attainment": fig_slo_attainment,
        "latency_cdf": fig_latency_cdf,
        "queue_depth": fig_queue_depth,
        "throughput": fig_throughput,
    }
    for g in groups:
        pre = f"{g.slug}-" if several else ""
        for name, fn in per_group.items():
            if name in figures:
                jobs.append(FigureJob(f"{pre}{name}", lambda g=g, fn=fn: fn(g), g.runs))
        if "timeline" in figures:
            for run in g.runs:
                if timeline_policies is not None and run.policy not in timeline_policies:
                    continue
                if run.external is not None:
                    continue  # no instances in a vllm bench serve result
                jobs.append(FigureJob(f"{pre}timeline-{_slug(run.label)}",
                                      lambda run=run, g=g: fig_timeline(run, g.title), [run]))
    if "attainment_vs_rate" in figures:
        by_scenario: dict[str, list[Run]] = {}
        for g in groups:
            if g.rate is not None:
                by_scenario.setdefault(g.scenario, []).extend(g.runs)
        for sc, runs in by_scenario.items():
            if len({r.rate for r in runs}) >= 2:
                jobs.append(FigureJob(f"{_slug(sc)}-attainment_vs_rate",
                                      lambda sc=sc, runs=runs: fig_attainment_vs_rate(sc, runs), runs))
    return jobs


def draw_figures(
    jobs: Sequence[FigureJob],
    out_dir: Path,
    formats: Sequence[str] = FORMATS,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Draw and save `jobs` into `out_dir`; frames a run no later job needs are released as it goes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    last_use: dict[int, int] = {}
    for k, job in enumerate(jobs):
        for r in job.runs:
            last_use[id(r)] = k
    written: list[Path] = []
    for k, job in enumerate(jobs):
        fig = job.draw()
        if fig is not None:
            written.extend(_save(fig, out_dir, job.stem, formats))
        for r in job.runs:
            if last_use[id(r)] == k:
                r.release()
        if progress is not None:
            progress(k + 1, len(jobs))
    return written


def check_choices(figures: Sequence[str], formats: Sequence[str]) -> None:
    """Raise UserError for an unknown figure or format."""
    bad = [f for f in figures if f not in FIGURES]
    if bad:
        raise UserError(f"unknown figure '{bad[0]}'; choose from {', '.join(FIGURES)}", field="figures")
    bad = [f for f in formats if f not in ("png", "svg", "pdf")]
    if bad:
        raise UserError(f"unknown format '{bad[0]}'; choose from png, svg, pdf", field="formats")


def plot_results(
    paths: Sequence[Path],
    out_dir: Path,
    formats: Sequence[str] = FORMATS,
    figures: Sequence[str] = FIGURES,
    progress: Callable[[int, int], None] | None = None,
    timeline_policies: Sequence[str] | None = None,
    mixed: bool = False,
    notes: list[str] | None = None,
) -> list[Path]:
    """Draw the figures for the results under `paths` (results folders, vllm bench serve result files) into
    `out_dir`; return the files written. Runs of different workloads get figures of their own unless `mixed`;
    what the grouping did is appended to `notes`.

    Raises:
        UserError: no results under a path, an unreadable results folder, or an unknown figure/format.
    """
    check_choices(figures, formats)
    groups = group_runs(load_runs(paths), mixed=mixed)
    if notes is not None:
        notes.extend(grouping_notes(groups))
    return draw_figures(plan_figures(groups, figures, timeline_policies), out_dir, formats, progress)
