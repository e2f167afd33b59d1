"""The `qlmctl` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from qlmctl.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="SLO-oriented queue management (QLM) for LLM serving: simulate, serve, profile, plot.",
    pretty_exceptions_enable=False,
)
console = Console()
if not console.is_terminal:
    console = Console(width=max(console.width, 110))
err_console = Console(stderr=True)


def _fail(e: UserError) -> None:
    err_console.print(f"[bold red]error:[/] {e.one_line()}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _overrides(trace: Path | None, fmt: str | None, max_requests: int | None, rate: float | None,
               seed: int | None) -> dict:
    over: dict = {}
    wl: dict = {}
    if trace is not None:
        wl.update({"trace": str(trace.resolve()), "synthetic": None})
    if fmt is not None:
        wl["format"] = fmt
    if max_requests is not None:
        wl["max_requests"] = max_requests
    if rate is not None:
        wl.update({"target_rate_rps": rate, "time_scale": 1.0})
    if wl:
        over["workload"] = wl
    if seed is not None:
        over["seed"] = seed
    return over


@app.command()
def simulate(
    trace: Optional[Path] = typer.Argument(None, help="Trace file to replay (CSV or JSONL); default: the scenario's."),
    scenario: Optional[Path] = typer.Option(None, "--scenario", "-s", help="Scenario YAML; default: scenarios/default.yaml."),
    policy: Optional[str] = typer.Option(None, "--policy", "-p", help="Comma-separated policies, e.g. fcfs,edf,qlm."),
    fmt: Optional[str] = typer.Option(None, "--format", help="Trace format: auto, qlmctl, azure, burstgpt, mooncake, vidur."),
    max_requests: Optional[int] = typer.Option(None, "--max-requests", "-n", min=1, help="Replay at most this many requests."),
    rate: Optional[float] = typer.Option(None, "--rate", min=0.0, help="Rescale arrivals to this mean rate, requests/s."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for the workload's random choices."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder; default results/<scenario name>."),
) -> None:
    """Replay a trace through simulated vLLM instances under each policy and report SLO attainment.

    Times are in seconds of simulated time; latencies in the table are in ms or s as labelled.
    """
    from qlmctl.report import policy_progress, print_results
    from qlmctl.runner import parse_policies, save, simulate as run_sim
    from qlmctl.scenario import load_scenario
    from qlmctl.workload import build_requests

    try:
        sc = load_scenario(scenario, _overrides(trace, fmt, max_requests, rate, seed))
        policies = parse_policies(policy, sc)
        requests, report = build_requests(sc)
    except UserError as e:
        _fail(e)
    for line in report.lines():
        console.print(f"[dim]{line}[/]", highlight=False)
    n_inst = len(sc.instance_specs())
    console.print(
        f"scenario [bold]{sc.spec.name}[/]: {len(requests):,} requests over {report.duration_s:,.0f} s "
        f"({report.mean_rate_rps:.2f} req/s), {n_inst} instance(s), policies {', '.join(policies)}",
        highlight=False,
    )
    out_dir = out or Path("results") / sc.spec.name
    summaries = {}
    with policy_progress(console) as prog:
        for name in policies:
            task = prog.add_task(name, total=len(requests))
            run = run_sim(sc, name, requests, lambda done, total, t=task: prog.update(t, completed=done))
            prog.update(task, completed=len(requests))
            save(run, sc, out_dir)
            summaries[name] = run.summary
    print_results(console, summaries, f"{sc.spec.name}: simulated, {len(requests):,} requests, {n_inst} instance(s)")
    console.print(f"results in [bold]{out_dir}[/]", highlight=False)


@app.command("policies")
def list_policies() -> None:
    """List the scheduling policies."""
    from qlmctl.policies import policy_class, policy_names

    for n in policy_names():
        doc = (policy_class(n).__doc__ or "").strip().splitlines()
        console.print(f"[bold]{n}[/]  {doc[0] if doc else ''}", highlight=False)


def _register_commands() -> None:
    import importlib

    from qlmctl.commands import COMMAND_MODULES

    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue  # not built yet
            raise
        mod.register(app)


_register_commands()


def main() -> None:
    try:
        app()
    except UserError as e:
        err_console.print(f"[bold red]error:[/] {e.one_line()}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
