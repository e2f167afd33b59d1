"""`qlmctl evaluate`: every scenario x policy x offered rate in parallel; markdown tables and figures."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from qlmctl.commands.common import RAY_ADDRESS_HELP, console, fail, split_list
from qlmctl.errors import UserError
from qlmctl.scenario import REPO_ROOT


def _rates(text: str | None) -> list[float | None] | None:
    items = split_list(text)
    if items is None:
        return None
    out: list[float | None] = []
    for x in items:
        if x in ("native", "own"):
            out.append(None)
            continue
        try:
            v = float(x)
        except ValueError:
            raise UserError(f"bad rate '{x}': give numbers (req/s) or 'native'", field="rates") from None
        if not v > 0:
            raise UserError(f"bad rate '{x}': must be > 0 req/s", field="rates")
        out.append(v)
    return out


def register(app: typer.Typer) -> None:
    @app.command()
    def evaluate(
        scenarios: Optional[str] = typer.Option(
            None, "--scenarios", "-s",
            help="Comma-separated suite scenarios (w_a, w_b, w_c, azure_conv, burstgpt, mooncake; default all) "
            "or scenario YAML files (run at their own rate unless --rates is given).",
        ),
        policies: Optional[str] = typer.Option(
            None, "--policies", "-p", help="Comma-separated policies; default: every registered policy."
        ),
        rates: Optional[str] = typer.Option(
            None, "--rates",
            help="Comma-separated offered rates in requests/s for every chosen scenario ('native': a trace at "
            "its own pace); default: each scenario's own list (see qlmctl/evaluation.py SUITE).",
        ),
        jobs: Optional[int] = typer.Option(
            None, "--jobs", "-j", min=1,
            help="Simulations run at once, one process each; default: all cores. With --ray-address local, the "
            "CPUs Ray may use.",
        ),
        ray_address: Optional[str] = typer.Option(None, "--ray-address", help=RAY_ADDRESS_HELP),
        out: Optional[Path] = typer.Option(
            None, "--out", "-o",
            help="Folder for evaluation.md and figures/ (or a .md path: figures/ goes beside it); default: a new "
            "`results/evaluate-<date-time>/`. `--out docs` regenerates the repository's docs/evaluation.md: "
            "hand-written text around the generated block of an existing evaluation.md is kept.",
        ),
        runs_dir: Optional[Path] = typer.Option(
            None, "--runs-dir",
            help="Where each simulation's results folder goes: `<runs-dir>/<scenario>/rate-<R>/<policy>`; default: "
            "runs/ beside evaluation.md (results/eval with --out docs).",
        ),
        quick: bool = typer.Option(
            False, "--quick", help="A small version: two rates per scenario, a tenth of the time span, short traces."
        ),
        no_figures: bool = typer.Option(False, "--no-figures", help="Write the tables only."),
        formats: str = typer.Option(
            "png", "--format", help="Figure formats, comma-separated: png, svg, pdf (`qlmctl plot` redraws any run)."
        ),
    ) -> None:
        """Run every scenario against every policy at several offered loads (req/s), in parallel, and write
        a markdown report (SLO attainment overall and per class in %, goodput and throughput in req/s,
        swaps, evictions) and its figures.

        Simulated time is in seconds; the report's rates are offered request rates (req/s).
        """
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from qlmctl.evaluation import (
            Evaluation,
            markdown_report,
            plan_points,
            resolve_scenarios,
            run_points,
            write_figures,
            write_report,
        )
        from qlmctl.plots import check_choices
        from qlmctl.policies import policy_class, policy_names
        from qlmctl.sweep import make_executor

        if out is None:
            import datetime as dt

            stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            out = Path("results") / f"evaluate-{stamp}"
            k = 1
            while out.exists():
                k += 1
                out = Path("results") / f"evaluate-{stamp}-{k}"
        md_path = out if out.suffix == ".md" else out / "evaluation.md"
        figures_dir = md_path.parent / "figures"
        if runs_dir is None:
            in_repo = md_path.resolve().parent == (REPO_ROOT / "docs").resolve()
            runs_dir = Path("results/eval") if in_repo else md_path.parent / "runs"
        fmts = split_list(formats) or ["png"]
        try:
            check_choices([], fmts)
            chosen = resolve_scenarios(split_list(scenarios), quick)
            names = policy_names() if policies is None else split_list(policies) or []
            for n in names:
                policy_class(n)  # a UserError naming the choices
            rate_list = _rates(rates)
            points = plan_points(chosen, names, runs_dir, rate_list, quick)
            executor = make_executor(ray_address, jobs)
        except UserError as e:
            fail(e)
        ev = Evaluation(chosen, names, ran_on=executor.where)
        from rich.markup import escape

        from qlmctl.scenario import load_scenario

        for sc in chosen:
            for line in load_scenario(sc.path).engine_mismatches():
                console.print(f"[yellow]note:[/] {escape(sc.key)}: {escape(line)}", highlight=False)
        console.print(
            f"{len(points)} simulations: {len(chosen)} scenario(s) x {len(names)} policies x their rates, on "
            f"{executor.where}; results in [bold]{runs_dir}[/]", highlight=False,
        )
        t0 = time.perf_counter()
        with executor, Progress(TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=console) as prog:
            task = prog.add_task("simulating", total=len(points))

            def done(r) -> None:
                rate = "own pace" if r.point.rate is None else f"{r.point.rate:g} req/s"
                prog.update(task, advance=1, description=f"{r.point.scenario} {rate} {r.point.policy}")
                if r.error:
                    prog.console.print(f"[red]failed[/] {r.point.scenario} {rate} {r.point.policy}: "
                                       f"{r.error.splitlines()[0]}", highlight=False)

            ev.results = run_points(points, executor, done)
        ev.sim_wall_s = time.perf_counter() - t0
        stems: dict[str, list[str]] = {}
        if not no_figures:
            with Progress(TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=console) as prog:
                task = prog.add_task("drawing figures", total=None)
                stems = write_figures(ev, figures_dir, fmts,
                                      lambda k, n: prog.update(task, completed=k, total=n))
        command = "qlmctl evaluate " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 1 \
            else "qlmctl evaluate"
        rel = figures_dir.relative_to(md_path.parent).as_posix()
        ev.wall_s = time.perf_counter() - t0  # the whole run: simulations and figures
        write_report(md_path, markdown_report(ev, command.strip(), stems, rel))
        _print_overview(console, ev)
        console.print(f"report: [bold]{md_path}[/]; figures: [bold]{figures_dir}[/] "
                      f"({sum(len(v) for v in stems.values())}); runs in [bold]{runs_dir}[/]; {ev.wall_s:,.0f} s "
                      f"({ev.sim_wall_s:,.0f} s simulating, {ev.wall_s - ev.sim_wall_s:,.0f} s drawing)",
                      highlight=False)
        if ev.failed:
            raise typer.Exit(1)


def _print_overview(console, ev) -> None:  # noqa: ANN001 - rich Console, Evaluation
    from rich import box
    from rich.table import Table

    table = Table(title="SLO attainment (%) by scenario and offered rate (req/s)", box=box.SIMPLE_HEAD)
    table.add_column("scenario @ rate")
    for p in ev.policies:
        table.add_column(p, justify="right")
    rows: dict[tuple[str, float | None], dict[str, str]] = {}
    for r in ev.results:
        key = (r.point.scenario, r.point.rate)
        cell = "failed" if r.summary is None else f"{100 * (r.summary.get('slo_attainment') or 0):.1f}"
        rows.setdefault(key, {})[r.point.policy] = cell
    order = {s.key: i for i, s in enumerate(ev.scenarios)}
    for (sc, rate), cells in sorted(rows.items(), key=lambda kv: (order.get(kv[0][0], 0),
                                                                  -1.0 if kv[0][1] is None else kv[0][1])):
        table.add_row(f"{sc} @ {'own pace' if rate is None else f'{rate:g}'}", *[cells.get(p, "–") for p in ev.policies])
    console.print(table)
