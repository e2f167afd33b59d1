"""`qlmctl simulate`: replay a trace through simulated vLLM instances under each policy."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

import simulator

from qlmctl.commands.common import (
    BURSTINESS_HELP,
    DURATION_HELP,
    FORCE_HELP,
    GOODPUT_HELP,
    METADATA_HELP,
    METRIC_PERCENTILES_HELP,
    PERCENTILE_METRICS_HELP,
    REQUEST_RATE_HELP,
    RESULT_DIR_HELP,
    RESULT_FILENAME_HELP,
    SAVE_DETAILED_HELP,
    SAVE_RESULT_HELP,
    console,
    fail,
    prepare_out,
    split_items,
    workload_overrides,
)
from qlmctl.errors import UserError

PURE_NOTE_REQUESTS = 100_000
"""From this many requests on, a run on the pure build says that a compiled one would be faster."""


def simulate(
    trace: Optional[Path] = typer.Argument(None, help="Trace file to replay (CSV or JSONL); default: the scenario's."),
    scenario: Optional[Path] = typer.Option(None, "--scenario", "-s", help="Scenario YAML; default: scenarios/default.yaml."),
    policy: Optional[str] = typer.Option(None, "--policy", "-p", help="Comma-separated policies, e.g. fcfs,edf,qlm."),
    fmt: Optional[str] = typer.Option(None, "--format", help="Trace format: auto, qlmctl, azure, burstgpt, mooncake, vidur."),
    max_requests: Optional[int] = typer.Option(None, "--num-prompts", "--max-requests", "-n", min=1, help="Replay at most this many requests (vLLM's --num-prompts)."),
    rate: Optional[str] = typer.Option(None, "--request-rate", "--rate", help=REQUEST_RATE_HELP),
    burstiness: Optional[float] = typer.Option(None, "--burstiness", min=1e-6, help=BURSTINESS_HELP),
    duration: Optional[float] = typer.Option(None, "--duration", min=1e-6, help=DURATION_HELP),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for the workload's random choices."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder; default: a new `results/<scenario name>/<date-time>/` (`results/<scenario name>/latest` points to it)."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    metric_percentiles: Optional[str] = typer.Option(None, "--metric-percentiles", help=METRIC_PERCENTILES_HELP),
    percentile_metrics: Optional[str] = typer.Option(None, "--percentile-metrics", help=PERCENTILE_METRICS_HELP),
    goodput: Optional[list[str]] = typer.Option(None, "--goodput", help=GOODPUT_HELP),
    metadata: Optional[list[str]] = typer.Option(None, "--metadata", help=METADATA_HELP),
    save_result: bool = typer.Option(False, "--save-result", help=SAVE_RESULT_HELP),
    save_detailed: bool = typer.Option(False, "--save-detailed", help=SAVE_DETAILED_HELP),
    result_dir: Optional[Path] = typer.Option(None, "--result-dir", help=RESULT_DIR_HELP),
    result_filename: Optional[str] = typer.Option(None, "--result-filename", help=RESULT_FILENAME_HELP),
) -> None:
    """Replay a trace through simulated vLLM instances under each policy and report SLO attainment.

    Times are in seconds of simulated time; latencies in the table are in ms or s as labelled. Each run gets
    a folder of its own; summary.json carries vllm bench serve's keys (date, model_id, num_prompts,
    request_rate, burstiness, ...) beside qlmctl's, and the command that made it.
    """
    from qlmctl.report import policy_progress, print_results
    from qlmctl.policies import parse_policy_list
    from qlmctl.runner import save, simulate as run_sim
    from qlmctl.scenario import load_scenario
    from qlmctl.vllm_bench import BenchOptions, now, run_header, write_result_file
    from qlmctl.workload import build_requests

    try:
        opts = BenchOptions.parse(metric_percentiles=metric_percentiles, percentile_metrics=percentile_metrics,
                                  goodput=split_items(goodput), metadata=split_items(metadata),
                                  save_result=save_result, save_detailed=save_detailed, result_dir=result_dir,
                                  result_filename=result_filename)
        sc = load_scenario(scenario, workload_overrides(trace, fmt, max_requests, rate, seed, burstiness, duration,
                                                        scenario))
        policies = parse_policy_list(policy or sc.spec.scheduler.policy)
        if result_filename and len(policies) > 1:
            raise UserError("one result file per policy: give --result-filename with a single --policy",
                            field="--result-filename")
        requests, report = build_requests(sc)
        out_dir = prepare_out(out, sc.spec.name, force, policies)
    except UserError as e:
        fail(e)
    for line in report.lines() + sc.engine_notes():
        console.print(f"[dim]{escape(line)}[/]", highlight=False)
    for line in sc.engine_mismatches():
        console.print(f"[yellow]note:[/] {escape(line)}", highlight=False)
    if len(requests) >= PURE_NOTE_REQUESTS and simulator.build() == "pure":
        console.print("[dim]the simulator is pure Python here (an editable install, or no C compiler at install "
                      "time): a regular install, pip install ., compiles it, 2-3x faster[/]", highlight=False)
    n_inst = len(sc.instance_specs())
    console.print(
        f"scenario [bold]{sc.spec.name}[/]: {len(requests):,} requests over {report.duration_s:,.0f} s "
        f"({report.mean_rate_rps:.2f} req/s), {n_inst} instance(s), policies {', '.join(policies)}",
        highlight=False,
    )
    summaries = {}
    files = []
    date = now()
    with policy_progress(console) as prog:
        for i, name in enumerate(policies):
            task = prog.add_task(name, total=len(requests))
            last = i == len(policies) - 1  # the last policy may fill in the requests themselves: no copy
            run = run_sim(sc, name, requests, lambda done, total, t=task: prog.update(t, completed=done),
                          copy_requests=not last)
            prog.update(task, completed=len(requests))
            try:
                run.summary.update(run_header(sc, report, requests, backend="simulate", label=name,
                                              metadata=opts.metadata, date=date))
            except UserError as e:
                fail(e)
            opts.apply(run.summary, run.result.requests)
            save(run, sc, out_dir)
            if opts.save_result:
                files.append(write_result_file(opts, run.summary, run.result.requests, label=name))
            summaries[name] = run.summary
    print_results(console, summaries, f"{sc.spec.name}: simulated, {len(requests):,} requests, {n_inst} instance(s)",
                  percentiles=opts.table_percentiles(), metrics=opts.percentile_metrics)
    wall = sum(float(s.get("sim_wall_s", 0.0)) for s in summaries.values())
    build = next(iter(summaries.values())).get("sim_build", "?")
    console.print(f"results in [bold]{out_dir}[/] [dim](simulated in {wall:.1f} s, {build} build)[/]",
                  highlight=False)
    for f in files:
        console.print(f"vllm bench serve result: [bold]{f}[/]", highlight=False)


def register(app: typer.Typer) -> None:
    app.command()(simulate)
