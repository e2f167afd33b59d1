"""`qlmctl plot`: figures (PNG and SVG) from results folders of simulate, the live mode or evaluate."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from qlmctl.commands.common import console, fail, split_list


def register(app: typer.Typer) -> None:
    @app.command()
    def plot(
        results: list[Path] = typer.Argument(
            ...,
            help="Results folders: a policy folder (with summary.json), a folder of policy folders (as "
            "simulate writes), or any folder above them (e.g. an evaluate run); or vllm bench serve result "
            "files (--save-result JSON). Several may be given, e.g. a simulated and a live run of one trace: "
            "runs of one workload (scenario, rate, requests) share figures; a vllm result joins the runs of its "
            "rate and request count.",
        ),
        out: Optional[Path] = typer.Option(
            None, "--out", "-o", help="Folder for the figures; default: `<first RESULTS>/figures`."
        ),
        formats: str = typer.Option("png,svg", "--format", help="Comma-separated file formats: png, svg, pdf."),
        figures: Optional[str] = typer.Option(
            None,
            "--figures",
            help="Comma-separated figures to draw (default all): slo_attainment (%, by policy and SLO class), "
            "latency_cdf (TTFT and E2EL in s), queue_depth (requests over time), throughput (req/s over "
            "time), timeline (per instance: running requests, model, swaps, evictions), attainment_vs_rate "
            "(% and goodput in req/s against the offered rate, for runs that record target_rate_rps).",
        ),
        timeline_policies: Optional[str] = typer.Option(
            None, "--timeline-policies", help="Draw instance timelines only for these policies (comma-separated)."
        ),
        mixed: bool = typer.Option(
            False, "--mixed", help="Draw every run given in one set of figures, even runs of different workloads or "
            "rates (by default they are drawn apart, and said so)."
        ),
    ) -> None:
        """Draw figures from results folders: SLO attainment, latency CDFs, queue depth, throughput,
        instance timelines, and attainment against the offered rate (req/s) when runs span several rates.

        Times are in seconds since the first arrival (minutes or hours on long runs, as labelled).
        """
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from qlmctl.errors import UserError
        from qlmctl.plots import FIGURES, plot_results

        out_dir = out or (results[0] if results[0].is_dir() else results[0].parent) / "figures"
        notes: list[str] = []
        try:
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          console=console, transient=True) as prog:
                task = prog.add_task("drawing", total=None)
                written = plot_results(
                    results,
                    out_dir,
                    formats=split_list(formats) or ["png", "svg"],
                    figures=split_list(figures) or list(FIGURES),
                    progress=lambda done, total: prog.update(task, completed=done, total=total),
                    timeline_policies=split_list(timeline_policies),
                    mixed=mixed,
                    notes=notes,
                )
        except UserError as e:
            fail(e)
        for note in notes:
            console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
        stems = sorted({p.stem for p in written})
        console.print(f"wrote {len(written)} files ({len(stems)} figures) to [bold]{out_dir}[/]", highlight=False)
        for s in stems:
            console.print(f"  {s}", highlight=False)

