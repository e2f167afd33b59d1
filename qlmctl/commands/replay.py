"""`qlmctl replay`: send a trace to a running OpenAI-compatible server at its arrival times, and report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from qlmctl.commands.common import console, fail, workload_overrides


def replay(
    trace: Optional[Path] = typer.Argument(None, help="Trace file (CSV or JSONL); default: the scenario's workload."),
    url: str = typer.Option("http://127.0.0.1:8000", "--url", "-u", help="Server base URL (a qlmctl gateway, or vLLM itself), without /v1."),
    scenario: Optional[Path] = typer.Option(None, "--scenario", "-s", help="Scenario giving SLO classes, models and the class/model of each trace row; default: scenarios/default.yaml."),
    label: str = typer.Option("live", "--label", "-l", help="Name of the results sub-folder and table column (e.g. the gateway's policy)."),
    speedup: Optional[float] = typer.Option(None, "--speedup", min=1e-6, help="Scenario seconds per wall second: arrivals are sent this much faster and latencies scaled back. Default: live.speedup, else 1."),
    fmt: Optional[str] = typer.Option(None, "--format", help="Trace format: auto, qlmctl, azure, burstgpt, mooncake, vidur."),
    max_requests: Optional[int] = typer.Option(None, "--max-requests", "-n", min=1, help="Replay at most this many requests."),
    rate: Optional[float] = typer.Option(None, "--rate", min=0.0, help="Rescale arrivals to this mean rate, requests per scenario second."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for the workload's random choices."),
    concurrency: int = typer.Option(1024, "--concurrency", min=1, help="Most requests open at once (later ones are sent late)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="OPENAI_API_KEY", help="Bearer token, if the server wants one."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder; default results/<scenario name>."),
) -> None:
    """Replay a trace against a live server: synthetic prompts of each request's length, max_tokens = its output
    length (ignore_eos, temperature 0), SLO class in the x-slo-class header.

    Latencies are measured on the client side as vLLM's serving benchmark does and written, in scenario seconds,
    to <out>/<label>/ in the same form as `simulate`, so that `qlmctl plot` compares both.
    """
    import asyncio

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from qlmctl.client.replay import LiveRun, replay as run_replay, save_live
    from qlmctl.errors import UserError
    from qlmctl.metrics import summarize
    from qlmctl.report import print_results
    from qlmctl.scenario import load_scenario
    from qlmctl.workload import build_requests

    try:
        sc = load_scenario(scenario, workload_overrides(trace, fmt, max_requests, rate, seed))
        requests, report = build_requests(sc)
    except UserError as e:
        fail(e)
    for line in report.lines():
        console.print(f"[dim]{line}[/]", highlight=False)
    s = speedup or (sc.spec.live.speedup if sc.spec.live is not None else 1.0)
    console.print(f"replaying {len(requests):,} requests against {url} (x{s:g})", highlight=False)
    with Progress(TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as prog:
        task = prog.add_task(label, total=len(requests))
        res = asyncio.run(run_replay(url, requests, speedup=s, concurrency=concurrency, api_key=api_key,
                                     progress=lambda done, total: prog.update(task, completed=done)))
    failed = [r.error for r in res.requests if r.error is not None]
    if failed and len(failed) == len(res.requests):
        fail(UserError(f"every request failed; the first: {failed[0]}", field="--url"))
    summary = summarize(res.requests, itls=res.itls,
                        extra={"policy": label, "scenario": sc.spec.name, "backend": "replay", "url": url,
                               "speedup": s, "live_wall_s": res.wall_s})
    out_dir = out or Path("results") / sc.spec.name
    save_live(LiveRun(label, res.requests, summary, [], res), sc, out_dir)
    print_results(console, {label: summary}, f"{sc.spec.name}: replay against {url}, {len(requests):,} requests")
    if failed:
        console.print(f"[yellow]{len(failed)} request(s) failed; the first: {failed[0]}[/]", highlight=False)
    console.print(f"results in [bold]{out_dir}[/]", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("replay")(replay)
