"""Gateway overhead against emulated engines: added TTFT, sustained request rate, streamed tokens per second.

Processes: two emulated vLLM servers (each its own process, the simulator's engine model at a high
speed-up so that engine time is small), one `qlmctl serve` gateway process in front of them, and this
script as the load generator, which speaks HTTP/1.1 over raw asyncio streams so that the client costs
little next to what it measures. Everything runs on loopback on this machine.

1. Added TTFT: one request at a time (4 output tokens, streamed), alternating between an engine directly
   and the gateway; the difference of the TTFT percentiles (p50, p99).
2. Sustained request rate: a closed loop of C clients, each sending its next request (streamed, 4 output
   tokens) as soon as the last one ends, for a fixed time; completed requests per second.
3. Streamed tokens per second: S long streams (max_tokens 4000) through the gateway at once; output tokens
   received per second (the same directly to the engines gives the engines' own ceiling).
4. Burst (--burst B): B streams (--burst-tokens each) arriving evenly within --burst-window s, each on a
   connection of its own, first directly to the engines, then through the gateway; the difference of the
   TTFT percentiles, and the QLM core's decision latency (arrival to dispatch, from its /metrics) with
   --workers > 1.

--workers N runs the gateway as `qlmctl serve --workers N` (N relay processes and one QLM core). On a
host with enough CPUs, --cpus-gateway/--cpus-engines/--cpus-client (e.g. 0-8, 9-12, 13-15) pin each part
to CPUs of its own (sched_setaffinity; the gateway's workers inherit its set); --client-procs K spreads the
burst and token runs over K client processes.

    python bench/bench_gateway.py              # qlm policy, default sizes
    python bench/bench_gateway.py --policy fcfs --seconds 10
    python bench/bench_gateway.py --workers 2 --only ttft,burst --burst 200
    bash bench/device/gateway_load.sh          # the 16-core run: 2,000 streams, 8 workers vs 1
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
import yaml
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROFILE = yaml.safe_load((REPO / "scenarios" / "profiles" / "h200-llama-3.1-8b.yaml").read_text())
PROFILE.pop("provenance", None)
PROFILE.pop("engine_flags", None)  # how it was measured: not a profile field
PROFILE["max_num_seqs"] = 512
TARGETS = {"ttft_p50_ms": 2.0, "rps": 500.0, "tokens_per_s": 50_000.0,
           # issue #19, 16-core host, 8 relay workers, 2,000 streams within 2 s:
           "burst_p50_ms": 5.0, "burst_p99_ms": 25.0, "decision_p50_ms": 1.0}


# ----------------------------------------------------------------------------------------------- processes


def _emulator_main(port: int, speedup: float, stream_interval_s: float, cpus: set[int] | None = None,
                   max_num_seqs: int = 512) -> None:
    import uvicorn

    from qlmctl.emulator.server import create_app
    from simulator.profile import EngineProfile

    if cpus:
        os.sched_setaffinity(0, cpus)
    app = create_app(EngineProfile(model="m", **{**PROFILE, "max_num_seqs": max_num_seqs}), "m", speedup=speedup,
                     stream_interval_s=stream_interval_s)
    # uvicorn binds host:port itself, so the accepted sockets get TCP_NODELAY (see qlmctl.emulator.testing).
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, timeout_keep_alive=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_healthy(port: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            c = await Conn.open(port)
            status, _ = await c.get("/health")
            c.close()
            if status == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"nothing healthy on port {port}")


# ----------------------------------------------------------------------------------------------- raw client


class Conn:
    """One keep-alive HTTP/1.1 connection: POST with a streamed (chunked) answer, GET."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r, self.w = reader, writer

    @classmethod
    async def open(cls, port: int) -> "Conn":
        r, w = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        return cls(r, w)

    def close(self) -> None:
        self.w.close()

    async def get(self, path: str) -> tuple[int, bytes]:
        self.w.write(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
        return await self._response(None)

    async def post(self, path: str, body: bytes, on_data=None) -> tuple[int, bytes]:
        head = (f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\n\r\n").encode()
        self.w.write(head + body)
        return await self._response(on_data)

    async def _response(self, on_data) -> tuple[int, bytes]:
        head = await self.r.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        hdrs = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(b":") for ln in lines[1:] if ln)}
        if hdrs.get(b"transfer-encoding") == b"chunked":
            parts = []
            while True:
                size = int((await self.r.readuntil(b"\r\n"))[:-2], 16)
                if size == 0:
                    await self.r.readuntil(b"\r\n")
                    break
                data = (await self.r.readexactly(size + 2))[:-2]
                if on_data is not None:
                    on_data(data)
                else:
                    parts.append(data)
            return status, b"".join(parts)
        n = int(hdrs.get(b"content-length", b"0"))
        data = await self.r.readexactly(n) if n else b""
        if on_data is not None:
            on_data(data)
        return status, data


TOKEN = b'"text":" w'


async def one_stream(conn: Conn, max_tokens: int, salt: int, options: dict | None = None) -> tuple[float, int]:
    """TTFT (s) and tokens of one streamed completion."""
    body = {"model": "m", "prompt": f"w{salt} w1 w2 w3 w4 w5 w6 w7", "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True}
    if options:
        body["stream_options"] = options
    body = orjson.dumps(body)
    t0 = time.perf_counter()
    first: list[float] = []
    count = [0]

    def on_data(data: bytes) -> None:
        k = data.count(TOKEN)
        if k and not first:
            first.append(time.perf_counter())
        count[0] += k

    status, _ = await conn.post("/v1/completions", body, on_data)
    if status != 200:
        raise RuntimeError(f"HTTP {status}")
    return (first[0] - t0 if first else float("nan")), count[0]


# ----------------------------------------------------------------------------------------------- measurements


async def added_ttft(direct_port: int, gw_port: int, n: int) -> dict[str, float]:
    d, g = await Conn.open(direct_port), await Conn.open(gw_port)
    td, tg = [], []
    for i in range(20):  # warm up both paths
        await one_stream(d, 4, i)
        await one_stream(g, 4, i)
    for i in range(n):
        td.append((await one_stream(d, 4, i))[0])
        tg.append((await one_stream(g, 4, i))[0])
    d.close()
    g.close()
    td_ms, tg_ms = np.array(td) * 1e3, np.array(tg) * 1e3
    return {
        "direct_p50": float(np.percentile(td_ms, 50)), "direct_p99": float(np.percentile(td_ms, 99)),
        "gw_p50": float(np.percentile(tg_ms, 50)), "gw_p99": float(np.percentile(tg_ms, 99)),
        "added_p50": float(np.percentile(tg_ms, 50) - np.percentile(td_ms, 50)),
        "added_p99": float(np.percentile(tg_ms, 99) - np.percentile(td_ms, 99)),
    }


async def request_rate(port: int, clients: int, seconds: float) -> dict[str, float]:
    conns = [await Conn.open(port) for _ in range(clients)]
    done = 0
    lat: list[float] = []
    stop = time.perf_counter() + seconds

    async def loop(c: Conn, k: int) -> None:
        nonlocal done
        i = 0
        while time.perf_counter() < stop:
            t = time.perf_counter()
            await one_stream(c, 4, k * 100000 + i)
            lat.append(time.perf_counter() - t)
            done += 1
            i += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(loop(c, k) for k, c in enumerate(conns)))
    wall = time.perf_counter() - t0
    for c in conns:
        c.close()
    return {"rps": done / wall, "p50_latency_ms": float(np.percentile(lat, 50) * 1e3), "requests": done}


async def token_rate(ports: list[int], streams: int, max_tokens: int, options: dict | None = None) -> dict[str, float]:
    conns = [await Conn.open(ports[i % len(ports)]) for i in range(streams)]
    t0 = time.perf_counter()
    res = await asyncio.gather(*(one_stream(c, max_tokens, i, options) for i, c in enumerate(conns)))
    wall = time.perf_counter() - t0
    for c in conns:
        c.close()
    tokens = sum(k for _, k in res)
    if tokens != streams * max_tokens:
        raise RuntimeError(f"got {tokens} tokens, expected {streams * max_tokens}")
    return {"tokens_per_s": tokens / wall, "tokens": tokens, "wall_s": wall}


async def burst(ports: list[int], streams: int, window_s: float, max_tokens: int, start_at: float,
                offset: int = 0, every: int = 1, options: dict | None = None) -> list[float]:
    """TTFTs (s) of streams k = offset, offset + every, ... < `streams`, stream k sent at start_at +
    k * window_s / streams (time.time()), each on a new connection, spread over `ports`."""
    async def one(k: int) -> float:
        await asyncio.sleep(max(0.0, start_at + k * window_s / streams - time.time()))
        c = await Conn.open(ports[k % len(ports)])
        t0 = time.perf_counter()
        try:
            ttft, n = await one_stream(c, max_tokens, 1_000_000 + k, options)
        finally:
            c.close()
        if n != max_tokens:
            raise RuntimeError(f"got {n} tokens, expected {max_tokens}")
        return ttft if ttft == ttft else time.perf_counter() - t0

    return list(await asyncio.gather(*(one(k) for k in range(offset, streams, every))))


def _client_proc(kind: str, cpus: set[int] | None, a: tuple) -> list[float] | dict[str, float]:
    if cpus:
        os.sched_setaffinity(0, cpus)
    if kind == "burst":
        return asyncio.run(burst(*a))
    return asyncio.run(token_rate(*a))


async def in_procs(procs: int, cpus: set[int] | None, kind: str, args_of) -> list:
    """Run `kind` in `procs` client processes (args_of(i) gives process i's arguments); their results."""
    if procs <= 1:
        return [await (burst(*args_of(0)) if kind == "burst" else token_rate(*args_of(0)))]
    from concurrent.futures import ProcessPoolExecutor

    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(procs, mp_context=mp.get_context("spawn")) as ex:
        return list(await asyncio.gather(*(loop.run_in_executor(ex, _client_proc, kind, cpus, args_of(i))
                                           for i in range(procs))))


async def burst_both(args: argparse.Namespace, ports: list[int], gw_port: int, upstream: dict) -> dict[str, float]:
    """The burst directly to the engines, then through the gateway: TTFT percentiles and their difference."""
    out: dict[str, float] = {}
    for name, targets, opts in (("direct", ports, upstream), ("gw", [gw_port], None)):
        start = time.time() + 1.0 + 0.2 * args.client_procs  # the client processes start first
        parts = await in_procs(args.client_procs, args.cpus_client, "burst", lambda i: (
            targets, args.burst, args.burst_window, args.burst_tokens, start, i, args.client_procs, opts))
        ms = np.array([t for p in parts for t in p]) * 1e3
        out[f"{name}_p50"] = float(np.percentile(ms, 50))
        out[f"{name}_p99"] = float(np.percentile(ms, 99))
        await asyncio.sleep(1.0)
    out["added_p50"] = out["gw_p50"] - out["direct_p50"]
    out["added_p99"] = out["gw_p99"] - out["direct_p99"]
    return out


def histogram_quantiles(text: str, name: str, qs=(0.5, 0.99)) -> dict[str, float]:
    """Quantiles (ms, linear within a bucket) of a Prometheus histogram in /metrics text."""
    buckets: list[tuple[float, float]] = []
    for line in text.splitlines():
        if line.startswith(name + "_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float(le), float(line.rsplit(" ", 1)[1])))
    buckets.sort()
    if not buckets or buckets[-1][1] == 0:
        return {}
    total = buckets[-1][1]
    out = {}
    for q in qs:
        want, lo, below = q * total, 0.0, 0.0
        for le, cum in buckets:
            if cum >= want:
                hi = le if le != float("inf") else lo
                frac = (want - below) / (cum - below) if cum > below else 1.0
                out[f"p{round(q * 100)}_ms"] = (lo + (hi - lo) * frac) * 1e3
                break
            lo, below = le, cum
    out["count"] = total
    return out


# ----------------------------------------------------------------------------------------------- main


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its children (the relay workers) so far (Linux /proc)."""
    total = 0.0
    for p in [pid, *_children(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (FileNotFoundError, ValueError):
        return []


def parse_cpus(text: str | None) -> set[int] | None:
    """'0-3,8' -> {0, 1, 2, 3, 8}."""
    if not text:
        return None
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


async def run(args: argparse.Namespace, console: Console) -> dict[str, dict[str, float]]:
    ctx = mp.get_context("spawn")
    ports = [free_port() for _ in range(args.engines)]
    emus = [ctx.Process(target=_emulator_main, args=(p, args.speedup, 0.01, args.cpus_engines, args.max_num_seqs),
                        daemon=True) for p in ports]
    for e in emus:
        e.start()
    if args.cpus_client:
        os.sched_setaffinity(0, args.cpus_client)
    gw_port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    spec = {
        "name": "bench-gateway",
        "models": {"m": {"profile": {**PROFILE, "max_num_seqs": args.max_num_seqs}}},
        "cluster": {"instances": [{"name": f"g{i}", "model": "m"} for i in range(len(ports))]},
        "slo_classes": {"interactive": {"ttft_s": 5.0}, "batch": {"ttft_s": 600.0}},
        "workload": {"synthetic": {"rate_rps": 1, "num_requests": 1, "prompt_tokens": 8, "output_tokens": 8}},
        "scheduler": {"policy": args.policy},
        "live": {"engines": [{"instance": f"g{i}", "model": "m", "url": f"http://127.0.0.1:{p}"}
                             for i, p in enumerate(ports)], "port": gw_port, "speedup": args.speedup,
                 "token_count": args.token_count, "tokenizer": args.tokenizer},
    }
    (tmp / "s.yaml").write_text(yaml.safe_dump(spec))
    # What the gateway asks the engines for, so that the direct runs cost the engines the same.
    upstream = {"include_usage": True, "continuous_usage_stats": args.token_count == "usage"}
    gw = None
    try:
        for p in ports:
            await wait_healthy(p)
        cpus = args.cpus_gateway
        gw = subprocess.Popen([sys.executable, "-m", "qlmctl.cli", "serve", "-s", str(tmp / "s.yaml"),
                               "--workers", str(args.workers)],
                              stdout=subprocess.DEVNULL, stderr=open(tmp / "gateway.log", "wb"),
                              start_new_session=True, preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        await wait_healthy(gw_port)
        out: dict[str, dict[str, float]] = {}
        only = set(args.only.split(","))
        console.print(f"{len(ports)} engines on {ports} (x{args.speedup:g}), gateway ({args.policy}, token count "
                      f"{args.token_count}, tokenizer {args.tokenizer}, {args.workers} worker(s)) on {gw_port}; {os.cpu_count()} CPU(s); "
                      f"CPUs gateway {_cpus(args.cpus_gateway)}, engines {_cpus(args.cpus_engines)}, client "
                      f"{_cpus(args.cpus_client)}", highlight=False)
        if "ttft" in only:
            out["ttft"] = await added_ttft(ports[0], gw_port, args.ttft_samples)
            console.print(f"  TTFT (ms): {_fmt(out['ttft'])}", highlight=False)
        if "rate" in only:
            c0 = cpu_s(gw.pid)
            out["rate"] = await request_rate(gw_port, args.clients, args.seconds)
            out["rate"]["gw_cpu_ms_per_request"] = (cpu_s(gw.pid) - c0) / out["rate"]["requests"] * 1e3
            console.print(f"  request rate: {_fmt(out['rate'])}", highlight=False)
        if "tokens" in only:
            k = args.client_procs
            parts = await in_procs(k, args.cpus_client, "tokens", lambda i: (
                ports, args.streams // k, args.stream_tokens, upstream))
            out["tokens_direct"] = _sum_rates(parts)
            c0 = cpu_s(gw.pid)
            parts = await in_procs(k, args.cpus_client, "tokens", lambda i: (
                [gw_port], args.streams // k, args.stream_tokens, None))
            out["tokens"] = _sum_rates(parts)
            out["tokens"]["gw_cpu_us_per_token"] = (cpu_s(gw.pid) - c0) / out["tokens"]["tokens"] * 1e6
            console.print(f"  tokens: gateway {_fmt(out['tokens'])}; direct {_fmt(out['tokens_direct'])}",
                          highlight=False)
        if "burst" in only:
            c0 = cpu_s(gw.pid)
            out["burst"] = await burst_both(args, ports, gw_port, upstream)
            out["burst"]["gw_cpu_s"] = cpu_s(gw.pid) - c0
            c = await Conn.open(gw_port)
            _, text = await c.get("/metrics")
            c.close()
            out["decision"] = histogram_quantiles(text.decode(), "qlm_core_decision_seconds")
            console.print(f"  burst of {args.burst} streams in {args.burst_window:g} s (ms): {_fmt(out['burst'])}; "
                          f"core decision: {_fmt(out['decision']) or 'n/a (--workers 1)'}", highlight=False)
        return out
    finally:
        if gw is not None:
            gw.terminate()
            gw.wait(10)
        for e in emus:
            e.terminate()
            e.join(5)


def _sum_rates(parts: list[dict[str, float]]) -> dict[str, float]:
    """Token runs of several client processes as one: tokens over the longest wall time."""
    tokens = sum(p["tokens"] for p in parts)
    wall = max(p["wall_s"] for p in parts)
    return {"tokens_per_s": tokens / wall, "tokens": tokens, "wall_s": wall}


def _cpus(c: set[int] | None) -> str:
    return "all" if not c else f"{min(c)}-{max(c)}" if len(c) == max(c) - min(c) + 1 else ",".join(map(str, sorted(c)))


def _fmt(d: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:,.2f}" if isinstance(v, float) else f"{k} {v:,}" for k, v in d.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="qlm")
    ap.add_argument("--token-count", choices=("usage", "chunks"), default="usage",
                    help="the gateway's live.token_count (usage: exact, asks engines for usage in every chunk)")
    ap.add_argument("--tokenizer", default="words",
                    help="the gateway's live.tokenizer (words; engine: one /tokenize call per new prompt)")
    ap.add_argument("--speedup", type=float, default=100.0, help="emulated engines' speed-up")
    ap.add_argument("--ttft-samples", type=int, default=300)
    ap.add_argument("--clients", type=int, default=64, help="closed-loop clients for the request rate")
    ap.add_argument("--seconds", type=float, default=8.0, help="duration of the request-rate run, s")
    ap.add_argument("--streams", type=int, default=32, help="concurrent long streams for tokens/s")
    ap.add_argument("--stream-tokens", type=int, default=4000)
    ap.add_argument("--workers", type=int, default=1, help="qlmctl serve --workers (relay processes)")
    ap.add_argument("--engines", type=int, default=2, help="emulated engines (one process each)")
    ap.add_argument("--max-num-seqs", type=int, default=512, help="each engine's batch size")
    ap.add_argument("--only", default="ttft,rate,tokens", help="measurements, comma-separated: ttft,rate,tokens,burst")
    ap.add_argument("--burst", type=int, default=2000, help="streams in the burst measurement")
    ap.add_argument("--burst-window", type=float, default=2.0, help="s within which the burst's streams arrive")
    ap.add_argument("--burst-tokens", type=int, default=32, help="output tokens of each burst stream")
    ap.add_argument("--client-procs", type=int, default=1, help="client processes for the burst and token runs")
    ap.add_argument("--cpus-gateway", type=parse_cpus, default=None, help="CPUs of the gateway (core + workers)")
    ap.add_argument("--cpus-engines", type=parse_cpus, default=None, help="CPUs of the emulated engines")
    ap.add_argument("--cpus-client", type=parse_cpus, default=None, help="CPUs of the load generator")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = ap.parse_args()
    console = Console()
    r = asyncio.run(run(args, console))
    shared = "shared by all processes" if not (args.cpus_gateway or args.cpus_engines or args.cpus_client) else "split"
    t = Table(title=f"gateway overhead ({args.policy}, {args.workers} worker(s), token count {args.token_count}, "
                    f"{args.engines} emulated engines x{args.speedup:g}, loopback, {os.cpu_count()} CPUs {shared})")
    for col in ("figure", "measured", "target", "met"):
        t.add_column(col, justify="right" if col != "figure" else "left")

    def row(name: str, value: float, target: float, fmt: str, lower_is_better: bool) -> None:
        ok = value <= target if lower_is_better else value >= target
        t.add_row(name, format(value, fmt), ("<= " if lower_is_better else ">= ") + format(target, fmt),
                  "[green]yes[/]" if ok else "[red]no[/]")

    if "ttft" in r:
        tt = r["ttft"]
        row("added TTFT p50 (ms)", tt["added_p50"], TARGETS["ttft_p50_ms"], ",.2f", True)
        t.add_row("added TTFT p99 (ms)", f"{tt['added_p99']:,.2f}", "", "")
        t.add_row("  TTFT p50 direct / via gateway (ms)", f"{tt['direct_p50']:.2f} / {tt['gw_p50']:.2f}", "", "")
    if "rate" in r:
        rate = r["rate"]
        row("sustained requests/s", rate["rps"], TARGETS["rps"], ",.0f", False)
        t.add_row("  gateway CPU per request (ms)", f"{rate['gw_cpu_ms_per_request']:.2f}", "", "")
    if "tokens" in r:
        tok = r["tokens"]
        row("streamed tokens/s", tok["tokens_per_s"], TARGETS["tokens_per_s"], ",.0f", False)
        t.add_row("  gateway CPU per token (us)", f"{tok['gw_cpu_us_per_token']:.2f}", "", "")
        t.add_row("  tokens/s direct to the engines", f"{r['tokens_direct']['tokens_per_s']:,.0f}", "", "")
    if "burst" in r:
        b = r["burst"]
        row(f"burst {args.burst} in {args.burst_window:g} s: added TTFT p50 (ms)", b["added_p50"], TARGETS["burst_p50_ms"],
            ",.2f", True)
        row("  added TTFT p99 (ms)", b["added_p99"], TARGETS["burst_p99_ms"], ",.2f", True)
        t.add_row("  TTFT p50 / p99 direct (ms)", f"{b['direct_p50']:.2f} / {b['direct_p99']:.2f}", "", "")
        t.add_row("  TTFT p50 / p99 via gateway (ms)", f"{b['gw_p50']:.2f} / {b['gw_p99']:.2f}", "", "")
        if r.get("decision"):
            row("  core decision latency p50 (ms)", r["decision"]["p50_ms"], TARGETS["decision_p50_ms"], ",.3f", True)
    console.print(t)
    if args.json is not None:
        args.json.write_text(orjson.dumps({"args": {k: (sorted(v) if isinstance(v, set) else
                                                         str(v) if isinstance(v, Path) else v)
                                                     for k, v in vars(args).items()}, "results": r},
                                          option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
