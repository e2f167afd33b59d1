"""The sweep's figures (matplotlib, Agg): attainment against rate, and the capacity per configuration.

- `attainment_vs_rate.png`: one panel per (scenario, fleet); per policy, SLO attainment (%)
  against the arrival rate (req/s): the mean over seeds as a line, the seeds' range shaded,
  bisection probes as faint markers, the target as a dashed line and each policy's capacity as
  a triangle on it.
- `max_rate.png`: the highest rate holding the target attainment, per (scenario, fleet) and
  policy: the mean over seeds as a bar, the seeds' range as an error bar; a hatched bar means
  the capacity is at least the bracket's top, a cross that it is below the bracket's bottom.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

ATTAINMENT_FIGURE = "attainment_vs_rate.png"
CAPACITY_FIGURE = "max_rate.png"
MAX_PANELS = 24
"""Panels drawn in the attainment figure; more (scenario, fleet) pairs are left out, and said so."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colours(policies: list[str]) -> dict[str, str]:
    from qlmctl.plots import policy_color

    return {p: policy_color(p) for p in policies}


def _panel_label(scenario: str, gpus: str) -> str:
    return f"{Path(scenario).stem} · {gpus}"


def plot_attainment(points: pd.DataFrame, capacity: pd.DataFrame | None, target: float,
                    policies: list[str], path: Path) -> list[str]:
    """Draw the attainment-vs-rate figure to `path`; return notes on what was left out."""
    plt = _pyplot()
    notes: list[str] = []
    ok = points[points["status"] == "ok"].copy()
    panels = list(dict.fromkeys(zip(ok["scenario"], ok["gpus"])))
    if len(panels) > MAX_PANELS:
        notes.append(f"{ATTAINMENT_FIGURE}: drew {MAX_PANELS} of {len(panels)} (scenario, fleet) panels")
        panels = panels[:MAX_PANELS]
    colours = _colours(policies)
    ncols = min(3, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (scenario, gpus) in zip(axes.flat, panels):
        here = ok[(ok["scenario"] == scenario) & (ok["gpus"] == gpus)]
        for policy in policies:
            mine = here[here["policy"] == policy]
            if mine.empty:
                continue
            colour = colours[policy]
            grid = mine[mine["phase"] == "grid"]
            line = grid if not grid.empty else mine
            stats = line.groupby("rate_rps")["slo_attainment"].agg(["mean", "min", "max"]).sort_index()
            ax.plot(stats.index, 100 * stats["mean"], marker="o", ms=3.5, lw=1.6, color=colour, label=policy)
            if "steady" in line:  # unsteady points (a growing backlog) cannot hold: drawn hollow
                bad = line[line["steady"] == False].groupby("rate_rps")["slo_attainment"].mean()  # noqa: E712
                if not bad.empty:
                    ax.scatter(bad.index, 100 * bad, s=42, facecolor="white", edgecolor=colour, lw=1.2, zorder=4)
            if line["seed"].nunique() > 1:
                ax.fill_between(stats.index, 100 * stats["min"], 100 * stats["max"], color=colour, alpha=0.15, lw=0)
            probes = mine[mine["phase"] == "bisect"]
            if not grid.empty and not probes.empty:
                ax.scatter(probes["rate_rps"], 100 * probes["slo_attainment"], s=14, marker="x", color=colour,
                           alpha=0.5, lw=0.9)
            if capacity is not None and not capacity.empty:
                cap = capacity[(capacity["scenario"] == scenario) & (capacity["gpus"] == gpus)
                               & (capacity["policy"] == policy)]["max_rate_rps"].dropna()
                if not cap.empty:
                    ax.scatter([cap.mean()], [100 * target], marker="v", s=60, color=colour, edgecolor="black",
                               lw=0.6, zorder=5)
        ax.axhline(100 * target, color="grey", ls="--", lw=1)
        ax.set_title(_panel_label(scenario, gpus), fontsize=10)
        ax.set_xlabel("arrival rate (req/s)")
        ax.set_ylabel("SLO attainment (%)")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    if panels:
        handles, labels = axes.flat[0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 6), frameon=False,
                       bbox_to_anchor=(0.5, 1.0))
    fig.suptitle(f"SLO attainment against arrival rate (target {100 * target:g}%, ▼ capacity, ○ not steady)", y=1.04,
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return notes


def plot_capacity(capacity: pd.DataFrame, target: float, policies: list[str], path: Path) -> None:
    """Draw the max-sustainable-rate bars to `path`."""
    plt = _pyplot()
    colours = _colours(policies)
    groups = list(dict.fromkeys(zip(capacity["scenario"], capacity["gpus"])))
    n = len(policies)
    width = 0.8 / max(1, n)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(groups) * max(1, n) * 0.6 + 2), 4.0))
    top = pd.concat([capacity["max_rate_rps"], capacity["upper_rate_rps"]]).max()
    for j, policy in enumerate(policies):
        for i, (scenario, gpus) in enumerate(groups):
            rows = capacity[(capacity["scenario"] == scenario) & (capacity["gpus"] == gpus)
                            & (capacity["policy"] == policy)]
            if rows.empty:
                continue
            x = i - 0.4 + width * (j + 0.5)
            rates = rows["max_rate_rps"].dropna()
            if rates.empty:  # below the bracket (or failed) for every seed
                marker = "x" if (rows["status"] == "below_min").any() else "?"
                ax.text(x, 0, marker, ha="center", va="bottom", color=colours[policy], fontsize=11, fontweight="bold")
                continue
            mean = rates.mean()
            above = (rows["status"] == "above_max").any()
            ax.bar(x, mean, width, color=colours[policy], hatch="//" if above else None, edgecolor="black", lw=0.5,
                   label=policy if i == 0 else None)
            if len(rates) > 1:
                ax.errorbar(x, mean, yerr=[[mean - rates.min()], [rates.max() - mean]], color="black", capsize=3,
                            lw=0.9)
            ax.text(x, mean, ("≥" if above else "") + f"{mean:.3g}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([_panel_label(s, g) for s, g in groups], rotation=20 if len(groups) > 4 else 0, ha="right"
                       if len(groups) > 4 else "center", fontsize=8)
    ax.set_ylabel("max arrival rate (req/s)")
    ax.set_title(f"Highest rate holding {100 * target:g}% SLO attainment (//: at least; x: below the bracket)",
                 fontsize=10)
    if not pd.isna(top) and top > 0:
        ax.set_ylim(0, 1.12 * top)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(frameon=False, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_figures(points: pd.DataFrame, capacity: pd.DataFrame | None, target: float, policies: list[str],
                  out_dir: Path) -> tuple[list[Path], list[str]]:
    """Both figures (the capacity one only with bisection results); their paths and notes."""
    written: list[Path] = []
    notes: list[str] = []
    if (points["status"] == "ok").any():
        notes += plot_attainment(points, capacity, target, policies, out_dir / ATTAINMENT_FIGURE)
        written.append(out_dir / ATTAINMENT_FIGURE)
    if capacity is not None and not capacity.empty:
        plot_capacity(capacity, target, policies, out_dir / CAPACITY_FIGURE)
        written.append(out_dir / CAPACITY_FIGURE)
    return written, notes
