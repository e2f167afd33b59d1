"""`qlmctl compare`: the results table of runs side by side, qlmctl's and vllm bench serve's alike."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from qlmctl.commands.common import console, fail


def compare(
    results: list[Path] = typer.Argument(..., help="Results folders (of simulate, replay, serve --replay, evaluate) and "
                                                   "vllm bench serve result files, in any mix."),
    metric_percentiles: Optional[str] = typer.Option(None, "--metric-percentiles", help="Show these latency "
                                                     "percentiles (e.g. 50,90,99), as vLLM's --metric-percentiles."),
) -> None:
    """Print the results table of runs side by side: one column per run (qlmctl's own and vllm bench serve's),
    the same rows as simulate prints. Runs of different workloads or rates are flagged."""
    from qlmctl.errors import UserError
    from qlmctl.plots import group_runs, load_runs
    from qlmctl.report import print_results

    try:
        runs = load_runs(results)
        pcts = None
        if metric_percentiles:
            from qlmctl.vllm_bench import BenchOptions

            pcts = BenchOptions.parse(metric_percentiles=metric_percentiles).percentiles
    except UserError as e:
        fail(e)
    groups = group_runs(runs, mixed=True)
    columns: dict[str, dict] = {}
    for run in groups[0].runs:
        name = run.label or run.policy
        k = 2
        while name in columns:
            name, k = f"{run.label} #{k}", k + 1
        columns[name] = run.summary
    print_results(console, columns, groups[0].title, percentiles=pcts)
    apart = group_runs(runs)
    if len(apart) > 1:
        what = "; ".join(f"{g.title}: {', '.join(r.label for r in g.runs)}" for g in apart)
        console.print(f"[yellow]note:[/] these runs are not of one workload (scenario, rate, requests): "
                      f"{escape(what)}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("compare")(compare)
