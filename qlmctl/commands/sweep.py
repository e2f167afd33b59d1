"""`qlmctl sweep SWEEP.yaml`: capacity-planning sweeps over scenarios, policies, fleets, rates and seeds."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from qlmctl.commands.common import RAY_ADDRESS_HELP, console, err_console, fail
from qlmctl.errors import UserError

if TYPE_CHECKING:
    from rich.console import Console

    from qlmctl.sweep import SweepPlan, SweepResult


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep)


def sweep(
    sweep_file: Path = typer.Argument(..., help="Sweep YAML (see scenarios/sweeps/ and docs/sweep.md)."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Output folder; default `results/sweeps/<sweep name>`. Reused to resume."
    ),
    workers: Optional[int] = typer.Option(
        None, "--workers", "-j", min=1,
        help="Local worker processes (default: one per core); with --ray-address local, the CPUs Ray may use.",
    ),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help=RAY_ADDRESS_HELP),
    fresh: bool = typer.Option(False, "--fresh", help="Forget the results already in the output folder."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and count the points, run nothing."),
) -> None:
    """Run many simulations (one per point of a grid or list) and find the highest arrival rate
    (requests/s) each configuration sustains at the target SLO attainment, by bisection.

    Writes results.parquet and results.md (a row per point), capacity.parquet, and two figures.

    Rates are in requests/s, latencies in ms, attainment is the fraction of requests meeting their SLO.

    Finished points are appended to points.jsonl as they arrive: run the same command to resume.

    Exits 1 when a point failed after its retries (results.md names it with its error), 2 on bad input.
    """
    from qlmctl.sweep import ResultStore, build_plan, load_sweep, make_executor, run_sweep

    try:
        spec = load_sweep(sweep_file)
        plan = build_plan(spec, sweep_file)
    except UserError as e:
        fail(e)

    from rich.markup import escape

    for entry in plan.scenarios.values():
        for line in entry.scenario.engine_mismatches():
            console.print(f"[yellow]note:[/] {escape(entry.label)}: {escape(line)}", highlight=False)
    out_dir = out or Path("results") / "sweeps" / str(spec.name)
    store = ResultStore(out_dir)
    if fresh:
        store.reset()
    _print_plan(console, plan, store, out_dir)
    if dry_run:
        return
    if store.bad_lines:
        console.print(f"[yellow]note:[/] {store.bad_lines} unreadable line(s) in {store.path} (an interrupted "
                      f"write?); their points run again", highlight=False)

    try:
        executor = make_executor(ray_address, workers)
    except UserError as e:
        fail(e)
    console.print(f"running on {executor.where}", highlight=False)
    try:
        with executor, _ProgressReporter(console, plan) as reporter:
            result = run_sweep(plan, executor, store, reporter)
    except KeyboardInterrupt:
        err_console.print(f"interrupted: {len(store)} finished point(s) are kept in {store.path}; run the same "
                          f"command again to resume", highlight=False)
        raise typer.Exit(130)

    _write_outputs(console, result, out_dir)
    if result.failed:
        err_console.print(f"[bold red]{len(result.failed)} point(s) failed[/] after their retries; see "
                          f"{out_dir / 'results.md'}", highlight=False)
        raise typer.Exit(1)


def _print_plan(console: "Console", plan: "SweepPlan", store, out_dir: Path) -> None:
    spec = plan.spec
    line = f"sweep [bold]{spec.name}[/]: {len(plan.points)} point(s)"
    if plan.configurations:
        line += (f", {len(plan.configurations)} configuration(s) to bisect for "
                 f"{100 * spec.target_attainment:g}% attainment (at most {plan.max_probes()} probes)")
    if len(store):
        done = sum(1 for p in plan.points if store.done(p.key) is not None)
        line += f"; {len(store)} earlier result(s) in {out_dir} ({done} of the listed points)"
    console.print(line, highlight=False)


class _ProgressReporter:
    """A rich progress bar of points (its total grows as searches ask for probes) and searches."""

    def __init__(self, console: "Console", plan: "SweepPlan") -> None:
        from rich.markup import escape
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from qlmctl.sweep import SweepReporter

        self.progress = Progress(TextColumn("{task.description:>9}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[note]}"), TimeElapsedColumn(), console=console)
        self.points = self.progress.add_task("points", total=0, note="")
        self.searches = (self.progress.add_task("searches", total=len(plan.configurations), note="")
                         if plan.configurations else None)
        self.asked_n = self.done_n = self.cached_n = self.failed_n = 0

        outer = self

        class Hooks(SweepReporter):
            def asked(self, point, is_probe):  # type: ignore[override]
                outer.asked_n += 1
                outer.progress.update(outer.points, total=outer.asked_n)

            def point_done(self, point, record, is_probe):  # type: ignore[override]
                outer.done_n += 1
                outer.cached_n += record.cached
                outer._advance()

            def point_failed(self, point, outcome, attempt, max_attempts):  # type: ignore[override]
                final = attempt >= max_attempts
                then = "giving up" if final else "retrying"
                outer.progress.console.print(
                    f"[red]point failed[/] (attempt {attempt}/{max_attempts}, {then}): {escape(point.describe())}\n"
                    f"  {escape(str(outcome.error))}  [dim](worker {escape(outcome.worker)})[/]",
                    highlight=False, soft_wrap=True)
                if final:
                    outer.failed_n += 1
                    outer._advance()

            def capacity_done(self, config, search):  # type: ignore[override]
                if outer.searches is not None:
                    outer.progress.advance(outer.searches)

        self.hooks = Hooks()

    def _advance(self) -> None:
        note = []
        if self.cached_n:
            note.append(f"{self.cached_n} cached")
        if self.failed_n:
            note.append(f"[red]{self.failed_n} failed[/]")
        self.progress.update(self.points, completed=self.done_n + self.failed_n, note=", ".join(note))

    def __enter__(self):
        self.progress.__enter__()
        return self.hooks

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)


def _write_outputs(console: "Console", result: "SweepResult", out_dir: Path) -> None:
    import yaml

    from qlmctl.sweep.figures import write_figures
    from qlmctl.sweep.tables import capacity_frame, results_frame, write_tables

    spec = result.plan.spec
    written = write_tables(result, out_dir)
    (out_dir / "sweep.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    points = results_frame(result)
    capacity = capacity_frame(result) if result.searches else None
    figures, notes = write_figures(points, capacity, spec.target_attainment, list(spec.policies), out_dir)
    from qlmctl.sweep.tables import measuring

    console.print(f"[dim]{measuring(spec)}[/]", highlight=False)
    if capacity is not None:
        console.print(_capacity_table(capacity, spec))
    if (points["phase"] == "grid").any():
        console.print(_attainment_table(points, spec))
        if (points["steady"] == False).any():  # noqa: E712 - a nullable boolean column
            console.print(f"[dim]†: not steady (completed less than {100 * spec.min_throughput_ratio:g} % of the "
                          f"offered rate over the measured window): cannot hold the target[/]", highlight=False)
    for note in notes:
        console.print(f"[dim]{note}[/]", highlight=False)
    names = [p.name for p in [*written.values(), *figures]]
    console.print(f"{result.ran} run now, {result.cached} from earlier runs; results in [bold]{out_dir}[/] "
                  f"({', '.join(names)})", highlight=False)


def _capacity_table(capacity, spec):
    """Rows: (scenario, fleet); columns: policies; cells: mean max rate over seeds (req/s)."""
    from rich import box
    from rich.table import Table

    table = Table(title=f"Highest rate (req/s) holding {100 * spec.target_attainment:g}% SLO attainment in a steady "
                        f"state",
                  box=box.SIMPLE_HEAD, title_style="bold")
    table.add_column("scenario")
    table.add_column("fleet")
    for p in spec.policies:
        table.add_column(p, justify="right")
    groups = list(dict.fromkeys(zip(capacity["scenario"], capacity["gpus"])))
    for scenario, gpus in groups:
        cells = []
        for p in spec.policies:
            rows = capacity[(capacity["scenario"] == scenario) & (capacity["gpus"] == gpus) & (capacity["policy"] == p)]
            cells.append(_capacity_cell(rows))
        table.add_row(scenario, gpus, *cells)
    return table


def _capacity_cell(rows) -> str:
    if rows.empty:
        return "–"
    if (rows["status"] == "failed").any():
        return "[red]failed[/]"
    rates = rows["max_rate_rps"].dropna()
    if rates.empty:
        return f"< {rows['upper_rate_rps'].min():g}"
    text = f"{rates.mean():.3g}"
    if len(rates) > 1:
        text += f" ({rates.min():.3g}–{rates.max():.3g})"
    if (rows["status"] == "above_max").any():
        text = "≥ " + text
    return text


def _attainment_table(points, spec):
    """Rows: (scenario, fleet, policy); columns: grid rates; cells: mean attainment over seeds."""
    from rich import box
    from rich.table import Table

    grid = points[points["phase"] == "grid"]
    rates = sorted(grid["rate_rps"].unique())[:12]
    table = Table(title="SLO attainment by arrival rate (req/s), mean over seeds", box=box.SIMPLE_HEAD,
                  title_style="bold")
    for name in ("scenario", "fleet", "policy"):
        table.add_column(name)
    for r in rates:
        table.add_column(f"{r:g}", justify="right")
    keys = list(dict.fromkeys(zip(grid["scenario"], grid["gpus"], grid["policy"])))
    for scenario, gpus, policy in keys:
        mine = grid[(grid["scenario"] == scenario) & (grid["gpus"] == gpus) & (grid["policy"] == policy)]
        cells = []
        for r in rates:
            at = mine[mine["rate_rps"] == r]
            if at.empty:
                cells.append("–")
            elif (at["status"] != "ok").any():
                cells.append("[red]failed[/]")
            else:
                v = at["slo_attainment"].mean()
                steady = bool(at["steady"].fillna(True).all())
                style = "green" if v >= spec.target_attainment and steady else "red"
                cells.append(f"[{style}]{100 * v:.1f}%{'' if steady else '†'}[/]")
        table.add_row(scenario, gpus, policy, *cells)
    return table
