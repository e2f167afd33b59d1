"""The gateway against hostile or careless clients and operators: the figures of docs/robustness.md.

Run by hand (minutes; everything on loopback, emulated engines and the gateway as processes of their own):

    python bench/bench_hostile.py                  # every case
    python bench/bench_hostile.py sockets stall    # some of them

Cases:

- sockets: 20,000 connections that never finish a request (half send nothing, half part of their headers),
  opened by two client processes, against a `qlmctl serve` gateway (default settings: header timeout 10 s,
  connection limit 3/4 of the descriptor limit). Meanwhile this process polls /health and sends ordinary
  requests. Figures: /health answers, ordinary requests served, how soon the gateway closed each half-open
  connection itself, its log lines.
- stall: 20 streams through the gateway on two engines; one engine process is SIGSTOPped mid-answer
  (inter_token_timeout_s 5, first_token_timeout_s 20). Figure: the longest gap a client saw (must be within
  inter_token_timeout + 1 s), every answer complete and exact.
- bodies: 12 requests with 30 MB prompts at once, the bodies' budget 256 MiB (total and per client). Figures:
  admitted / refused, the gateway's memory (RSS) idle and at its peak; again with a budget that admits them
  all (1 GiB), for the memory a held body costs.
- prompt: 30 MB prompts (one refused as over the context, one forwarded to an engine with a huge context)
  sent by another process while 40 streams run. Figure: the longest gap between two tokens of the other
  streams, without and with the big prompts.
- sigkill: `qlmctl serve --launch` (two emulated engines) killed with SIGKILL. Figure: seconds until no
  engine process is left.
- errors: 30 % of answers 500 on one of two engines (bench_faults.py's error-rate run, 300 requests).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qlmctl.emulator.testing import live_scenario_spec  # noqa: E402
from qlmctl.engines.http import Pool, sse_data  # noqa: E402

PROFILE = dict(base_s=0.01, per_prefill_token_s=1e-5, per_decode_seq_s=1e-3, per_context_token_s=0.0,
               kv_blocks=20000, block_size=16, max_num_seqs=64, max_num_batched_tokens=8192, max_model_len=4096,
               load_cold_s=1.0, load_warm_s=0.5)
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Stack:
    """Emulator processes and a gateway process on loopback."""

    def __init__(self, tmp: Path, profile: dict, models: tuple[str, ...] = ("m", "m"), speedup: float = 1.0,
                 **live) -> None:
        self.tmp = tmp
        self.profile = profile
        prof = tmp / "profile.yaml"
        prof.write_text(yaml.safe_dump(profile))
        self.engine_ports = [free_port() for _ in models]
        self.engines = [subprocess.Popen(
            [sys.executable, "-m", "qlmctl.cli", "emulate", "--profile", str(prof), "--model", m, "--port",
             str(p), "--speedup", str(speedup)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True) for m, p in zip(models, self.engine_ports)]
        self.port = free_port()
        spec = live_scenario_spec(profile, [(f"g{i}", m, f"http://127.0.0.1:{p}")
                                            for i, (m, p) in enumerate(zip(models, self.engine_ports))],
                                  speedup=speedup, port=self.port, **live)
        spec["slo_classes"] = {"interactive": {"ttft_s": 5.0}, "batch": {"ttft_s": 600.0}}
        sc = tmp / "gateway.yaml"
        sc.write_text(yaml.safe_dump(spec))
        self.log_path = tmp / "gateway.log"
        self._log = open(self.log_path, "wb")
        for p in self.engine_ports:
            wait_http(f"http://127.0.0.1:{p}/health")
        self.gateway = subprocess.Popen([sys.executable, "-m", "qlmctl.cli", "serve", "-s", str(sc), "--policy",
                                         "fcfs"], env=ENV, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        wait_http(self.url + "/health")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_lines(self) -> list[str]:
        self._log.flush()
        return self.log_path.read_text(errors="replace").splitlines()

    def close(self) -> None:
        for p in [self.gateway, *self.engines]:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGCONT)
                    os.killpg(p.pid, signal.SIGTERM)
                    p.wait(20)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    os.killpg(p.pid, signal.SIGKILL)
        self._log.close()


def wait_http(url: str, timeout_s: float = 60.0) -> None:
    import httpx

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not up")


def prompt(n: int, start: int = 0) -> str:
    return " ".join(f"w{start + j}" for j in range(n))


async def stream_gaps(pool: Pool, body: dict, t_end: list[float] | None = None) -> tuple[list[float], str, int]:
    """Stream one completion: (arrival times of its chunks with text, its text, status)."""
    times: list[float] = []
    text = ""
    resp = await pool.request("POST", "/v1/completions", orjson.dumps({**body, "stream": True}),
                              [("content-type", "application/json")])
    try:
        if resp.status != 200:
            await resp.read()
            return times, text, resp.status
        async for payloads in sse_data(resp):
            now = time.monotonic()
            for data in payloads:
                if data == b"[DONE]":
                    continue
                ev = orjson.loads(data)
                for c in ev.get("choices") or ():
                    if c.get("text"):
                        text += c["text"]
                        times.append(now)
    finally:
        resp.close()
    return times, text, 200


def max_gap(times: list[float]) -> float:
    return max(np.diff(times)) if len(times) > 1 else 0.0


# ---------------------------------------------------------------------------------------------------------------
# sockets


async def flood_worker(host: str, port: int, n: int, partial: float, wait_s: float) -> dict:
    """Open n connections that never finish a request; report when the server closed each."""
    opened: list[tuple[float, asyncio.StreamReader, asyncio.StreamWriter, bool]] = []
    failed = 0
    sem = asyncio.Semaphore(500)

    async def one(i: int) -> None:
        nonlocal failed
        async with sem:
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
            except (OSError, TimeoutError):
                failed += 1
                return
        half = i < n * partial
        if half:
            w.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-typ")
        opened.append((time.monotonic(), r, w, half))

    t0 = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(n)))
    t_open = time.monotonic() - t0

    async def closed_after(t: float, r: asyncio.StreamReader) -> tuple[float | None, bytes]:
        data = b""
        try:
            async with asyncio.timeout(max(0.1, t + wait_s - time.monotonic())):
                while chunk := await r.read(4096):
                    data += chunk
        except TimeoutError:
            return None, data
        except OSError:
            pass
        return time.monotonic() - t, data

    res = await asyncio.gather(*(closed_after(t, r) for t, r, _, _ in opened))
    for _, _, w, _ in opened:
        w.close()
    closed = [c for c, _ in res if c is not None]
    answered_408 = sum(d.startswith(b"HTTP/1.1 408") for _, d in res)
    return {"opened": len(opened), "connect_failed": failed, "open_s": t_open, "closed": len(closed),
            "still_open": len(res) - len(closed), "closed_s_max": max(closed) if closed else None,
            "closed_s_p50": float(np.median(closed)) if closed else None, "answered_408": answered_408}


def case_sockets(tmp: Path, n: int = 20_000) -> dict:
    import httpx

    stack = Stack(tmp, PROFILE)
    try:
        lines0 = len(stack.log_lines())
        workers = [subprocess.Popen([sys.executable, __file__, "--flood-worker", str(stack.port), str(n // 2)],
                                    env=ENV, stdout=subprocess.PIPE, text=True) for _ in range(2)]
        health: dict[int, int] = {}
        served, statuses, lat = 0, {}, []
        t0 = time.monotonic()
        with httpx.Client(base_url=stack.url, timeout=30, limits=httpx.Limits(max_keepalive_connections=0)) as c:
            while time.monotonic() - t0 < 25:
                try:
                    h = c.get("/health").status_code
                except httpx.HTTPError:
                    h = -1
                health[h] = health.get(h, 0) + 1
                t = time.monotonic()
                try:
                    r = c.post("/v1/completions", json={"model": "m", "prompt": prompt(8), "max_tokens": 8})
                    s = r.status_code
                except httpx.HTTPError as e:
                    s = type(e).__name__
                lat.append(time.monotonic() - t)
                statuses[s] = statuses.get(s, 0) + 1
                served += s == 200
                time.sleep(0.1)
            metrics = c.get("/metrics").text
        results = [json.loads(w.communicate(timeout=120)[0]) for w in workers]
        closed = {line.split('reason="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
                  for line in metrics.splitlines() if line.startswith("qlm_client_connections_closed_total{")}
        lines = stack.log_lines()[lines0:]
        return {"sockets": n, "flood_workers": results, "health": health, "requests": statuses,
                "request_latency_p50_ms": float(np.median(lat)) * 1e3,
                "request_latency_max_ms": float(max(lat)) * 1e3, "closed_by_gateway": closed,
                "gateway_log_lines": len(lines), "gateway_log_sample": lines[:4],
                "gateway_alive": stack.gateway.poll() is None}
    finally:
        stack.close()


# ---------------------------------------------------------------------------------------------------------------
# stall


def case_stall(tmp: Path) -> dict:
    inter, first = 5.0, 20.0
    stack = Stack(tmp, PROFILE, inter_token_timeout_s=inter, first_token_timeout_s=first, metrics_interval_s=0.5)
    try:
        async def run() -> dict:
            pool = Pool(stack.url, max_idle=64)
            n, n_out = 20, 600  # ~1 token per 11 ms (one engine step): ~7 s each
            tasks = [asyncio.ensure_future(stream_gaps(pool, {"model": "m", "prompt": prompt(5 + i),
                                                              "max_tokens": n_out, "ignore_eos": True}))
                     for i in range(n)]
            await asyncio.sleep(1.0)
            stopped = time.monotonic()
            os.killpg(stack.engines[0].pid, signal.SIGSTOP)
            outs = await asyncio.gather(*tasks)
            await pool.aclose()
            os.killpg(stack.engines[0].pid, signal.SIGCONT)
            gaps = [max_gap(t) for t, _, _ in outs]
            exact = sum(text == "".join(f" w{5 + i + 1 + j}" for j in range(n_out)) for i, (_, text, _) in
                        enumerate(outs))
            stalled = [g for g in gaps if g > 1.0]
            return {"streams": n, "inter_token_timeout_s": inter, "first_token_timeout_s": first,
                    "complete_and_exact": exact, "streams_on_stopped_engine": len(stalled),
                    "longest_gap_s": max(gaps), "gaps_over_1s": sorted(round(g, 2) for g in stalled),
                    "stopped_at": stopped}

        return asyncio.run(run())
    finally:
        stack.close()


# ---------------------------------------------------------------------------------------------------------------
# bodies


BIG_PROFILE = {**PROFILE, "max_model_len": 2_000_000, "kv_blocks": 400_000, "max_num_batched_tokens": 65536}


def big_prompt(mb: float, word: int = 1000) -> str:
    n = int(mb * 1e6 / (word + 1))
    return " ".join("w" + str(j).rjust(word - 1, "0") for j in range(n))


def case_bodies(tmp: Path, budget_mib: int) -> dict:
    stack = Stack(tmp, BIG_PROFILE, max_body_bytes_in_flight=budget_mib << 20,
                  max_client_body_bytes_in_flight=budget_mib << 20, first_token_timeout_s=600,
                  inter_token_timeout_s=120)
    try:
        raw = orjson.dumps({"model": "m", "prompt": big_prompt(30), "max_tokens": 200, "ignore_eos": True})
        idle = rss_mb(stack.gateway.pid)
        peak = idle
        done = False

        async def sample() -> None:
            nonlocal peak
            while not done:
                peak = max(peak, rss_mb(stack.gateway.pid))
                await asyncio.sleep(0.02)

        async def run() -> list[int]:
            nonlocal done
            pools = [Pool(stack.url, max_idle=2) for _ in range(12)]
            s = asyncio.ensure_future(sample())

            async def one(pool: Pool) -> int:
                resp = await pool.request("POST", "/v1/completions", raw, [("content-type", "application/json")])
                await resp.read()
                resp.close()
                return resp.status

            statuses = await asyncio.gather(*(one(p) for p in pools))
            done = True
            await s
            for p in pools:
                await p.aclose()
            return statuses

        statuses = asyncio.run(run())
        time.sleep(1.0)
        return {"bodies": 12, "body_mb": len(raw) / 1e6, "budget_mib": budget_mib,
                "statuses": {k: statuses.count(k) for k in sorted(set(statuses))},
                "rss_idle_mb": idle, "rss_peak_mb": peak, "rss_growth_mb": peak - idle,
                "rss_after_mb": rss_mb(stack.gateway.pid)}
    finally:
        stack.close()


# ---------------------------------------------------------------------------------------------------------------
# prompt


def loop_lag_buckets(url: str) -> dict[str, float]:
    """The gateway's event-loop lag histogram (cumulative count per upper bound, seconds)."""
    import httpx

    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("qlm_gateway_event_loop_lag_seconds_bucket{"):
            out[line.split('le="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return out


def lag_over(before: dict[str, float], after: dict[str, float], bound: str) -> int:
    """Lag samples between two scrapes that were over `bound` seconds."""
    total = after["+Inf"] - before["+Inf"]
    return int(total - (after[bound] - before[bound]))


def case_prompt(tmp: Path) -> dict:
    # The big prompts go to a model of their own on a third engine: the emulator's own parsing of a 30 MB body
    # (stdlib json, word split) pauses its streams, and that is not the gateway's to answer for.
    stack = Stack(tmp, BIG_PROFILE, models=("m", "m", "big"), first_token_timeout_s=600, inter_token_timeout_s=120)
    try:
        async def streams(n: int, n_out: int) -> list[float]:
            pool = Pool(stack.url, max_idle=n)
            outs = await asyncio.gather(*(stream_gaps(pool, {"model": "m", "prompt": prompt(5 + i), "max_tokens": n_out,
                                                             "ignore_eos": True}) for i in range(n)))
            await pool.aclose()
            return [max_gap(t[1:]) for t, _, _ in outs]  # from the second token: steady streaming

        out: dict = {"streams": 40}
        for phase in ("none", "refused", "forwarded"):
            lag0 = loop_lag_buckets(stack.url)
            sender = None
            if phase != "none":
                sender = subprocess.Popen([sys.executable, __file__, "--big-prompt-worker", str(stack.port), phase],
                                          env=ENV, stdout=subprocess.PIPE, text=True)
                time.sleep(1.0)  # it has built its bodies
            gaps = asyncio.run(streams(40, 400))
            sent = json.loads(sender.communicate(timeout=300)[0]) if sender is not None else None
            lag1 = loop_lag_buckets(stack.url)
            out[phase] = {"max_gap_ms": max(gaps) * 1e3, "median_of_per_stream_max_gap_ms": float(np.median(gaps)) * 1e3,
                          "gateway_loop_lag_samples": int(lag1["+Inf"] - lag0["+Inf"]),
                          "over_20ms": lag_over(lag0, lag1, "0.02"), "over_50ms": lag_over(lag0, lag1, "0.05"),
                          "over_100ms": lag_over(lag0, lag1, "0.1"), "over_200ms": lag_over(lag0, lag1, "0.2"),
                          "big_prompts": sent}
        return out
    finally:
        stack.close()


async def big_prompt_worker(port: int, phase: str) -> dict:
    """Send four 30 MB prompts, refused (over the context) or forwarded (to an engine with a huge context)."""
    if phase == "refused":
        raw = orjson.dumps({"model": "big", "prompt": "w1 " * 10_000_000, "max_tokens": 4})
    else:
        raw = orjson.dumps({"model": "big", "prompt": big_prompt(30), "max_tokens": 4})
    pool = Pool(f"http://127.0.0.1:{port}", max_idle=2)
    out = []
    await asyncio.sleep(1.0)
    for _ in range(4):
        t = time.monotonic()
        resp = await pool.request("POST", "/v1/completions", raw, [("content-type", "application/json")])
        await resp.read()
        resp.close()
        out.append({"mb": round(len(raw) / 1e6, 1), "status": resp.status, "s": round(time.monotonic() - t, 2)})
    await pool.aclose()
    return {"sent": out}


# ---------------------------------------------------------------------------------------------------------------
# sigkill


def case_sigkill(tmp: Path) -> dict:
    from qlmctl.gateway.launchstate import EngineRecord, port_in_use

    prof = tmp / "p.yaml"
    prof.write_text(yaml.safe_dump(PROFILE))
    ports = [free_port(), free_port()]
    port = free_port()
    spec = live_scenario_spec(PROFILE, [(f"g{i}", "m", f"http://127.0.0.1:{p}") for i, p in enumerate(ports)],
                              port=port)
    spec["live"]["launch"] = {"command": f"{{python}} -m qlmctl.cli emulate --profile {prof} --model {{model}} "
                                         "--port {port}", "health_timeout_s": 60}
    sc = tmp / "launch.yaml"
    sc.write_text(yaml.safe_dump(spec))
    gw = subprocess.Popen([sys.executable, "-m", "qlmctl.cli", "serve", "-s", str(sc), "--launch", "--policy", "fcfs"],
                          env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}/health", 120)
    groups = [EngineRecord.read(p).pgid for p in ports]
    engine_pids = []
    for g in groups:
        out = subprocess.run(["pgrep", "-g", str(g)], capture_output=True, text=True).stdout.split()
        engine_pids += [int(x) for x in out]
    t0 = time.monotonic()
    gw.send_signal(signal.SIGKILL)
    gw.wait()

    def left() -> list[int]:
        alive = []
        for pid in engine_pids:
            try:
                os.kill(pid, 0)
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                        alive.append(pid)
            except (ProcessLookupError, OSError):
                pass
        return alive

    while (left() or any(port_in_use("127.0.0.1", p) for p in ports)) and time.monotonic() - t0 < 30:
        time.sleep(0.02)
    return {"engine_processes": len(engine_pids), "seconds_until_none_left": time.monotonic() - t0,
            "left_after": left(), "ports_free": not any(port_in_use("127.0.0.1", p) for p in ports)}


# ---------------------------------------------------------------------------------------------------------------
# errors


def case_errors(tmp: Path) -> dict:
    sys.path.insert(0, str(REPO / "bench"))
    import bench_faults
    from rich.console import Console

    prof = tmp / "fault-profile.yaml"
    prof.write_text(yaml.safe_dump(bench_faults.FAULT_PROFILE))
    engines = [bench_faults.emulator(prof, 4.0) for _ in range(2)]
    try:
        rows = [asyncio.run(bench_faults.fault_run("error_rate", engines, 300, 50.0, 64, 4.0, Console(quiet=True)))
                for _ in range(2)]
    finally:
        for e in engines:
            e.kill()
    return {"runs": rows}


CASES = {"sockets": case_sockets, "stall": case_stall, "bodies": None, "prompt": case_prompt,
         "sigkill": case_sigkill, "errors": case_errors}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--flood-worker":
        port, n = int(sys.argv[2]), int(sys.argv[3])
        print(json.dumps(asyncio.run(flood_worker("127.0.0.1", port, n, 0.5, 40.0))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--big-prompt-worker":
        print(json.dumps(asyncio.run(big_prompt_worker(int(sys.argv[2]), sys.argv[3]))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="*", metavar="case", help=f"some of {', '.join(CASES)} (default: all)")
    ap.add_argument("--json", type=Path, help="also write the figures to this file")
    args = ap.parse_args()
    unknown = set(args.cases) - set(CASES)
    if unknown:
        ap.error(f"unknown case(s) {', '.join(sorted(unknown))}; known: {', '.join(CASES)}")
    out = {}
    for name in args.cases or list(CASES):
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            print(f"== {name}", flush=True)
            if name == "bodies":
                res = {"bounded": case_bodies(tmp, 256)}
                with tempfile.TemporaryDirectory() as d2:
                    res["all_admitted"] = case_bodies(Path(d2), 1024)
            else:
                res = CASES[name](tmp)
            print(json.dumps(res, indent=1, default=str), flush=True)
            out[name] = res
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
