"""Robustness figures of the live gateway: engine faults, and load with bounded memory.

Run by hand (minutes; everything on loopback, emulated engines as `qlmctl emulate` processes):

    python bench/bench_faults.py                 # both parts
    python bench/bench_faults.py --faults-only   # per-fault figures
    python bench/bench_faults.py --load-only --queued 10000 --streams 1000

1. Faults. Two emulated engines (separate processes), a gateway in this process (policy qlm), a
   Poisson workload (half of it streamed); two seconds in, one fault: an engine killed for two
   seconds, hung for two seconds, answering 500 to 30 % of requests (from the start), slowed down
   four times, its process killed and restarted two seconds later, or both engines killed for three
   seconds (past `unavailable_timeout_s`). Per fault: requests sent, completed, retried, failed with
   a clear error (OpenAI-style body, or error event then [DONE]) and lost (must be 0).
2. Load. Two emulated engines with streams/2 batch slots each, a `qlmctl serve` gateway process, and
   this process as the client (qlmctl's own HTTP client, one connection per request):
   a. streams: `streams` long requests (the engines' slots), arriving evenly over `ramp` seconds so that
      all of them stream at once by the end, straight to the engines and then through the gateway: the
      latency the gateway adds at that concurrency (TTFT p50/p99; per request, its mean gap between
      tokens, p99; end to end p99);
   b. queued: `queued` requests at once through the gateway, twice, so that all but `streams` wait in
      its queues: none lost; the gateway process's memory (RSS) idle, at its peak and after each round
      (the second round must not grow it); the inter-token p99 of the streams running meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import yaml
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qlmctl.client.outcomes import Outcome, Tally, call  # noqa: E402
from qlmctl.emulator.testing import live_scenario_spec  # noqa: E402
from qlmctl.engines.http import Pool  # noqa: E402

FAULT_PROFILE = dict(base_s=0.01, per_prefill_token_s=1e-4, per_decode_seq_s=1e-3, per_context_token_s=0.0,
                     kv_blocks=4000, block_size=16, max_num_seqs=32, max_num_batched_tokens=4096, max_model_len=4096,
                     load_cold_s=1.0, load_warm_s=0.5)
FAULT_LIVE = dict(max_retries=2, first_token_timeout_s=2.0, inter_token_timeout_s=1.0, metrics_interval_s=0.2,
                  probe_interval_s=0.2, probe_timeout_s=0.5, unavailable_timeout_s=1.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class EngineProc:
    port: int
    argv: list[str]
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def faults(self, **faults) -> None:
        httpx.post(self.url + "/emulator/faults", json=faults, timeout=10).raise_for_status()


def emulator(profile_file: Path, speedup: float, stream_interval_s: float = 0.01) -> EngineProc:
    port = free_port()
    return EngineProc(port, [sys.executable, "-m", "qlmctl.cli", "emulate", "--profile", str(profile_file),
                             "--model", "m", "--port", str(port), "--speedup", str(speedup),
                             "--stream-interval", str(stream_interval_s)])


def wait_healthy(url: str, timeout_s: float = 60.0) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not healthy")


def body(i: int, n_out: int, stream: bool) -> dict:
    b = {"model": "m", "prompt": " ".join(f"w{j}" for j in range(8 + i % 9)), "max_tokens": n_out,
         "ignore_eos": True}
    if stream:
        b.update(stream=True, stream_options={"include_usage": True})
    return b


def exact(o: Outcome, n_out: int) -> bool:
    return o.completion_tokens == n_out and o.text == "".join(f" w{o.prompt_tokens + j}" for j in range(n_out))


# ---------------------------------------------------------------------------------------------------------------
# 1. faults


async def fault_run(name: str, engines: list[EngineProc], n: int, rate: float, n_out: int, speedup: float,
                    console: Console) -> dict:
    from qlmctl.gateway.server import Gateway
    from qlmctl.scenario import Scenario, ScenarioSpec

    for e in engines:
        if e.proc is None or e.proc.poll() is not None:
            e.start()
        wait_healthy(e.url)
        e.faults()
    spec = live_scenario_spec(FAULT_PROFILE, [(f"g{i}", "m", e.url) for i, e in enumerate(engines)],
                              speedup=speedup, **FAULT_LIVE)
    rng = np.random.default_rng(7)
    arrivals = np.cumsum(rng.exponential(1 / rate, n))
    loop = asyncio.get_running_loop()

    async def inject() -> None:
        e0, e1 = engines
        if name == "error_rate":
            e0.faults(error_rate=0.3, seed=1)
            return
        await asyncio.sleep(2.0)
        if name == "kill":
            await asyncio.to_thread(e0.faults, kill_after_s=0, down_for_s=2.0)
        elif name == "hang":
            await asyncio.to_thread(e0.faults, hang_after_s=0, down_for_s=2.0)
        elif name == "slowdown":
            await asyncio.to_thread(e0.faults, slowdown=4.0)
        elif name == "restart":
            await asyncio.to_thread(e0.kill)
            await asyncio.sleep(2.0)
            e0.start()
        elif name == "all_down":
            await asyncio.gather(asyncio.to_thread(e0.faults, kill_after_s=0, down_for_s=3.0),
                                 asyncio.to_thread(e1.faults, kill_after_s=0, down_for_s=3.0))

    async with Gateway(Scenario(ScenarioSpec.model_validate(spec)), "qlm", port=0) as gw:
        pool = Pool(gw.url, max_idle=n)
        t0 = loop.time()
        injector = asyncio.ensure_future(inject()) if name != "none" else None

        async def one(i: int) -> Outcome:
            await asyncio.sleep(max(0.0, t0 + arrivals[i] - loop.time()))
            return await call(pool, "/v1/completions", body(i, n_out, i % 2 == 0), timeout_s=120)

        outs = await asyncio.gather(*(one(i) for i in range(n)))
        if injector is not None:
            await injector
        await pool.aclose()
        retried, retries = gw.cluster.num_retried_requests, gw.cluster.num_retries
    t = Tally()
    inexact = 0
    for o in outs:
        t.add(o)
        inexact += o.kind == "completed" and not exact(o, n_out)
    if engines[0].proc is not None and engines[0].proc.poll() is not None:
        engines[0].start()
    row = dict(fault=name, sent=t.sent, completed=t.completed, retried=retried, retries=retries, failed=t.failed,
               lost=t.lost + inexact, statuses=", ".join(f"{k}: {v}" for k, v in sorted(t.by_status.items())))
    console.print(row, highlight=False)
    return row


async def faults_part(args: argparse.Namespace, console: Console, tmp: Path) -> list[dict]:
    prof = tmp / "fault-profile.yaml"
    prof.write_text(yaml.safe_dump(FAULT_PROFILE))
    engines = [emulator(prof, args.speedup) for _ in range(2)]
    rows = []
    try:
        for name in ("none", "kill", "hang", "error_rate", "slowdown", "restart", "all_down"):
            rows.append(await fault_run(name, engines, args.requests, args.rate, args.tokens, args.speedup, console))
    finally:
        for e in engines:
            e.kill()
    return rows


# ---------------------------------------------------------------------------------------------------------------
# 2. load


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def blast(url: str, n: int, n_out: int, gw_pid: int | None = None, ramp_s: float = 0.0,
                offset: int = 0) -> tuple[list[Outcome], dict]:
    """n streamed requests, at once or evenly over `ramp_s` seconds; per-request outcomes plus the
    gateway's peak RSS while they ran."""
    pool = Pool(url, max_idle=n)
    peak = 0.0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            if gw_pid is not None:
                peak = max(peak, rss_mb(gw_pid))
            await asyncio.sleep(0.05)

    sampler = asyncio.ensure_future(sample())
    t0 = time.monotonic()
    cpu0 = cpu_s(gw_pid) if gw_pid is not None else 0.0

    async def one(i: int) -> Outcome:
        if ramp_s:
            await asyncio.sleep(ramp_s * i / n)
        return await call(pool, "/v1/completions", body(offset + i, n_out, True),
                          {"x-slo-class": ("interactive", "batch")[i % 2]}, timeout_s=600)

    outs = await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.monotonic() - t0
    cpu = (cpu_s(gw_pid) - cpu0) if gw_pid is not None else 0.0
    done.set()
    await sampler
    await pool.aclose()
    return outs, {"wall_s": wall, "peak_rss_mb": peak, "gateway_cpu_s": cpu}


def latency(outs: list[Outcome], n_out: int) -> dict:
    ttft = np.array([o.ttft_s for o in outs if o.ttft_s is not None]) * 1e3
    # Mean gap per request from its first to its last token: the streaming rate it saw.
    itl = np.array([(o.e2e_s - o.ttft_s) / (n_out - 1) for o in outs if o.ttft_s is not None]) * 1e3
    e2e = np.array([o.e2e_s for o in outs if o.e2e_s is not None]) * 1e3
    return {"ttft_p50_ms": float(np.percentile(ttft, 50)), "ttft_p99_ms": float(np.percentile(ttft, 99)),
            "itl_p99_ms": float(np.percentile(itl, 99)), "e2e_p99_ms": float(np.percentile(e2e, 99))}


async def load_part(args: argparse.Namespace, console: Console, tmp: Path) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.queued + 2 * args.streams + 1000  # per process: the client, and the gateway
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, need)), hard))  # children inherit it
    if hard < need:
        console.print(f"[yellow]file descriptor limit {hard} < {need}: expect connection errors[/]")
    slots = args.streams // 2
    profile = dict(base_s=0.004, per_prefill_token_s=1e-6, per_decode_seq_s=2e-5, per_context_token_s=0.0,
                   kv_blocks=200_000, block_size=16, max_num_seqs=slots, max_num_batched_tokens=65536,
                   max_model_len=4096, load_cold_s=1.0, load_warm_s=0.5)
    prof = tmp / "load-profile.yaml"
    prof.write_text(yaml.safe_dump(profile))
    engines = [emulator(prof, args.load_speedup, stream_interval_s=0.02) for _ in range(2)]
    port = free_port()
    spec = live_scenario_spec(profile, [(f"g{i}", "m", e.url) for i, e in enumerate(engines)],
                              speedup=args.load_speedup, port=port, token_count="chunks",
                              queue_limit=args.queued, first_token_timeout_s=600, inter_token_timeout_s=120)
    sc_path = tmp / "load.yaml"
    sc_path.write_text(yaml.safe_dump(spec))
    gw = subprocess.Popen([sys.executable, "-m", "qlmctl.cli", "serve", "-s", str(sc_path), "--policy", args.policy],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    out: dict = {}
    try:
        for e in engines:
            e.start()
        for e in engines:
            wait_healthy(e.url)
        wait_healthy(url)
        n_out = args.stream_tokens
        console.print(f"streams: {args.streams} over {args.ramp:g} s, {n_out} tokens each, direct to the engines")
        half = args.streams // 2
        direct = await asyncio.gather(*(blast(e.url, half, n_out, ramp_s=args.ramp) for e in engines))
        d_outs = [o for outs, _ in direct for o in outs]
        console.print("streams: the same through the gateway")
        await blast(url, 200, 8)  # warm-up
        idle = rss_mb(gw.pid)
        g_outs, g_info = await blast(url, args.streams, n_out, gw.pid, ramp_s=args.ramp)
        d, g = latency(d_outs, n_out), latency(g_outs, n_out)
        out["streams"] = {"n": args.streams, "direct": d, "gateway": g, "gateway_cpu_s": g_info["gateway_cpu_s"],
                          "wall_s": g_info["wall_s"],
                          "added": {k: g[k] - d[k] for k in d},
                          "lost": sum(o.kind != "completed" or not exact(o, n_out) for o in g_outs)}
        console.print(out["streams"], highlight=False)
        n_out = args.load_tokens
        rounds = []
        for k in range(2):
            console.print(f"queued, round {k + 1}: {args.queued} at once through the gateway "
                          f"({args.streams} streaming)")
            q_outs, info = await blast(url, args.queued, n_out, gw.pid, offset=k)
            time.sleep(1.0)
            t = Tally()
            inexact = 0
            for o in q_outs:
                t.add(o)
                inexact += o.kind == "completed" and not exact(o, n_out)
            q = latency(q_outs, n_out)
            rounds.append({"n": args.queued, "completed": t.completed, "failed": t.failed, "lost": t.lost + inexact,
                           "wall_s": info["wall_s"], "gateway_cpu_s": info["gateway_cpu_s"], "rss_peak_mb": info["peak_rss_mb"], "rss_after_mb": rss_mb(gw.pid),
                           "itl_p99_ms": q["itl_p99_ms"]})
            console.print(rounds[-1], highlight=False)
        out["queued"] = {"rounds": rounds, "rss_idle_mb": idle,
                         "kb_per_queued_request": (rounds[0]["rss_peak_mb"] - idle) * 1024 / args.queued}
    finally:
        os.killpg(gw.pid, signal.SIGTERM)
        try:
            gw.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(gw.pid, signal.SIGKILL)
        for e in engines:
            e.kill()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faults-only", action="store_true")
    ap.add_argument("--load-only", action="store_true")
    ap.add_argument("--requests", type=int, default=300, help="requests per fault run")
    ap.add_argument("--rate", type=float, default=50.0, help="arrivals per wall second in the fault runs")
    ap.add_argument("--tokens", type=int, default=64, help="output tokens per request in the fault runs")
    ap.add_argument("--speedup", type=float, default=4.0, help="emulators' speed-up in the fault runs")
    ap.add_argument("--queued", type=int, default=10_000, help="requests sent at once in the load run")
    ap.add_argument("--streams", type=int, default=1_000, help="batch slots of the two engines together")
    ap.add_argument("--load-tokens", type=int, default=32, help="output tokens per queued request in the load run")
    ap.add_argument("--stream-tokens", type=int, default=300, help="output tokens per request of the streams run")
    ap.add_argument("--ramp", type=float, default=2.0, help="wall seconds over which the streams run's requests arrive")
    ap.add_argument("--load-speedup", type=float, default=1.0, help="emulators' speed-up in the load run")
    ap.add_argument("--policy", default="qlm")
    args = ap.parse_args()
    console = Console(width=150)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if not args.load_only:
            rows = asyncio.run(faults_part(args, console, tmp))
            table = Table(title=f"faults: {args.requests} requests each, max_retries {FAULT_LIVE['max_retries']}")
            for col in ("fault", "sent", "completed", "retried", "retries", "failed", "lost", "statuses"):
                table.add_column(col, justify="left" if col in ("fault", "statuses") else "right")
            for r in rows:
                table.add_row(*(str(r[c]) for c in ("fault", "sent", "completed", "retried", "retries", "failed",
                                                     "lost", "statuses")))
            console.print(table)
        if not args.faults_only:
            res = asyncio.run(load_part(args, console, tmp))
            table = Table(title=f"load: {args.queued:,} queued, {args.streams:,} streams (policy {args.policy})")
            table.add_column("figure")
            table.add_column("value", justify="right")
            s, q = res["streams"], res["queued"]
            for k in ("ttft_p50_ms", "ttft_p99_ms", "itl_p99_ms", "e2e_p99_ms"):
                table.add_row(f"{args.streams:,} streams: {k} direct / gateway / added",
                              f"{s['direct'][k]:.1f} / {s['gateway'][k]:.1f} / {s['added'][k]:+.1f}")
            table.add_row(f"{args.streams:,} streams: lost or inexact", str(s["lost"]))
            table.add_row(f"{args.streams:,} streams: gateway CPU s / wall s",
                          f"{s['gateway_cpu_s']:.1f} / {s['wall_s']:.1f}")
            for k, r in enumerate(q["rounds"]):
                table.add_row(f"{args.queued:,} queued, round {k + 1}: completed / failed / lost",
                              f"{r['completed']:,} / {r['failed']} / {r['lost']}")
                table.add_row(f"  gateway RSS peak / after, MB (idle {q['rss_idle_mb']:.0f})",
                              f"{r['rss_peak_mb']:.0f} / {r['rss_after_mb']:.0f}")
                table.add_row("  inter-token p99 while queued, ms; gateway CPU s / wall s",
                              f"{r['itl_p99_ms']:.1f}; {r['gateway_cpu_s']:.1f} / {r['wall_s']:.1f}")
            table.add_row("gateway memory per queued request (round 1 peak), KB", f"{q['kb_per_queued_request']:.1f}")
            console.print(table)


if __name__ == "__main__":
    main()
