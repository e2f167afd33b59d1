"""`qlmctl replay`: send a trace to a running OpenAI-compatible server at its arrival times, and report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

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


def replay(
    trace: Optional[Path] = typer.Argument(None, help="Trace file (CSV or JSONL); default: the scenario's workload."),
    url: str = typer.Option("http://127.0.0.1:8000", "--url", "-u", "--base-url", help="The server: a qlmctl gateway or vLLM itself, or any OpenAI-compatible base URL (http or https; with or without /v1; no scheme: http://). Proxies come from HTTP(S)_PROXY."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Served model name to send every request to; default: each request's model when the server serves it, else the server's only model (from GET /v1/models)."),
    scenario: Optional[Path] = typer.Option(None, "--scenario", "-s", help="Scenario giving SLO classes, models and the class/model of each trace row; default: scenarios/default.yaml."),
    label: str = typer.Option("live", "--label", "-l", help="Name of the results sub-folder and table column (e.g. the gateway's policy)."),
    speedup: Optional[float] = typer.Option(None, "--speedup", min=1e-6, help="Scenario seconds per wall second: arrivals are sent this much faster and latencies scaled back. Default: live.speedup, else 1."),
    fmt: Optional[str] = typer.Option(None, "--format", help="Trace format: auto, qlmctl, azure, burstgpt, mooncake, vidur."),
    max_requests: Optional[int] = typer.Option(None, "--num-prompts", "--max-requests", "-n", min=1, help="Replay at most this many requests (vLLM's --num-prompts)."),
    rate: Optional[str] = typer.Option(None, "--request-rate", "--rate", help=REQUEST_RATE_HELP + " Requests per scenario second."),
    burstiness: Optional[float] = typer.Option(None, "--burstiness", min=1e-6, help=BURSTINESS_HELP),
    duration: Optional[float] = typer.Option(None, "--duration", min=1e-6, help=DURATION_HELP),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for the workload's random choices."),
    concurrency: int = typer.Option(1024, "--max-concurrency", "--concurrency", min=1, help="Most requests open at once (later ones are sent late), as vLLM's --max-concurrency."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="OPENAI_API_KEY", help="Bearer token, if the server wants one."),
    insecure: bool = typer.Option(False, "--insecure", help="Do not check the server's TLS certificate (https)."),
    client_procs: int = typer.Option(0, "--client-procs", min=0, max=64, help="Client processes that send the requests and read their streams, each its share on one schedule. 0 (default): one per 4 CPUs, 1 to 4; 1: this process. One process reading ~200 streams ran late by up to 0.2 s and put the TTFT p50 it measured of vLLM 8-21 % high on two H100 hosts (docs/fidelity.md); the summary's client_loop_lag and client_send figures show it."),
    priority: bool = typer.Option(False, "--priority", help="Send each request's SLO-class priority (lower first) as vLLM's `priority` field, for a vLLM server started with --scheduling-policy priority."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder; default: a new `results/<scenario name>/<date-time>/`."),
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
    """Replay a trace against a live server: synthetic prompts of each request's length, max_tokens = its output
    length (ignore_eos, temperature 0), SLO class in the x-slo-class header.

    Latencies are measured on the client side as vLLM's serving benchmark does and written, in scenario seconds,
    to `<out>/<label>/` in the same form as `simulate`, so that `qlmctl plot` compares both.
    """
    import asyncio

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from qlmctl.client.http import make_client, pick_model, served_models, server_url
    from qlmctl.client.replay import LiveRun, client_late_warning, replay_from_processes, save_live
    from qlmctl.errors import UserError
    from qlmctl.metrics import summarize
    from qlmctl.report import print_results
    from qlmctl.scenario import load_scenario
    from qlmctl.vllm_bench import BenchOptions, run_header, write_result_file
    from qlmctl.workload import build_requests

    async def models() -> list[str]:
        client = make_client(url, api_key=api_key, concurrency=4, verify=not insecure)
        try:
            return await served_models(client)
        finally:
            await client.aclose()

    try:
        opts = BenchOptions.parse(metric_percentiles=metric_percentiles, percentile_metrics=percentile_metrics,
                                  goodput=split_items(goodput), metadata=split_items(metadata),
                                  save_result=save_result, save_detailed=save_detailed, result_dir=result_dir,
                                  result_filename=result_filename)
        root = server_url(url)
        sc = load_scenario(scenario, workload_overrides(trace, fmt, max_requests, rate, seed, burstiness, duration,
                                                        scenario))
        requests, report = build_requests(sc)
        wanted = list(dict.fromkeys(r.model for r in requests))
        model_map = pick_model(wanted, asyncio.run(models()), model, root)
        out_dir = prepare_out(out, sc.spec.name, force, [label])
    except UserError as e:
        fail(e)
    for line in report.lines():
        console.print(f"[dim]{escape(line)}[/]", highlight=False)
    renamed = {k: v for k, v in model_map.items() if k != v}
    if renamed:
        console.print("[dim]models sent as: " + ", ".join(f"{k} -> {v}" for k, v in renamed.items()) + "[/]",
                      highlight=False)
    s = speedup or (sc.spec.live.speedup if sc.spec.live is not None else 1.0)
    console.print(f"replaying {len(requests):,} requests against {root} (x{s:g})", highlight=False)
    with Progress(TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as prog:
        task = prog.add_task(label, total=len(requests))
        res = asyncio.run(replay_from_processes(
            root, requests, client_procs, speedup=s, concurrency=concurrency, api_key=api_key, model_map=model_map,
            verify=not insecure, keep_text=opts.save_detailed, send_priority=priority,
            progress=lambda done, total: prog.update(task, completed=done)))
    failed = [r.error for r in res.requests if r.error is not None]
    if failed and len(failed) == len(res.requests):
        fail(UserError(f"every request failed; the first: {failed[0]}", field="--url"))
    served = ",".join(dict.fromkeys(model_map.values()))
    summary = summarize(res.requests, itls=res.itls,
                        extra={"policy": label, "scenario": sc.spec.name, "backend": "replay", "url": root,
                               "speedup": s, "live_wall_s": res.wall_s, **res.client})
    try:
        summary.update(run_header(sc, report, requests, backend="replay", label=label, max_concurrency=concurrency,
                                  tokenizer_id=served, metadata=opts.metadata))
    except UserError as e:
        fail(e)
    summary["model_id"] = served
    opts.apply(summary, res.requests, res.itls)
    save_live(LiveRun(label, res.requests, summary, [], res), sc, out_dir)
    print_results(console, {label: summary}, f"{sc.spec.name}: replay against {root}, {len(requests):,} requests",
                  percentiles=opts.table_percentiles(), metrics=opts.percentile_metrics)
    if failed:
        console.print(f"[yellow]{len(failed)} request(s) failed; the first: {escape(failed[0])}[/]", highlight=False)
    late = client_late_warning(res.client)
    if late:
        console.print(f"[yellow]{escape(late)}[/]", highlight=False)
    console.print(f"results in [bold]{out_dir}[/]", highlight=False)
    if opts.save_result:
        path = write_result_file(opts, summary, res.requests, res.itls, res.texts, label=label)
        console.print(f"vllm bench serve result: [bold]{path}[/]", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("replay")(replay)
