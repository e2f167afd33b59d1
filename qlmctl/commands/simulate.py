"""`qlmctl simulate`: replay a trace through simulated vLLM instances under each policy."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from rich.markup import escape

from qlmctl.commands.common import console, fail, workload_overrides
from qlmctl.errors import UserError


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
    from qlmctl.policies import parse_policy_list
    from qlmctl.runner import save, simulate as run_sim
    from qlmctl.scenario import load_scenario
    from qlmctl.workload import build_requests

    try:
        sc = load_scenario(scenario, workload_overrides(trace, fmt, max_requests, rate, seed))
        policies = parse_policy_list(policy or sc.spec.scheduler.policy)
        requests, report = build_requests(sc)
    except UserError as e:
        fail(e)
    for line in report.lines() + sc.engine_notes():
        console.print(f"[dim]{line}[/]", highlight=False)
    for line in sc.engine_mismatches():
        console.print(f"[yellow]note:[/] {escape(line)}", highlight=False)
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


def register(app: typer.Typer) -> None:
    app.command()(simulate)
