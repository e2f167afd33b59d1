"""`qlmctl emulate`: serve vLLM's HTTP API from the simulator's engine model, in real time, without a GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def _load_profile(profile: Path | None, scenario: Path | None, model: str | None, gpu: str | None,
                  flags: dict | None = None):
    """The engine profile and the served model name from --profile or --scenario/--model/--gpu, with the engine
    flags given (`flags`), else the profile's, else vLLM's defaults on the GPU (H200 when not named)."""
    from qlmctl.engine_defaults import canonical_gpu, unknown_gpu_message, vllm_defaults
    from qlmctl.errors import UserError

    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    if (profile is None) == (scenario is None):
        raise UserError("give exactly one of --profile FILE or --scenario FILE", field="--profile")
    if profile is not None:
        from qlmctl.scenario import ProfileSpec, _load_yaml_model

        if gpu is not None and canonical_gpu(gpu) is None:
            raise UserError(unknown_gpu_message(gpu), field="--gpu")
        name = model or profile.stem
        spec = _load_yaml_model(profile, ProfileSpec)
        defaults = {k: v for k, v in vllm_defaults(gpu or "H200").items() if k in ("max_num_seqs", "max_num_batched_tokens")}
        return spec.to_profile(name).with_overrides(**{**defaults, **spec.pinned_flags(), **flags}), name
    from qlmctl.scenario import EngineFlagsSpec, load_scenario

    sc = load_scenario(scenario)
    if model is None:
        if len(sc.models) != 1:
            raise UserError(f"the scenario has several models; pick one with --model ({', '.join(sc.models)})",
                            scenario, field="--model")
        model = sc.models[0]
    if model not in sc.models:
        raise UserError(f"unknown model '{model}'; the scenario has {', '.join(sc.models)}", scenario,
                        field="--model")
    if gpu is not None and gpu not in {i.gpu for i in sc.spec.cluster.instances}:
        raise UserError(f"no instance of the scenario runs on a {gpu}", scenario, field="--gpu")
    return sc.profile(model, gpu, engine=EngineFlagsSpec(**flags) if flags else None), model


def emulate(
    profile: Optional[Path] = typer.Option(None, "--profile", "-p", help="Engine profile YAML (e.g. scenarios/profiles/h200-llama-3.1-8b.yaml)."),
    scenario: Optional[Path] = typer.Option(None, "--scenario", "-s", help="Take the profile of --model from this scenario instead."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Served model name; default: the profile file's stem, or the scenario's only model."),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="GPU type: vLLM's defaults for it (default H200, as the bundled profiles), and with --scenario its by_gpu profile fields."),
    max_num_seqs: Optional[int] = typer.Option(None, "--max-num-seqs", min=1, help="As vLLM's flag; default: the profile's, else vLLM's default on the GPU (1024 on an H200)."),
    max_num_batched_tokens: Optional[int] = typer.Option(None, "--max-num-batched-tokens", min=1, help="As vLLM's flag; default: the profile's, else vLLM's default on the GPU (8192 on an H200)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; 0.0.0.0 exposes it to the network."),
    port: int = typer.Option(8001, "--port", min=0, max=65535, help="TCP port (0: any free port, printed)."),
    speedup: float = typer.Option(1.0, "--speedup", min=1e-6, help="Simulated seconds per wall second: 10 makes the modelled GPU 10x faster (token timing, sleep and wake-up)."),
    sleep_s: Optional[float] = typer.Option(None, "--sleep-s", min=0.0, help="Simulated seconds POST /sleep takes; default: the profile's sleep_s."),
    scheduling_policy: str = typer.Option("fcfs", "--scheduling-policy", help="fcfs, or priority (requests' `priority` field, lower first), as vLLM's flag."),
    stream_interval_s: float = typer.Option(0.01, "--stream-interval", min=0.0, help="Shortest gap between token deliveries to a stream, wall seconds."),
    hold_while_asleep: bool = typer.Option(False, "--hold-while-asleep", help="Completions sent while asleep wait for /wake_up, as vLLM 0.24 does, instead of failing at once with 503."),
    log_level: str = typer.Option("warning", "--log-level", help="uvicorn log level: debug, info, warning, error."),
    fault_kill_after: Optional[float] = typer.Option(None, "--fault-kill-after", min=0.0, help="Fault injection: die this many wall seconds after start (drop every connection, answer nothing but /emulator/*)."),
    fault_hang_after: Optional[float] = typer.Option(None, "--fault-hang-after", min=0.0, help="Fault injection: hang this many wall seconds after start (hold new requests, stall open streams)."),
    fault_down_for: Optional[float] = typer.Option(None, "--fault-down-for", min=0.0, help="Fault injection: a kill or hang heals itself after this many wall seconds (default: stays until POST /emulator/faults {})."),
    fault_error_rate: float = typer.Option(0.0, "--fault-error-rate", min=0.0, max=1.0, help="Fault injection: fraction (0..1) of completion requests answered with HTTP 500."),
    fault_slowdown: float = typer.Option(1.0, "--fault-slowdown", min=1e-6, help="Fault injection: the emulated GPU runs this many times slower (2: half speed)."),
    fault_seed: int = typer.Option(0, "--fault-seed", help="Fault injection: seed of the error-rate draws."),
) -> None:
    """Serve vLLM's OpenAI-compatible API (completions, chat, /metrics, sleep mode) from the simulated engine.

    One server emulates one `vllm serve` of one model; timing, batching and KV use follow the profile in real
    time, scaled by --speedup. Latencies it reports are wall-clock seconds. The --fault-* options inject engine
    faults (also settable at run time: POST /emulator/faults); see docs/robustness.md and
    qlmctl/emulator/EMULATOR_API.md.
    """
    from qlmctl.emulator.faults import Faults
    from qlmctl.emulator.server import bind_socket, create_app, uvicorn_server
    from qlmctl.errors import UserError

    if scheduling_policy not in ("fcfs", "priority"):
        raise UserError("must be fcfs or priority", field="--scheduling-policy")
    prof, name = _load_profile(profile, scenario, model, gpu, {"max_num_seqs": max_num_seqs,
                                                               "max_num_batched_tokens": max_num_batched_tokens})
    faults = Faults(kill_after_s=fault_kill_after, hang_after_s=fault_hang_after, down_for_s=fault_down_for,
                    error_rate=fault_error_rate, slowdown=fault_slowdown, seed=fault_seed)
    try:
        app = create_app(prof, name, speedup=speedup, sleep_s=sleep_s, policy=scheduling_policy,
                         stream_interval_s=stream_interval_s, hold_while_asleep=hold_while_asleep, faults=faults)
    except ValueError as e:
        raise UserError(str(e), profile or scenario) from None
    try:
        sock = bind_socket(host, port)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}", field="--port") from None
    real_port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    typer.echo(f"emulating vLLM serving '{name}' on http://{shown}:{real_port} (speed-up x{speedup:g}, "
               f"{prof.kv_blocks} KV blocks of {prof.block_size}, max {prof.max_num_seqs} seqs); Ctrl-C stops")
    uvicorn_server(app, log_level=log_level, access_log=log_level in ("debug", "info")).run(sockets=[sock])


def register(app: typer.Typer) -> None:
    app.command("emulate")(emulate)
