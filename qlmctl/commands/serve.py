"""`qlmctl serve`: the QLM gateway in front of vLLM engines; with --trace, a live replay under each policy."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def serve(
    scenario: Optional[Path] = typer.Option(None, "--scenario", "-s", help="Scenario YAML with a `live` section (engines, port, default SLO class)."),
    policy: Optional[str] = typer.Option(None, "--policy", "-p", help="Policy; with --trace/--replay a comma-separated list, one live run each. Default: the scenario's."),
    launch: bool = typer.Option(False, "--launch", help="Start the engines from live.launch.command (one process per engine), wait for /health, stop them on exit."),
    host: Optional[str] = typer.Option(None, "--host", help="Address to listen on; default live.host (127.0.0.1)."),
    port: Optional[int] = typer.Option(None, "--port", min=0, max=65535, help="Port to listen on; default live.port (8000). 0: any free port."),
    trace: Optional[Path] = typer.Option(None, "--trace", "-t", help="Replay this trace through the gateway (arrival times in seconds, scaled by live.speedup) and write results like `simulate`."),
    replay_workload: bool = typer.Option(False, "--replay", help="Replay the scenario's own workload (as --trace does for a trace file)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="Trace format: auto, qlmctl, azure, burstgpt, mooncake, vidur."),
    max_requests: Optional[int] = typer.Option(None, "--max-requests", "-n", min=1, help="Replay at most this many requests."),
    rate: Optional[float] = typer.Option(None, "--rate", min=0.0, help="Rescale arrivals to this mean rate, requests per scenario second."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for the workload's random choices."),
    concurrency: int = typer.Option(1024, "--concurrency", min=1, help="Replay: most requests open at once (later ones are sent late)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Replay output folder; default results/<scenario name>."),
    log_dir: Optional[Path] = typer.Option(None, "--engine-logs", help="With --launch: folder for the engines' output (default: a temp folder)."),
    access_log: bool = typer.Option(False, "--access-log", help="Log every HTTP request."),
) -> None:
    """Serve an OpenAI-compatible API whose requests wait in the QLM core before reaching vLLM engines.

    Clients name their SLO class in the `x-slo-class` header (or `slo_class` body field), or a TTFT deadline in
    seconds in `x-slo-ttft-s` (`slo_ttft_s`). /metrics serves Prometheus metrics (latencies in wall-clock
    seconds). With --trace or --replay, each policy gets its own gateway in front of the same engines; results
    (scenario seconds, client-side latencies) go to <out>/<policy>/ as with `simulate`. See docs/live.md.
    """
    from qlmctl.cli import _fail, _overrides, console
    from qlmctl.errors import UserError
    from qlmctl.runner import parse_policies
    from qlmctl.scenario import load_scenario

    try:
        sc = load_scenario(scenario, _overrides(trace, fmt, max_requests, rate, seed))
        if sc.spec.live is None:
            raise UserError("the scenario has no `live` section (engines to serve from); see docs/live.md",
                            sc.path, field="live")
        policies = parse_policies(policy, sc)
        replaying = trace is not None or replay_workload
        if not replaying and len(policies) != 1:
            raise UserError(f"a gateway runs one policy; got {', '.join(policies)} (pick one with --policy)",
                            field="policy")
        requests = None
        if replaying:
            from qlmctl.workload import build_requests

            requests, report = build_requests(sc)
            for line in report.lines():
                console.print(f"[dim]{line}[/]", highlight=False)
        import asyncio

        asyncio.run(_main(sc, policies, launch, host, port, requests, concurrency, out, log_dir, access_log))
    except UserError as e:
        _fail(e)
    except KeyboardInterrupt:
        console.print("stopped")


async def _main(sc, policies, launch, host, port, requests, concurrency, out, log_dir, access_log) -> None:
    from qlmctl.cli import console

    launcher = None
    swap_control = None
    if launch:
        from qlmctl.live.launcher import Launcher

        launcher = Launcher(sc, log_dir)
        console.print(f"starting {len(launcher.procs)} engine(s); logs in {launcher.log_dir}", highlight=False)
        await launcher.start()
        swap_control = launcher.swap_control()
    try:
        if requests is None:
            await _serve_forever(sc, policies[0], host, port, swap_control, access_log)
        else:
            await _replay_all(sc, policies, requests, swap_control, concurrency, out)
    finally:
        if launcher is not None:
            await launcher.stop()


async def _serve_forever(sc, policy, host, port, swap_control, access_log) -> None:
    from qlmctl.cli import console
    from qlmctl.errors import UserError
    from qlmctl.live.gateway import Gateway

    gw = Gateway(sc, policy, host=host, port=port, swap_control=swap_control, record=False, access_log=access_log)
    try:
        await gw.start()
    except (ConnectionError, OSError) as e:
        raise UserError(str(e)) from None
    for inst in gw.cluster.instances:
        engines = ", ".join(f"{m} at {e.url}{' (awake)' if inst.awake == m else ''}" for m, e in inst.engines.items())
        console.print(f"  instance {inst.name} ({inst.gpu}): {engines}", highlight=False)
    console.print(f"QLM gateway ({policy}) on [bold]{gw.url}[/] (OpenAI base URL {gw.url}/v1); Ctrl-C stops",
                  highlight=False)
    try:
        await gw.wait()
    finally:
        await gw.stop()


async def _replay_all(sc, policies, requests, swap_control, concurrency, out) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from qlmctl.cli import console
    from qlmctl.errors import UserError
    from qlmctl.live.replay import run_live, save_live
    from qlmctl.report import print_results

    live = sc.spec.live
    span = (requests[-1].arrival_s - requests[0].arrival_s) if requests else 0.0
    console.print(
        f"scenario [bold]{sc.spec.name}[/]: {len(requests):,} requests over {span:,.0f} scenario s "
        f"(~{span / live.speedup:,.0f} wall s at x{live.speedup:g}), policies {', '.join(policies)}",
        highlight=False,
    )
    out_dir = out or Path("results") / sc.spec.name
    summaries = {}
    with Progress(TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as prog:
        for name in policies:
            task = prog.add_task(name, total=len(requests))
            try:
                run = await run_live(sc, name, requests, swap_control=swap_control, concurrency=concurrency,
                                     progress=lambda done, total, t=task: prog.update(t, completed=done))
            except (ConnectionError, OSError) as e:
                raise UserError(str(e)) from None
            save_live(run, sc, out_dir)
            summaries[name] = run.summary
    n_inst = len({e.instance for e in live.engines})
    print_results(console, summaries, f"{sc.spec.name}: live, {len(requests):,} requests, {n_inst} instance(s)")
    console.print(f"results in [bold]{out_dir}[/]", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
