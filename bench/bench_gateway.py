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

    python bench/bench_gateway.py              # qlm policy, default sizes
    python bench/bench_gateway.py --policy fcfs --seconds 10
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
PROFILE.pop("engine_flags", None)  # what the profile was measured with: not a field of the engine model
PROFILE["max_num_seqs"] = 512
TARGETS = {"ttft_p50_ms": 2.0, "rps": 500.0, "tokens_per_s": 50_000.0}


# ----------------------------------------------------------------------------------------------- processes


def _emulator_main(port: int, speedup: float, stream_interval_s: float) -> None:
    import uvicorn

    from qlmctl.emulator.server import create_app
    from simulator.profile import EngineProfile

    app = create_app(EngineProfile(model="m", **PROFILE), "m", speedup=speedup, stream_interval_s=stream_interval_s)
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


# ----------------------------------------------------------------------------------------------- main


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(args: argparse.Namespace, console: Console) -> dict[str, dict[str, float]]:
    ctx = mp.get_context("spawn")
    ports = [free_port(), free_port()]
    emus = [ctx.Process(target=_emulator_main, args=(p, args.speedup, 0.01), daemon=True) for p in ports]
    for e in emus:
        e.start()
    gw_port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    spec = {
        "name": "bench-gateway",
        "models": {"m": {"profile": PROFILE}},
        "cluster": {"instances": [{"name": "g0", "model": "m"}, {"name": "g1", "model": "m"}]},
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
        gw = subprocess.Popen([sys.executable, "-m", "qlmctl.cli", "serve", "-s", str(tmp / "s.yaml")],
                              stdout=subprocess.DEVNULL, stderr=open(tmp / "gateway.log", "wb"),
                              start_new_session=True)
        await wait_healthy(gw_port)
        out: dict[str, dict[str, float]] = {}
        console.print(f"engines on {ports} (x{args.speedup:g}), gateway ({args.policy}, token count "
                      f"{args.token_count}, tokenizer {args.tokenizer}) on {gw_port}; {os.cpu_count()} CPU(s)",
                      highlight=False)
        out["ttft"] = await added_ttft(ports[0], gw_port, args.ttft_samples)
        console.print(f"  TTFT (ms): {_fmt(out['ttft'])}", highlight=False)
        c0 = cpu_s(gw.pid)
        out["rate"] = await request_rate(gw_port, args.clients, args.seconds)
        out["rate"]["gw_cpu_ms_per_request"] = (cpu_s(gw.pid) - c0) / out["rate"]["requests"] * 1e3
        console.print(f"  request rate: {_fmt(out['rate'])}", highlight=False)
        out["tokens_direct"] = await token_rate(ports, args.streams, args.stream_tokens, upstream)
        c0 = cpu_s(gw.pid)
        out["tokens"] = await token_rate([gw_port], args.streams, args.stream_tokens)
        out["tokens"]["gw_cpu_us_per_token"] = (cpu_s(gw.pid) - c0) / out["tokens"]["tokens"] * 1e6
        console.print(f"  tokens: gateway {_fmt(out['tokens'])}; direct {_fmt(out['tokens_direct'])}",
                      highlight=False)
        return out
    finally:
        if gw is not None:
            gw.terminate()
            gw.wait(10)
        for e in emus:
            e.terminate()
            e.join(5)


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
    args = ap.parse_args()
    console = Console()
    r = asyncio.run(run(args, console))
    t = Table(title=f"gateway overhead ({args.policy}, token count {args.token_count}, emulated engines "
                    f"x{args.speedup:g}, loopback, {os.cpu_count()} CPUs shared by all processes)")
    for col in ("figure", "measured", "target", "met"):
        t.add_column(col, justify="right" if col != "figure" else "left")

    def row(name: str, value: float, target: float, fmt: str, lower_is_better: bool) -> None:
        ok = value <= target if lower_is_better else value >= target
        t.add_row(name, format(value, fmt), ("<= " if lower_is_better else ">= ") + format(target, fmt),
                  "[green]yes[/]" if ok else "[red]no[/]")

    tt, rate, tok = r["ttft"], r["rate"], r["tokens"]
    row("added TTFT p50 (ms)", tt["added_p50"], TARGETS["ttft_p50_ms"], ",.2f", True)
    t.add_row("added TTFT p99 (ms)", f"{tt['added_p99']:,.2f}", "", "")
    t.add_row("  TTFT p50 direct / via gateway (ms)", f"{tt['direct_p50']:.2f} / {tt['gw_p50']:.2f}", "", "")
    row("sustained requests/s", rate["rps"], TARGETS["rps"], ",.0f", False)
    t.add_row("  gateway CPU per request (ms)", f"{rate['gw_cpu_ms_per_request']:.2f}", "", "")
    row("streamed tokens/s", tok["tokens_per_s"], TARGETS["tokens_per_s"], ",.0f", False)
    t.add_row("  gateway CPU per token (us)", f"{tok['gw_cpu_us_per_token']:.2f}", "", "")
    t.add_row("  tokens/s direct to the engines", f"{r['tokens_direct']['tokens_per_s']:,.0f}", "", "")
    console.print(t)


if __name__ == "__main__":
    main()
