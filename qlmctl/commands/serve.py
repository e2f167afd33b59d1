"""`qlmctl serve`: the QLM gateway in front of vLLM engines; with --trace, a live replay under each policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from qlmctl.commands.common import (
    BURSTINESS_HELP,
    DURATION_HELP,
    FORCE_HELP,
    METADATA_HELP,
    console,
    fail,
    prepare_out,
    split_items,
    workload_overrides,
)


def serve(
    scenario: Optional[Path] = typer.Option(None, "--scenario", "-s", help="Scenario YAML with a `live` section (engines, port, default SLO class)."),
    policy: Optional[str] = typer.Option(None, "--policy", "-p", help="Policy; with --trace/--replay a comma-separated list, one live run each. Default: the scenario's."),
    launch: bool = typer.Option(False, "--launch", help="Start the engines from live.launch.command (one process per engine), wait for /health, stop them on exit."),
    host: Optional[str] = typer.Option(None, "--host", help="Address to listen on; default live.host (127.0.0.1)."),
    port: Optional[int] = typer.Option(None, "--port", min=0, max=65535, help="Port to listen on; default live.port (8000). 0: any free port."),
    trace: Optional[Path] = typer.Option(None, "--trace", "-t", help="Replay this trace through the gateway (arrival times in seconds, scaled by live.speedup) and write results like `simulate`."),
    replay_workload: bool = typer.Option(False, "--replay", help="Replay the scenario's own workload (as --trace does for a trace file)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="Trace format: auto, qlmctl, azure, burstgpt, mooncake, vidur."),
    max_requests: Optional[int] = typer.Option(None, "--num-prompts", "--max-requests", "-n", min=1, help="Replay at most this many requests (vLLM's --num-prompts)."),
    rate: Optional[str] = typer.Option(None, "--request-rate", "--rate", help="Rescale arrivals to this mean rate, requests per scenario second (vLLM's --request-rate; inf: all at once)."),
    burstiness: Optional[float] = typer.Option(None, "--burstiness", min=1e-6, help=BURSTINESS_HELP),
    duration: Optional[float] = typer.Option(None, "--duration", min=1e-6, help=DURATION_HELP),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for the workload's random choices."),
    concurrency: int = typer.Option(1024, "--concurrency", min=1, help="Replay: most requests open at once (later ones are sent late)."),
    client_process: bool = typer.Option(True, "--client-process/--in-process-client", help="Replay: run the client in a process of its own (default), or on the gateway's event loop."),
    client_procs: int = typer.Option(0, "--client-procs", min=0, max=64, help="Replay: client processes, each sending its share of the requests on one schedule. 0 (default): one per 4 CPUs, 1 to 4 (1 with --in-process-client). One process reading a few hundred streams runs late by tens of ms at times, inside the TTFTs it measures (client_loop_lag and client_send in the summary show it; 8-21 % on vLLM's TTFT p50 near saturation on two H100 hosts, docs/fidelity.md)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Replay output folder; default: a new `results/<scenario name>/<date-time>/`."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    metadata: Optional[list[str]] = typer.Option(None, "--metadata", help=METADATA_HELP),
    log_dir: Optional[Path] = typer.Option(None, "--engine-logs", help="With --launch: folder for the engines' output (default: a temp folder)."),
    access_log: bool = typer.Option(False, "--access-log", help="Log every HTTP request."),
    workers: int = typer.Option(0, "--workers", "-w", min=0, help="Relay worker processes (HTTP, streaming, resume) in front of one QLM core process. 0 (default): one per CPU beyond the core's, up to 8 (so one process on a 2-CPU host); 1: one process does both. See docs/live.md."),
    speedup: Optional[float] = typer.Option(None, "--speedup", min=1e-3, help="Scenario seconds per wall second, for the replay and for emulated engines started by --launch; default live.speedup. 1: real time (what a real vLLM runs at; on a small host, also what keeps the gateway and emulators on time)."),
    drain_s: Optional[float] = typer.Option(None, "--drain-timeout", min=0.0, help="On SIGTERM or Ctrl-C: wall seconds queued and running requests may still finish before they get a 503; default live.drain_timeout_s (30)."),
) -> None:
    """Serve an OpenAI-compatible API whose requests wait in the QLM core before reaching vLLM engines.

    Clients name their SLO class in the `x-slo-class` header (or `slo_class` body field), or a TTFT deadline in
    seconds in `x-slo-ttft-s` (`slo_ttft_s`). /metrics serves Prometheus metrics (latencies in wall-clock
    seconds). With --trace or --replay, each policy gets its own gateway in front of the same engines; results
    (scenario seconds, client-side latencies) go to `<out>/<policy>/` as with `simulate`. See docs/live.md.

    SIGTERM (or Ctrl-C) stops intake (new requests get 503), lets what is queued or running finish for up to
    --drain-timeout seconds, ends the rest with a 503 error, writes the results of a replay and exits 0; a
    second Ctrl-C stops at once. Engine faults, backpressure and the API key: docs/robustness.md.
    """
    from qlmctl.errors import UserError
    from qlmctl.policies import parse_policy_list
    from qlmctl.scenario import load_scenario

    try:
        sc = load_scenario(scenario, workload_overrides(trace, fmt, max_requests, rate, seed, burstiness, duration,
                                                        scenario))
        if sc.spec.live is None:
            raise UserError("the scenario has no `live` section (engines to serve from); see docs/live.md",
                            sc.path, field="live")
        policies = parse_policy_list(policy or sc.spec.scheduler.policy)
        replaying = trace is not None or replay_workload
        if not replaying and len(policies) != 1:
            raise UserError(f"a gateway runs one policy; got {', '.join(policies)} (pick one with --policy)",
                            field="policy")
        requests = report = None
        if replaying:
            from qlmctl.vllm_bench import BenchOptions
            from qlmctl.workload import build_requests

            meta = BenchOptions.parse(metadata=split_items(metadata)).metadata
            requests, report = build_requests(sc)
            out = prepare_out(out, sc.spec.name, force, policies)
            for line in report.lines():
                console.print(f"[dim]{line}[/]", highlight=False)
        import asyncio

        if drain_s is not None:
            sc.spec.live.drain_timeout_s = drain_s
        if speedup is not None:
            sc.spec.live.speedup = speedup
        if client_procs > 1 and not client_process:
            raise UserError("--client-procs above 1 needs the client in processes of its own, not "
                            "--in-process-client", field="--client-procs")
        from qlmctl.client.replay import client_procs_for

        client_procs = client_procs_for(client_procs, client_process)
        if workers == 0:
            from qlmctl.gateway.workers import auto_workers

            workers = auto_workers()
        asyncio.run(_main(sc, policies, launch, host, port, requests, concurrency, out, log_dir, access_log,
                          client_process, (report, meta) if replaying else None, workers, client_procs))
    except UserError as e:
        fail(e)
    except KeyboardInterrupt:
        console.print("stopped")


def _stop_on_signals() -> Any:
    """An event set by the first SIGTERM or SIGINT; a second SIGINT interrupts at once (KeyboardInterrupt)."""
    import asyncio
    import signal

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def first(sig: int) -> None:
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)  # the next Ctrl-C is Python's own: stop now

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, first, sig)
    return stop


async def _unless_stopped(aw, stop) -> bool:
    """Await `aw` unless `stop` is set first (then `aw` is cancelled); True when `aw` completed."""
    import asyncio

    task = asyncio.ensure_future(aw)
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if task.done():
        task.result()  # its exception, if any
        return True
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return False


async def _main(sc, policies, launch, host, port, requests, concurrency, out, log_dir, access_log,
                client_process=True, header=None, workers=1, client_procs=1) -> None:
    from qlmctl.gateway.clientconn import raise_fd_limit

    raise_fd_limit()  # client connections are limited to 3/4 of it (live.max_client_connections)
    stop = _stop_on_signals()
    launcher = None
    swap_control = None
    if launch:
        from qlmctl.gateway.launcher import Launcher

        launcher = Launcher(sc, log_dir)
        console.print(f"starting {len(launcher.procs)} engine(s); logs in {launcher.log_dir}", highlight=False)
        try:
            started = await _unless_stopped(launcher.start(), stop)
        except BaseException:
            await launcher.stop()
            raise
        if not started:
            console.print("stopped while the engines started", highlight=False)
            await launcher.stop()
            return
        swap_control = launcher.swap_control()
    try:
        if requests is None:
            await _serve_forever(sc, policies[0], host, port, swap_control, access_log, stop, workers)
        else:
            await _replay_all(sc, policies, requests, swap_control, concurrency, out, stop, client_process, header,
                              workers, client_procs)
    finally:
        if launcher is not None:
            await launcher.stop()


async def _serve_forever(sc, policy, host, port, swap_control, access_log, stop, workers=1) -> None:
    import asyncio

    from qlmctl.errors import UserError
    from qlmctl.gateway.server import Gateway

    gw = Gateway(sc, policy, host=host, port=port, swap_control=swap_control, record=False, access_log=access_log,
                 workers=workers)
    try:
        started = await _unless_stopped(gw.start(), stop)
    except (ConnectionError, OSError) as e:
        raise UserError(str(e)) from None
    if not started:
        console.print("stopped while waiting for the engines", highlight=False)
        await gw.stop()
        return
    for inst in gw.cluster.instances:
        engines = ", ".join(f"{m} at {e.url}{' (awake)' if inst.awake == m else ''}" for m, e in inst.engines.items())
        console.print(f"  instance {inst.name} ({inst.gpu}): {engines}", highlight=False)
    procs = (f", {workers} relay workers (pids {', '.join(map(str, gw.pool.pids))}) and the QLM core"
             if gw.pool is not None else "")
    console.print(f"QLM gateway ({policy}{procs}) on [bold]{gw.url}[/] (OpenAI base URL {gw.url}/v1); Ctrl-C stops",
                  highlight=False)
    try:
        stopped = asyncio.ensure_future(stop.wait())
        served = asyncio.ensure_future(gw.wait())
        await asyncio.wait([stopped, served], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if stop.is_set():
            grace = sc.spec.live.drain_timeout_s
            console.print(f"stopping: no new requests; draining for up to {grace:g} s", highlight=False)
            finished, failed = await gw.drain(grace)
            console.print(f"drained: {finished} request(s) finished, {failed} ended with a 503", highlight=False)
    finally:
        await gw.stop()


async def _replay_all(sc, policies, requests, swap_control, concurrency, out, stop, client_process=True,
                      header=None, workers=1, client_procs=1) -> None:
    from qlmctl.client.replay import client_late_warning, save_live
    from qlmctl.errors import UserError
    from qlmctl.gateway.run import run_live
    from qlmctl.report import policy_progress, print_results

    live = sc.spec.live
    span = (requests[-1].arrival_s - requests[0].arrival_s) if requests else 0.0
    console.print(
        f"scenario [bold]{sc.spec.name}[/]: {len(requests):,} requests over {span:,.0f} scenario s "
        f"(~{span / live.speedup:,.0f} wall s at x{live.speedup:g}), policies {', '.join(policies)}",
        highlight=False,
    )
    out_dir = out or Path("results") / sc.spec.name
    summaries = {}
    header_date: dict[str, str] = {}
    with policy_progress(console) as prog:
        for name in policies:
            if stop.is_set():
                console.print(f"stopped: policy {name} not run", highlight=False)
                continue
            task = prog.add_task(name, total=len(requests))
            try:
                run = await run_live(sc, name, requests, swap_control=swap_control, concurrency=concurrency,
                                     progress=lambda done, total, t=task: prog.update(t, completed=done), stop=stop,
                                     client_process=client_process, workers=workers, client_procs=client_procs)
            except (ConnectionError, OSError) as e:
                raise UserError(str(e)) from None
            if header is not None:
                from qlmctl.vllm_bench import now, run_header

                report, meta = header
                run.summary.update(run_header(sc, report, requests, backend=str(run.summary.get("backend") or "live"),
                                              label=name, max_concurrency=concurrency, metadata=meta,
                                              date=header_date.setdefault("date", now())))
            save_live(run, sc, out_dir)  # also a run cut short by SIGTERM: what it did is in its results
            summaries[name] = run.summary
    n_inst = len({e.instance for e in live.engines})
    if summaries:
        print_results(console, summaries, f"{sc.spec.name}: live, {len(requests):,} requests, {n_inst} instance(s)")
        for name, summary in summaries.items():
            late = client_late_warning(summary)
            if late:
                console.print(f"[yellow]{name}: {late}[/]", highlight=False)
        console.print(f"results in [bold]{out_dir}[/]", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
