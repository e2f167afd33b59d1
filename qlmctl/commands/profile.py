"""`qlmctl profile-model`: measure an engine, fit the step-time model, write a profile."""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

if TYPE_CHECKING:
    from simulator.fit import PrefillPoint, RawProfile


def _ints(text: str, name: str, minimum: int = 1) -> list[int]:
    from qlmctl.errors import UserError

    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"expected comma-separated integers, got '{text}'", field=name) from None
    if not vals or min(vals) < minimum:
        raise UserError("expected positive integers" if minimum == 1 else f"expected integers >= {minimum}",
                        field=name)
    return vals


def _room_tokens(raw: "RawProfile", streams: int, reserved: int = 0) -> int:
    """Tokens (prompt and output) each of `streams` requests may hold without filling the KV cache (no preemption;
    `reserved` tokens of it held by other requests) or passing the model length."""
    kv_tokens = (raw.num_gpu_blocks or 0) * (raw.block_size or 16)
    return min(int((0.8 * kv_tokens - reserved) / max(1, streams)) if kv_tokens else 2000,
               (raw.max_model_len or 8192) - 1)


def _max_tokens(raw: "RawProfile", streams: int, prompt_tokens: int, cap: int = 2000, reserved: int = 0) -> int:
    """Output length for `streams` long requests of `prompt_tokens` that must outlast a measurement within
    `_room_tokens`."""
    return min(cap, _room_tokens(raw, streams, reserved) - prompt_tokens)


def _decode_point_unfit(raw: "RawProfile", batch: int, prompt_tokens: int, output_tokens: int,
                        max_num_seqs: int, budget: int) -> str | None:
    """Why a decode point of `batch` sequences cannot measure full-batch steps (None if it can): more sequences
    than the engine batches, or more tokens than the KV cache holds without preempting (the point would time
    preemption and recompute instead)."""
    if batch > max_num_seqs:
        return f"more sequences than --max-num-seqs ({max_num_seqs})"
    from qlmctl.client.prober import decode_rounds

    _, long = decode_rounds(batch, prompt_tokens, output_tokens, budget)  # the long round's sequences hold the most
    if raw.num_gpu_blocks and _room_tokens(raw, batch) < prompt_tokens + long:
        return "too little KV cache for its sequences"
    return None


LOAD_TOKENS_PER_S = 100.0
"""Most tokens a second one load stream gets (one a step; a step beside hundreds of streams takes 10 ms or more)."""


def _load_lengths(raw: "RawProfile", streams: int, windows: int, window_s: float) -> tuple[int, int]:
    """(prompt, output) tokens of `streams` load streams that must outlast `windows` probe windows of `window_s`
    (and the prefill before them) within the KV cache: the prompt is 512 tokens where there is room, shorter (down
    to 64) where a stream's output must use it. On an H100 (463k KV tokens), 256 streams of 512 + 934 tokens ended
    during the windows."""
    room = _room_tokens(raw, streams)
    needed = int((windows * window_s + 15.0) * LOAD_TOKENS_PER_S)
    prompt = max(64, min(512, room - needed))
    return prompt, min(4000, room - prompt)


DEFAULT_LOAD_PROBES = "words:32"
"""Requests like a trace's (words to tokenize, a streamed answer): on an H100 host such a probe cost the API server
7.3 ms of CPU against 4.7 for a prefill-only probe of token ids (docs/fidelity.md, "Probes like a trace's requests")."""


def _probe_kinds(text: str) -> tuple[tuple[int, bool], ...]:
    """--load-probes 'words:32,ids:1' as ((32, True), (1, False))."""
    from qlmctl.errors import UserError

    kinds = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        kind, _, n = item.partition(":")
        if kind not in ("words", "ids") or not n.isdigit() or int(n) < 1:
            raise UserError(f"expected KIND:N with KIND 'words' or 'ids' and N >= 1 tokens, got '{item}'",
                            field="--load-probes")
        kinds.append((int(n), kind == "words"))
    if not kinds:
        raise UserError("no probe kind given", field="--load-probes")
    return tuple(kinds)


def _first_kind(text: str) -> str:
    """The kind the queue model is fitted on, as `FrontendLoadPoint.probe_kind` names it."""
    n, words = _probe_kinds(text)[0]
    return f"{'words' if words else 'ids'}:{n}"


def _wait_health(url: str, proc: subprocess.Popen | None, timeout_s: float, verify: bool = True) -> None:
    import httpx

    from qlmctl.client.http import describe_error
    from qlmctl.errors import UserError

    t0 = time.monotonic()
    last = "no answer"
    while time.monotonic() - t0 < timeout_s:
        if proc is not None and proc.poll() is not None:
            raise UserError(f"the launched engine exited with code {proc.returncode}", field="--launch")
        try:
            resp = httpx.get(f"{url}/health", timeout=2.0, verify=verify)
            if resp.status_code == 200:
                return
            last = f"/health answered HTTP {resp.status_code}"
        except httpx.HTTPError as e:
            last = describe_error(e, url)
        time.sleep(1.0)
    raise UserError(f"engine at {url} not healthy after {timeout_s:.0f} s: {last}", field="--url")


def _check_model(url: str, model: str | None, api_key: str | None, verify: bool) -> str:
    """The model to profile: `model` when the server serves it, else (none given) its only model.
    UserError in one line otherwise, naming what it serves."""
    from qlmctl.client.http import make_client, served_models
    from qlmctl.errors import UserError

    async def get() -> list[str]:
        client = make_client(url, api_key=api_key, concurrency=2, verify=verify)
        try:
            return await served_models(client)
        finally:
            await client.aclose()

    served = asyncio.run(get())
    if model is None:
        if len(served) != 1:
            raise UserError(f"the server serves {', '.join(served) or 'no model'}; name the one to profile",
                            field="MODEL")
        return served[0]
    if model not in served:
        raise UserError(f"the server does not serve '{model}'; it serves {', '.join(served) or 'no model'}",
                        field="MODEL")
    return model


SETTLE_TOLERANCE = 0.10
"""How much slower than before the load windows the reference prefill may run for the server to count as settled."""
SETTLE_WAIT_S = 5.0
SETTLE_MAX_S = 60.0


async def _settle(prof, before: "PrefillPoint", reps: int, *, wait_s: float = SETTLE_WAIT_S,
                  max_s: float = SETTLE_MAX_S, tolerance: float = SETTLE_TOLERANCE, clock=time.monotonic,
                  sleep=asyncio.sleep) -> dict:
    """After the API server's load windows, wait until a prefill of `before.prompt_tokens` takes what it took
    before them (within `tolerance`), measuring it again every `wait_s` for at most `max_s`. Why: on two hosts
    whose API server those windows saturated (an H100 and an H200), a lone 1,024-token prefill step then ran
    15-30 % slower (on the H100 for about half a minute), and the points measured meanwhile carried it into the fit
    (docs/fidelity.md, "Points measured after the load windows"). Compared by the engine's own prefill time
    where both points have it, else by TTFT. Returns what was seen (for the raw file's meta)."""
    by_engine = before.engine_s is not None

    def took(p) -> float:
        return p.engine_s if by_engine and p.engine_s is not None else p.ttft_s

    ref = took(before)
    t0 = clock()
    seen: list[float] = []
    while True:
        seen.append(took(await prof.prefill_point(before.prompt_tokens, reps)))
        if seen[-1] <= ref * (1.0 + tolerance) or clock() - t0 >= max_s:
            break
        await sleep(wait_s)
    return {"prompt_tokens": before.prompt_tokens, "timed_by": "engine" if by_engine else "ttft",
            "before_s": ref, "after_s": seen, "waited_s": round(clock() - t0, 1),
            "settled": seen[-1] <= ref * (1.0 + tolerance)}


def _say_settle(console, seen: dict) -> None:
    """One line on `_settle`'s outcome when the server was slower after the load windows."""
    if len(seen["after_s"]) == 1 and seen["settled"]:
        return
    ms = [f"{t * 1e3:.1f}" for t in seen["after_s"]]
    line = (f"after the API server load windows a {seen['prompt_tokens']}-token prefill took {', '.join(ms)} ms "
            f"against {seen['before_s'] * 1e3:.1f} before")
    if seen["settled"]:
        console.print(f"[yellow]{line}: waited {seen['waited_s']:g} s for it to settle[/]")
    else:
        console.print(f"[yellow]{line}, still after {seen['waited_s']:g} s: the decode, mixed and sustained points "
                      "may carry the slowdown (raw meta 'settle')[/]")


async def _measure(url: str, model: str, prompt_lengths: list[int], batches: list[int], contexts: list[int],
                   output_tokens: int, reps: int, sleep: bool, seed: int, budget: int, progress, raw,
                   mixed_batches: list[int], mixed_lengths: list[int], mixed_contexts: list[int],
                   frontend_streams: list[int], load_streams: list[int], load_rates: list[float],
                   load_window_s: float, probe_tokens: int, max_num_seqs: int, api_key: str | None = None,
                   verify: bool = True, sustained_s: float = 0.0,
                   load_probes: tuple[tuple[int, bool], ...] = ((1, False),), usage_cost: bool = False) -> None:
    from qlmctl.client.prober import Profiler

    prof = Profiler(url, model, seed=seed, api_key=api_key, verify=verify)
    try:
        await prof.capacity(raw)
        await prof.stream(16, 8)  # warm-up
        total = (len(prompt_lengths) + len(batches) * len(contexts) + len(mixed_batches) * len(mixed_contexts)
                 + len(frontend_streams) + len(load_streams) + (1 if sleep else 0) + (1 if sustained_s else 0))
        task = progress.add_task("profiling", total=total)
        # The prefill points first, on a quiet server (a few seconds): after load windows that saturated the API
        # server, two hosts ran a lone prefill step 15-30 % slower for a while (see `_settle`).
        for n in prompt_lengths:
            progress.update(task, description=f"prefill {n} tok")
            raw.prefill.append(await prof.prefill_point(n, reps))
            progress.advance(task)
        # Then the API server under load: a run cut short (Ctrl-C, a time limit) still has it.
        raw.meta["load_streams_read_by"] = "another process"  # (frontend_load_points' default)
        for n in load_streams:
            progress.update(task, description=f"API server load, {n} streams")
            prompt, max_tokens = _load_lengths(raw, n, len(load_rates) * len(load_probes), load_window_s)
            if n >= max_num_seqs:
                progress.console.print(f"[yellow]skipping the API server load with {n} streams: the probes would "
                                       f"wait for one of the {max_num_seqs} batch slots (--max-num-seqs)[/]")
            elif n and max_tokens < 64:
                progress.console.print(f"[yellow]skipping the API server load with {n} streams: too little KV cache[/]")
            else:
                try:
                    raw.frontend_load.extend(await prof.frontend_load_points(
                        n, load_rates, probe_tokens=probe_tokens, prompt_tokens=prompt, window_s=load_window_s,
                        max_tokens=max_tokens, kinds=load_probes))
                    if n:
                        raw.meta.setdefault("load_stream_tokens", {})[str(n)] = [prompt, max_tokens]
                except RuntimeError as e:
                    prof.skipped.append(f"API server load with {n} streams: {e}")
                if n and usage_cost:
                    # The same streams (lengths too) asking for the usage in every chunk, one window: what it costs
                    # the API server a token, told apart from the windows just measured.
                    progress.update(task, description=f"API server load, {n} streams, usage")
                    try:
                        raw.frontend_load.extend(await prof.frontend_load_points(
                            n, load_rates[:1], probe_tokens=probe_tokens, prompt_tokens=prompt,
                            window_s=load_window_s, max_tokens=max_tokens, kinds=load_probes[:1], usage_chunks=True))
                    except RuntimeError as e:
                        prof.skipped.append(f"API server load with {n} streams asking for usage in every chunk: {e}")
            progress.advance(task)
        if raw.prefill and any(p.streams for p in raw.frontend_load):
            progress.update(task, description="waiting for the server to settle")
            ref = min(raw.prefill, key=lambda p: abs(p.prompt_tokens - 1024))
            seen = raw.meta["settle"] = await _settle(prof, ref, reps)
            _say_settle(progress.console, seen)
        for ctx in contexts:
            for b in batches:
                progress.update(task, description=f"decode B={b} ctx={ctx}")
                why = _decode_point_unfit(raw, b, ctx, output_tokens, max_num_seqs, budget)
                if why:
                    prof.skipped.append(f"decode B={b} ctx={ctx}: {why}")
                else:
                    raw.decode.append(await prof.decode_point(b, ctx, output_tokens, budget))
                progress.advance(task)
        for ctx in mixed_contexts:
            for b in mixed_batches:
                progress.update(task, description=f"mixed B={b} ctx={ctx}")
                max_tokens = _max_tokens(raw, b, ctx)
                if max_tokens < 64:
                    progress.console.print(f"[yellow]skipping mixed steps at B={b} ctx={ctx}: too little KV cache[/]")
                else:
                    raw.mixed.extend(await prof.mixed_points(b, ctx, mixed_lengths, max_tokens=max_tokens))
                progress.advance(task)
        if sustained_s:
            # A quarter of the step budget a prompt, so that a few fill each step; decoders as in the mixed points.
            b, length = min(32, max(1, max_num_seqs // 4)), max(64, budget // 4)
            progress.update(task, description=f"sustained load, {sustained_s:g} s")
            # The decoders' output, within the KV cache the prompts in flight leave (and the model length).
            from qlmctl.client.prober import sustained_inflight
            decode_tokens = _max_tokens(raw, b, 128, cap=4000, reserved=sustained_inflight(budget, length) * length)
            if decode_tokens < 256:
                prof.skipped.append("sustained load: too little KV cache or model length for its decoders")
            else:
                try:
                    raw.sustained.extend(await prof.sustained_run(0, b, length, sustained_s, budget=budget,
                                                                  decode_tokens=decode_tokens))
                except RuntimeError as e:
                    prof.skipped.append(f"sustained load: {e}")
            progress.advance(task)
        for n in frontend_streams:
            progress.update(task, description=f"frontend, {n} streams")
            max_tokens = _max_tokens(raw, n, 512)
            if n and max_tokens < 64:
                progress.console.print(f"[yellow]skipping the frontend probe with {n} streams: too little KV cache[/]")
            else:
                try:
                    raw.frontend.append(await prof.frontend_point(n, 512, max_tokens=max_tokens))
                except RuntimeError as e:  # keep everything else measured; say why this point is missing
                    prof.skipped.append(f"frontend probe with {n} streams: {e}")
            progress.advance(task)
        for why in prof.skipped:
            progress.console.print(f"[yellow]not kept:[/] {why}")
        raw.meta.setdefault("skipped", []).extend(prof.skipped)
        if sleep:
            progress.update(task, description="sleep / wake_up")
            await prof.sleep_wake(raw)
            progress.advance(task)
    finally:
        await prof.close()


def profile_model(
    model: Optional[str] = typer.Argument(None, help="Served model name, as the engine's /v1/models lists it; default: the engine's only model."),
    url: str = typer.Option("http://127.0.0.1:8000", "--url", "--base-url", help="A running vLLM OpenAI server: its root or OpenAI base URL (http or https, with or without /v1; no scheme: http://)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="OPENAI_API_KEY", help="Bearer token, if the server wants one."),
    insecure: bool = typer.Option(False, "--insecure", help="Do not check the server's TLS certificate (https)."),
    launch: Optional[str] = typer.Option(None, "--launch", help="Command that starts the engine (e.g. 'vllm serve ...'); stopped at the end."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Profile YAML to write (a scenario's profile_file)."),
    raw_path: Optional[Path] = typer.Option(None, "--raw", help="Also save the raw measurements (JSON) here."),
    from_raw: Optional[Path] = typer.Option(None, "--from-raw", help="Refit saved raw measurements; no engine needed."),
    gpu: str = typer.Option("unknown", "--gpu", help="GPU type, recorded in the provenance."),
    flags: str = typer.Option("", "--flags", help="Engine flags, recorded in the provenance."),
    prompt_lengths: str = typer.Option("128,512,1024,2048,4096", help="Prefill points: prompt lengths, tokens."),
    batches: str = typer.Option("1,8,32,64,128,256", help="Decode points: concurrent streams (a point past --max-num-seqs, or whose sequences the KV cache cannot hold, is skipped and said so)."),
    contexts: str = typer.Option("128,1024", help="Decode points: prompt length of each stream, tokens."),
    output_tokens: int = typer.Option(128, min=8, help="Decode steps measured per point (extra tokens in the long round)."),
    reps: int = typer.Option(3, min=1, help="Repetitions of each prefill point (median taken)."),
    mixed: bool = typer.Option(True, "--mixed/--no-mixed", help="Also time steps that mix decodes with a prefill."),
    mixed_batches: str = typer.Option("32,128,224", help="Mixed steps: decoding streams, each with a --mixed-context prompt."),
    mixed_lengths: str = typer.Option("256,1024,2048", help="Mixed steps: prefill lengths injected, tokens."),
    mixed_contexts: str = typer.Option("512,1536", help="Mixed steps: prompt length of the decoding streams, tokens."),
    frontend: bool = typer.Option(True, "--frontend/--no-frontend", help="Also time short probes while the server streams to many clients."),
    frontend_streams: str = typer.Option("0,64,128,256", help="Frontend probes: concurrent streams relayed, each with a 512-token prompt."),
    frontend_load: bool = typer.Option(True, "--frontend-load/--no-frontend-load", help="Also measure the API server as a queue: its CPU per request and per streamed token, and probe TTFTs under Poisson arrivals while it streams (fits the frontend queue model)."),
    usage_cost: bool = typer.Option(True, "--usage-cost/--no-usage-cost", help="With --frontend-load: also one window (the first --load-rates rate and --load-probes kind) beside each nonzero --load-streams count of streams that ask for the usage so far in every chunk (stream_options.continuous_usage_stats, which `qlmctl serve` asks for under live.token_count: usage): the API server's extra CPU a streamed token, frontend_usage_cpu_per_token_s, s. About 10 s a stream count."),
    load_streams: str = typer.Option("0,64,128,192", help="API server load: concurrent streams relayed, each with a 512-token prompt, shorter (down to 64 tokens) where the KV cache could not otherwise hold an output that outlasts the windows (fewer streams than --max-num-seqs, so that probes get a batch slot)."),
    load_rates: str = typer.Option("4,12,20", help="API server load: probe arrival rates, requests/s (Poisson)."),
    load_window_s: float = typer.Option(5.0, min=0.5, help="API server load: seconds of probes per rate. A window whose probes took over twice this to answer (the API server's queue ran away) is left out of the queue fit; with --from-raw, the window of raw files that did not record theirs."),
    probe_tokens: int = typer.Option(1024, min=1, help="API server load: prompt length of each probe, tokens."),
    load_probes: Optional[str] = typer.Option(None, help="API server load: the probes, comma-separated KIND:N, each measured in every window setting: 'words:N', a prompt of words for the server to tokenize and an answer of N tokens streamed back, as a trace's requests are; 'ids:N', token ids, the answer N tokens. The queue model is fitted on the first kind. Default: words:32 when measuring; with --from-raw, the first kind the file holds."),
    max_num_seqs: int = typer.Option(256, min=1, help="The engine's --max-num-seqs (recorded in the profile's engine_flags: what it was measured with)."),
    max_num_batched_tokens: int = typer.Option(8192, min=1, help="The engine's --max-num-batched-tokens (recorded in engine_flags)."),
    kv_blocks: Optional[int] = typer.Option(None, min=1, help="KV blocks, if the engine does not report them."),
    sustained: bool = typer.Option(True, "--sustained/--no-sustained", help="Also run the engine under sustained prefill load (decoders beside prompts that keep every step full) for --sustained-s seconds: how much slower prefill runs once the GPU is held at its power cap than in the short bursts of the other points (sustained_prefill_slowdown)."),
    sustained_s: float = typer.Option(20.0, "--sustained-s", min=4.0, help="Seconds of sustained load (the second half is measured, once the GPU's clock has settled)."),
    sleep: bool = typer.Option(False, "--sleep/--no-sleep", help="Also time POST /sleep and /wake_up (warm swap cost)."),
    async_scheduling: bool = typer.Option(True, "--async-scheduling/--no-async-scheduling", help="Whether the engine schedules one step ahead, as vLLM 0.24 does by default (its log: 'Asynchronous scheduling is enabled'); recorded in the profile."),
    load_cold_s: Optional[float] = typer.Option(None, min=0, help="Cold load time to record (launch to /health), s; measured when --launch starts the engine."),
    health_timeout_s: float = typer.Option(600.0, help="Wait at most this long for the engine's /health, s."),
    seed: int = typer.Option(0, help="Seed for the prompts' token ids."),
) -> None:
    """Measure a vLLM engine (prefill vs prompt length, step time vs batch and context, steps mixing decodes
    with a prefill, first-token delay under streaming load, prefill under sustained load, KV capacity) and fit
    the simulator's step-time model. Prints the fit and its error per point; writes the profile with its provenance. Times in seconds."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    import httpx

    from qlmctl.errors import UserError
    from simulator.fit import RawProfile, fit_profile, profile_dict

    console = Console()
    try:
        if from_raw is not None:
            try:
                raw = RawProfile.from_json(from_raw.read_text())
            except (OSError, ValueError, TypeError) as e:
                raise UserError(f"cannot read raw measurements: {e}", from_raw) from None
            # Older raw files predate these fields; the command line fills them in.
            if raw.async_scheduling is None:
                raw.async_scheduling = async_scheduling
            if raw.launch_s is None:
                raw.launch_s = load_cold_s
        else:
            from qlmctl.client.http import server_url

            url = server_url(url)
            pl, bs, cx = (_ints(prompt_lengths, "--prompt-lengths"), _ints(batches, "--batches"),
                          _ints(contexts, "--contexts"))
            mb = _ints(mixed_batches, "--mixed-batches") if mixed else []
            ml = _ints(mixed_lengths, "--mixed-lengths")
            mc = _ints(mixed_contexts, "--mixed-contexts")
            kinds = _probe_kinds(load_probes or DEFAULT_LOAD_PROBES)
            fs = _ints(frontend_streams, "--frontend-streams", minimum=0) if frontend else []
            ls = _ints(load_streams, "--load-streams", minimum=0) if frontend_load else []
            lr = [float(r) for r in _ints(load_rates, "--load-rates")] if frontend_load else []
            proc = None
            if launch:
                env = dict(os.environ, VLLM_SERVER_DEV_MODE="1")
                proc = subprocess.Popen(shlex.split(launch), env=env, start_new_session=True)
            raw = RawProfile(model=model or "?", url=url, meta={"gpu": gpu, "flags": flags or launch or ""},
                             async_scheduling=async_scheduling)
            try:
                t_launch = time.monotonic()
                _wait_health(url, proc, health_timeout_s, verify=not insecure)
                if proc is not None:
                    raw.launch_s = time.monotonic() - t_launch
                elif load_cold_s is not None:
                    raw.launch_s = load_cold_s
                model = raw.model = _check_model(url, model, api_key, not insecure)
                with Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), console=console) as progress:
                    asyncio.run(_measure(url, model, pl, bs, cx, output_tokens, reps, sleep, seed,
                                         max_num_batched_tokens, progress, raw, mb, ml, mc, fs, ls, lr,
                                         load_window_s, probe_tokens, max_num_seqs, api_key, not insecure,
                                         sustained_s if sustained else 0.0, kinds, usage_cost and frontend_load))
            except KeyboardInterrupt:
                console.print("[yellow]interrupted: keeping what was measured[/]")
            except (httpx.HTTPError, RuntimeError, OSError, ValueError) as e:
                # A measurement that failed half-way: one line (what was measured is saved with --raw).
                from qlmctl.client.http import describe_error

                raise UserError(f"measuring failed: {describe_error(e, url)}"
                                + (f" (measured so far: --from-raw {raw_path})" if raw_path else ""), field="--url") \
                    from None
            finally:
                if proc is not None:
                    os.killpg(proc.pid, signal.SIGTERM)
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        os.killpg(proc.pid, signal.SIGKILL)
                if raw_path is not None:
                    raw_path.parent.mkdir(parents=True, exist_ok=True)
                    raw_path.write_text(raw.to_json())
        try:
            fit = fit_profile(raw, max_num_batched_tokens, load_probes=_first_kind(load_probes) if load_probes else None,
                              load_window_s=load_window_s)
        except ValueError as e:
            raise UserError(str(e)) from None
        prof = profile_dict(raw, fit, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                            gpu=raw.meta.get("gpu", gpu), flags=raw.meta.get("flags", flags), kv_blocks=kv_blocks)
        prof = _with_engine_flags(prof, str(raw.meta.get("flags", flags) or launch or ""))
    except UserError as e:
        from qlmctl.commands.common import print_error

        print_error(e)
        raise typer.Exit(2)

    t = Table(title=f"step-time fit for {raw.model}")
    t.add_column("coefficient")
    t.add_column("value", justify="right")
    for k in ("base_s", "per_prefill_token_s", "per_decode_seq_s", "per_context_token_s", "per_prefill_pair_s",
              "per_prefill_step_s", "knee_tokens"):
        t.add_row(k, f"{prof[k]:.4g}")
    t.add_row("HTTP overhead (s)", f"{fit.overhead_s:.4g}")
    if raw.frontend:
        t.add_row("frontend per stream (s)", f"{fit.frontend_per_stream_s:.4g}")
    if raw.frontend_load:
        t.add_row("frontend latency (s)", f"{prof['frontend_latency_s']:.4g}")
        t.add_row("API server CPU per request (s)", f"{fit.frontend_cpu_per_request_s:.4g}")
        t.add_row("API server CPU per streamed token (s)", f"{fit.frontend_cpu_per_token_s:.4g}")
        if fit.frontend_usage_cpu_per_token_s is not None:
            t.add_row("  more with usage in every chunk (s)", f"{fit.frontend_usage_cpu_per_token_s:.4g}")
        t.add_row("API server idle CPU (s/s)", f"{fit.frontend_idle_cpu:.3g}")
        t.add_row("API server queue factor", f"{fit.frontend_queue_factor:.3g}")
    if fit.sustained_prefill_slowdown is not None:
        t.add_row("sustained prefill slowdown", f"{fit.sustained_prefill_slowdown:+.1%}")
    t.add_row("KV blocks", f"{prof['kv_blocks']:,}")
    console.print(t)
    for run, dec, load, share, slow in fit.sustained_runs:
        console.print(f"sustained load, run {run}: decode-only steps at {dec:.3f} of the model, loaded steps at "
                      f"{load:.3f} (prefill work {share:.0%} of their time): prefill work {slow:+.1%}")
    e = Table(title=f"fit error per point (mean |err| {fit.mean_abs_error:.1%}, max {fit.max_abs_error:.1%})")
    for c in ("point", "measured (ms)", "fitted (ms)", "error"):
        e.add_column(c, justify="right" if c != "point" else "left")
    for lab, m, f, err in fit.errors + fit.frontend_errors:
        e.add_row(lab, f"{m * 1e3:.2f}", f"{f * 1e3:.2f}", f"{err:+.1%}")
    console.print(e)
    for why in fit.frontend_left_out:
        console.print(f"[yellow]API-server load window left out of the queue fit[/]: {why}")
    if out is not None:
        import yaml

        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"# Fitted by qlmctl profile-model; see provenance.\n{yaml.safe_dump(prof, sort_keys=False)}")
        console.print(f"profile written to [bold]{out}[/]")


def _with_engine_flags(prof: dict, command: str) -> dict:
    """The fitted profile with the engine flags it was measured with in `engine_flags`, not at the top level:
    a scenario runs its engines with its own flags (vLLM's defaults unless it says otherwise), and is warned
    where they differ from these (`qlmctl.scenario.ProfileSpec`)."""
    from qlmctl.scenario import flags_from_command

    out = {k: v for k, v in prof.items() if k not in ("max_num_seqs", "max_num_batched_tokens", "provenance")}
    measured: dict = {"max_num_seqs": prof.get("max_num_seqs"),
                      "max_num_batched_tokens": prof.get("max_num_batched_tokens"),
                      "max_model_len": prof.get("max_model_len"), "block_size": prof.get("block_size")}
    given = flags_from_command(command)
    measured.update(given)
    measured.setdefault("enable_prefix_caching", None)
    if "async_scheduling" in prof:
        measured["async_scheduling"] = prof["async_scheduling"]
    if command:
        measured["command"] = command
    out["engine_flags"] = {k: v for k, v in measured.items() if v is not None}
    out["provenance"] = prof["provenance"]
    return out


def register(app: typer.Typer) -> None:
    app.command("profile-model")(profile_model)
