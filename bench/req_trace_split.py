"""Where each request's TTFT went inside vLLM, from `bench/device/req_trace.sh`'s per-request traces.

    python bench/req_trace_split.py DIR                 # DIR: the unpacked req_trace.tgz (conv/near/..., code/...)
    python bench/req_trace_split.py DIR --by-streams    # and the legs by streams running at arrival, per replay
    python bench/req_trace_split.py DIR --api           # and the way in through the API server, hop by hop
    python bench/req_trace_split.py DIR --in-out        # "http in + out" split in two, and the intake's order
    python bench/req_trace_split.py DIR --lag           # "in" and "out" against the API server's event-loop lag
    python bench/req_trace_split.py DIR --backlog PROFILE [--usage-cost S]   # the intake against a backlog of CPU work

Per replay (a folder holding the server's reqtrace.jsonl, committed gzipped, and in it or below the replay's
requests.parquet), the mean and p50 / p90 of each leg of the time to first token, ms:
  http in + out   the client's TTFT less the API server's own first-token latency (the request's way in before the
                  API server stamps it, and the first token's way out to the client);
  intake          API-server arrival to the engine core's QUEUED (input processing, the hand-over, the core
                  picking it up between steps);
  queue           QUEUED to SCHEDULED (vLLM's queue time);
  prefill         SCHEDULED to the engine core's first-token output (vLLM's prefill time);
  output          that output to the API server's first token (the output's way back and its processing).
The five add up to the client's TTFT. Requests on one side only (no trace line, or no client TTFT) are counted in
the table's "unjoined" column, not dropped unsaid.

--in-out: "http in" (the client's send to the API server's arrival stamp) and "out" (the first token's way from the
API server to the client) apart, by streams running at arrival. The client's and the server's clocks are aligned
on the request that took least from send to stamp (so "in" is above that least, under 0.5 ms where measured:
a replay's first requests meet an idle server); replays that recorded `client_t0_mono` need no alignment. Then
whether the server stamped requests in the order they were sent, and its longest stalls: the spans in which
requests were sent but none stamped.

--api (traces whose lines carry the API server's hops, `bench/device/reqtrace`, and replays that recorded their
send times' origin, `client_t0_mono`): "http in" split into the client's send to the completion handler (TCP,
the HTTP server, request parsing; where the replay wrote `client_sent.json`, that again in two: the client's own
part, from its send stamp to the request's last byte written, and the rest, from there to the handler), the handler to the tokenizer's hand-over, the wait for the tokenizer's thread,
the tokenizer's call, the handler's resumption after it, and the rest up to the arrival stamp; and "out" (the first
token's way from the API server to the client). With the process's event-loop lags and garbage collections
(`reqtrace.jsonl.events`) that overlap each request's way in. Folders without a replay (probe windows) get the
server-side hops only.

--backlog PROFILE (traces with the engine core's step log, `reqtrace.jsonl.steps`): the API server's unfinished CPU
work at each request's arrival stamp, replayed from the run itself (a Lindley recursion, first come first served):
each arrival adds the profile's `frontend_cpu_per_request_s`, each step's output (its update, one token for each
sequence the step scheduled) `frontend_cpu_per_token_s` a token, plus `--usage-cost` for replays through the gateway
(vLLM's ids there are its own); against the intake leg. Whether the intake is work queued ahead of the request.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

LEGS = ("http in + out", "intake", "queue", "prefill", "output")
STREAM_BINS = (0, 100, 150, 200, 100_000)
"""Bins of the streams running at a request's arrival, for --by-streams."""


def _json_lines(folder: Path, name: str) -> list[dict]:
    """The JSON lines of `folder/name`, or of its gzipped copy (`name`.gz, as committed); none if neither is there."""
    plain, packed = folder / name, folder / f"{name}.gz"
    text = plain.read_text() if plain.exists() else gzip.decompress(packed.read_bytes()).decode() \
        if packed.exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _trace_lines(folder: Path) -> list[dict]:
    return _json_lines(folder, "reqtrace.jsonl")


CLIENT_ID = re.compile(r"cmpl-(\d+)(?:-\d+)?")
"""vLLM's request id for a replay client's request `<n>` (a gateway sends ids of its own, which do not match)."""

GATEWAY_JOIN_WINDOW = 8
"""How far apart in order (each side sorted by time) a gateway's request and its vLLM trace line may be joined."""


def _join_by_order(trace: pd.DataFrame, client: pd.DataFrame) -> pd.DataFrame:
    """The gateway's records against vLLM's trace lines (the gateway sends vLLM ids of its own): each record, in
    dispatch order, to the first line not yet taken within `GATEWAY_JOIN_WINDOW` places of it, in arrival order,
    whose prompt is one token longer (vLLM counts the BOS token the gateway's tokenizer leaves out)."""
    trace = trace.sort_values("stamp_mono").reset_index(drop=True)
    client = client.sort_values("dispatch_s").reset_index(drop=True)
    taken: set[int] = set()
    rows = []
    for i, rec in client.iterrows():
        for j in range(max(0, i - GATEWAY_JOIN_WINDOW), min(len(trace), i + GATEWAY_JOIN_WINDOW + 1)):
            if j not in taken and trace.prompt_tokens[j] == rec.prompt_tokens + 1:
                taken.add(j)
                rows.append({**trace.loc[j].drop("request_id").to_dict(), "request_id": rec.request_id,
                             "arrival_s": rec.arrival_s, "ttft_s": rec.ttft_s})
                break
    return pd.DataFrame(rows)


def legs(folder: Path) -> tuple[pd.DataFrame, int]:
    """One row per request of the replay in `folder` (its legs, s, and the streams running at its arrival), joined on
    the request id the client sent (`cmpl-<n>-0`), or for a replay through the gateway, whose ids vLLM does not see,
    on order and prompt length (`_join_by_order`); and how many requests were on one side only. Through the gateway
    the "client" is the gateway's own record: "http in + out" is its hop to vLLM and back."""
    lines = _trace_lines(folder)
    arrivals = np.array([t["arrival_wall"] - t["wall_minus_mono"] for t in lines])  # the engine core's clock
    lasts = np.array([t["last_token"] for t in lines])
    rows = []
    for t, arrival in zip(lines, arrivals):
        if not t["first_token"]:
            continue
        m = CLIENT_ID.fullmatch(t["id"])
        rows.append({"request_id": int(m.group(1)) if m else None, "stamp_mono": arrival,
                     "intake": t["queued"] - arrival,
                     "queue": t["scheduled"] - t["queued"], "prefill": t["first_token"] - t["scheduled"],
                     "output": t["first_token_latency"] - (t["first_token"] - arrival),
                     "vllm_ttft": t["first_token_latency"], "prompt_tokens": t["prompt_tokens"],
                     "running": int(((arrivals < arrival) & (lasts > arrival)).sum())})
    trace = pd.DataFrame(rows)
    found = sorted(folder.rglob("requests.parquet"))  # the replay's folder (`direct/`) beside the trace
    if len(found) != 1:
        raise SystemExit(f"{folder}: expected one replay's requests.parquet under it, found {len(found)}")
    client = pd.read_parquet(found[0])
    if trace.empty or trace.request_id.notna().all():
        client = client[["request_id", "arrival_s", "ttft_s"]].dropna()
        df = trace.merge(client, on="request_id", how="inner")
    else:  # (the unjoined count below, like the ids' join, counts only records with a TTFT)
        client = client[["request_id", "arrival_s", "dispatch_s", "ttft_s", "prompt_tokens"]].dropna()
        df = _join_by_order(trace, client)
    df["http in + out"] = df["ttft_s"] - df["vllm_ttft"]
    return df, len(lines) + len(client) - 2 * len(df)


API_HOPS = ("client to handler", "client send", "bytes out to handler", "handler to tokenizer", "tokenizer queue", "tokenize", "resume", "to arrival stamp",
            "out")


def _events(folder: Path) -> pd.DataFrame:
    rows = _json_lines(folder, "reqtrace.jsonl.events")
    return pd.DataFrame(rows, columns=["kind", "pid", "t", "dur", "gen", "collected"]) if rows else \
        pd.DataFrame(columns=["kind", "pid", "t", "dur", "gen", "collected"])


def api_hops(folder: Path) -> pd.DataFrame:
    """One row per traced request with the API server's hops (s) on its way in, and the lag and garbage
    collection time of the API server that overlap that way in."""
    lines = [t for t in _trace_lines(folder) if t.get("api") and "add" in t["api"]]
    found = sorted(folder.rglob("requests.parquet"))
    t0 = None
    client = None
    wire: dict[int, float] = {}
    if len(found) == 1:
        summary = json.loads((found[0].parent / "summary.json").read_text())
        t0 = summary.get("client_t0_mono")
        client = pd.read_parquet(found[0])[["request_id", "arrival_s", "ttft_s"]].set_index("request_id")
        sent = found[0].parent / "client_sent.json"  # replays since the eighteenth session: each request's bytes out
        if sent.exists():
            wire = {int(rid): out for rid, _, out in json.loads(sent.read_text()) if out is not None}
    ev = _events(folder)
    api_pid = lines[0].get("pid") if lines else None
    stalls = ev[(ev.pid == api_pid)] if len(ev) else ev
    rows = []
    for t in lines:
        a = t["api"]
        arrival = t["arrival_wall"] - t["wall_minus_mono"]
        row = {"id": t["id"], "handler to tokenizer": a.get("tok_submit", a["add"]) - a["handler"],
               "to arrival stamp": arrival - a.get("tok_resume", a["handler"]), "running": 0}
        if "tok_start" in a:
            row.update({"tokenizer queue": a["tok_start"] - a["tok_submit"], "tokenize": a["tok_end"] - a["tok_start"],
                        "resume": a["tok_resume"] - a["tok_end"]})
        start = a["handler"]
        m = re.match(r"cmpl-(\d+)-", t["id"])
        if client is not None and t0 is not None and m is not None and int(m.group(1)) in client.index:
            c = client.loc[int(m.group(1))]
            sent = t0 + c.arrival_s
            row["client to handler"] = a["handler"] - sent
            if int(m.group(1)) in wire:
                row["client send"] = wire[int(m.group(1))] - c.arrival_s
                row["bytes out to handler"] = a["handler"] - (t0 + wire[int(m.group(1))])
            row["out"] = sent + c.ttft_s - (arrival + t["first_token_latency"])
            start = sent
        if len(stalls):
            for kind in ("lag", "gc"):
                s = stalls[stalls.kind == kind]
                lo, hi = np.maximum(s.t, start), np.minimum(s.t + s.dur, arrival)
                row[f"{kind} overlap"] = float(np.clip(hi - lo, 0, None).sum())
        rows.append(row)
    return pd.DataFrame(rows)


def print_api(root: Path) -> None:
    print("\n| folder | requests | " + " | ".join(f"{k}: mean / p50 / p90 (ms)" for k in API_HOPS)
          + " | API loop lag / GC overlapping the way in, mean (ms) |")
    print("|---|---:|" + "---:|" * (len(API_HOPS) + 1))
    for f in sorted({p.parent for p in root.rglob("reqtrace.jsonl*")}):
        df = api_hops(f)
        if df.empty:
            continue
        cells = []
        for k in API_HOPS:
            v = df[k].dropna() if k in df else pd.Series(dtype=float)
            cells.append(f"{v.mean() * 1e3:.1f} / {v.median() * 1e3:.1f} / {np.percentile(v, 90) * 1e3:.1f}"
                         if len(v) else "-")
        lag = df["lag overlap"].mean() * 1e3 if "lag overlap" in df else float("nan")
        gcs = df["gc overlap"].mean() * 1e3 if "gc overlap" in df else float("nan")
        print(f"| {f.relative_to(root)} | {len(df)} | " + " | ".join(cells) + f" | {lag:.1f} / {gcs:.1f} |")
        ev = _events(f)
        if len(ev):
            for (kind, pid), g in ev.groupby(["kind", "pid"]):
                print(f"    {kind} pid {pid}: {len(g)} events over their threshold, {g.dur.sum() * 1e3:.0f} ms in all, "
                      f"longest {g.dur.max() * 1e3:.1f} ms" + (f", by generation {g.groupby('gen').size().to_dict()}"
                                                                 if kind == "gc" else ""))


def in_out(folder: Path) -> tuple[pd.DataFrame, int, bool]:
    """Per request of the replay in `folder`: its send and stamp times on the client's clock (s), "in" and "out"
    (s) and the streams running at arrival; the stamps out of send order; whether the clocks were aligned on
    the least "in" (no `client_t0_mono` in the summary)."""
    df, _ = legs(folder)
    found = sorted(folder.rglob("requests.parquet"))
    stamp_mono = df["stamp_mono"].to_numpy()
    t0 = json.loads((found[0].parent / "summary.json").read_text()).get("client_t0_mono")
    aligned = t0 is None
    offset = float(np.min(stamp_mono - df.arrival_s.to_numpy())) if aligned else float(t0)
    df["stamp"] = stamp_mono - offset
    df["in"] = df["stamp"] - df["arrival_s"]
    df["out"] = df["http in + out"] - df["in"]
    df = df.sort_values("arrival_s").reset_index(drop=True)
    inversions = int((np.diff(df["stamp"].to_numpy()) < 0).sum())
    return df, inversions, aligned


def print_in_out(root: Path) -> None:
    print("\n| replay | streams running at arrival | requests | in: mean / p50 / p90 (ms) | out: mean / p50 / p90 (ms) |")
    print("|---|---|---:|---:|---:|")
    notes = []
    for f in sorted({p.parent for p in root.rglob("reqtrace.jsonl*")}):
        if not list(f.rglob("requests.parquet")):
            continue
        df, inversions, aligned = in_out(f)
        for lo, hi in zip(STREAM_BINS, STREAM_BINS[1:]):
            s = df[(df.running >= lo) & (df.running < hi)]
            if len(s):
                span = f"{lo}-{hi - 1}" if hi < STREAM_BINS[-1] else f"{lo} and more"
                print(f"| {f.relative_to(root)} | {span} | {len(s)} | " + " | ".join(
                    f"{s[k].mean() * 1e3:.1f} / {s[k].median() * 1e3:.1f} / {np.percentile(s[k], 90) * 1e3:.1f}"
                    for k in ("in", "out")) + " |")
        # Stalls: from a request's send until the next stamp of any request, while that request waits.
        sends, stamps = df["arrival_s"].to_numpy(), np.sort(df["stamp"].to_numpy())
        nxt = stamps[np.searchsorted(stamps, sends, side="left").clip(max=len(stamps) - 1)]
        waits = nxt - sends
        top = np.argsort(waits)[::-1][:3]
        notes.append(f"{f.relative_to(root)}: {inversions} of {len(df)} stamps out of send order"
                     f"{' (clocks aligned on the least in)' if aligned else ''}; longest spans with a request sent "
                     "and none stamped: " + ", ".join(f"{waits[i] * 1e3:.0f} ms from {sends[i]:.2f} s" for i in top))
    print("\n" + "\n".join(notes))


LAG_BINS = (0.0, 0.05, 0.2, 0.4, 0.6, 100.0)
"""Bins of the API server's loop lag around a request's send: seconds late per second, over +-0.5 s."""


def print_lag(root: Path) -> None:
    """For replays traced with the API server's loop lags (`reqtrace.jsonl.events`) and their send times' origin
    (`client_t0_mono`): "in" and "out" by how late the server's event loop ran around each request's send."""
    print("\n| replay | loop lag around the send (s per s) | requests | streams running, mean | in: mean / p50 (ms) "
          "| out: mean (ms) |")
    print("|---|---|---:|---:|---:|---:|")
    notes = []
    for f in sorted({p.parent for p in root.rglob("reqtrace.jsonl*")}):
        found = list(f.rglob("requests.parquet"))
        if not found:
            continue
        t0 = json.loads((found[0].parent / "summary.json").read_text()).get("client_t0_mono")
        ev = _events(f)
        lag = ev[ev.kind == "lag"] if len(ev) else ev
        if t0 is None or not len(lag):
            continue
        df, _, _ = in_out(f)
        starts, durs = (lag.t - t0).to_numpy(float), lag.dur.to_numpy(float)
        df["lag"] = [durs[(starts > a - 0.5) & (starts < a + 0.5)].sum() for a in df.arrival_s]
        covered = sum(float(np.clip(np.minimum(starts + durs, b) - np.maximum(starts, a), 0, None).sum())
                      for a, b in zip(df.arrival_s, df.stamp))
        for lo, hi in zip(LAG_BINS, LAG_BINS[1:]):
            b = df[(df.lag >= lo) & (df.lag < hi)]
            if len(b):
                span = f"{lo:.2f}-{hi:.2f}" if hi < LAG_BINS[-1] else f"{lo:.2f} and more"
                print(f"| {f.relative_to(root)} | {span} | {len(b)} | {b.running.mean():.0f} | "
                      f"{b['in'].mean() * 1e3:.1f} / {b['in'].median() * 1e3:.1f} | {b.out.mean() * 1e3:.1f} |")
        notes.append(f"{f.relative_to(root)}: in against loop lag {df['in'].corr(df.lag):.2f}, against streams "
                     f"{df['in'].corr(df.running):.2f}; out against loop lag {df.out.corr(df.lag):.2f}; loop lag "
                     f"against streams {df.lag.corr(df.running):.2f}; the loop ran late over "
                     f"{covered / max(df['in'].sum(), 1e-9):.0%} of the requests' time in")
    print("\n" + "\n".join(notes))


def print_backlog(root: Path, profile: Path, usage_cost: float) -> None:
    import yaml

    prof = yaml.safe_load(profile.read_text())
    ct, cr = float(prof["frontend_cpu_per_token_s"]), float(prof["frontend_cpu_per_request_s"])
    print("\n| replay | requests | backlog of CPU work at arrival: mean / p50 / p90 (ms) | intake: mean / p50 / p90 "
          "(ms) | correlation |")
    print("|---|---:|---:|---:|---:|")
    for f in sorted({p.parent for p in root.rglob("reqtrace.jsonl.steps*")}):
        steps = _json_lines(f, "reqtrace.jsonl.steps")
        lines = [t for t in _trace_lines(f) if t.get("queued")]
        if not steps or not lines:
            continue
        gateway = not all(CLIENT_ID.fullmatch(t["id"]) for t in lines)
        per_token = ct + (usage_cost if gateway else 0.0)
        scheduled = [s for s in steps if s["k"] == "s"]
        updates = [s for s in steps if s["k"] == "u"]
        # (time, 0, the request's intake) for arrivals, (time, 1, its CPU work) for a step's output, the n-th update
        # being the n-th scheduled step's; arrivals first at the same instant, each looking before its own work counts.
        events = []
        for t in lines:
            arrival = t["arrival_wall"] - t["wall_minus_mono"]
            events.append((arrival, 0, t["queued"] - arrival))
        events += [(u["t"], 1, per_token * s["n"]) for s, u in zip(scheduled, updates)]
        events.sort()
        backlog, last, seen = 0.0, events[0][0], []
        for t, kind, x in events:
            backlog, last = max(0.0, backlog - (t - last)), t
            if kind == 0:
                seen.append((backlog, x))
                backlog += cr
            else:
                backlog += x
        a = np.array(seen)

        def cell(v: np.ndarray) -> str:
            return f"{v.mean() * 1e3:.1f} / {np.median(v) * 1e3:.1f} / {np.percentile(v, 90) * 1e3:.1f}"

        name = f"{f.relative_to(root)}{' (gateway)' if gateway else ''}"
        print(f"| {name} | {len(a)} | {cell(a[:, 0])} | {cell(a[:, 1])} | {np.corrcoef(a[:, 0], a[:, 1])[0, 1]:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--by-streams", action="store_true", help="also the mean legs by streams running at arrival")
    ap.add_argument("--api", action="store_true", help="also the API server's hops on each request's way in")
    ap.add_argument("--in-out", action="store_true", help="also the HTTP legs apart, and the intake's order and stalls")
    ap.add_argument("--lag", action="store_true", help="also in and out against the API server's loop lag")
    ap.add_argument("--backlog", type=Path, metavar="PROFILE",
                    help="also the intake against the API server's backlog of CPU work at the profile's costs")
    ap.add_argument("--usage-cost", type=float, default=0.0, metavar="S",
                    help="with --backlog: CPU s a token more for replays through the gateway (usage in every chunk)")
    args = ap.parse_args()
    print("| replay | requests | unjoined | client TTFT mean / p50 (ms) | "
          + " | ".join(f"{k}: mean / p50 / p90" for k in LEGS) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(LEGS))
    frames = {}
    for f in sorted({p.parent for p in args.dir.rglob("reqtrace.jsonl*")}):
        if not list(f.rglob("requests.parquet")):
            continue  # probe windows: no replay to join (--api shows their server-side hops)
        df, unjoined = legs(f)
        if df.empty:
            continue
        frames[f] = df
        cells = [f"{df[k].mean() * 1e3:.1f} / {df[k].median() * 1e3:.1f} / {np.percentile(df[k], 90) * 1e3:.1f}"
                 for k in LEGS]
        print(f"| {f.relative_to(args.dir)} | {len(df)} | {unjoined} | {df['ttft_s'].mean() * 1e3:.1f} / "
              f"{df['ttft_s'].median() * 1e3:.1f} | " + " | ".join(cells) + " |")
    if args.by_streams:
        print("\n| replay | streams running at arrival | requests | " + " | ".join(f"{k} (ms)" for k in LEGS) + " |")
        print("|---|---|---:|" + "---:|" * len(LEGS))
        corr = []
        for f, df in frames.items():
            if len(df) > 2:
                corr.append(f"{f.relative_to(args.dir)}: http in + out against streams "
                            f"{df['http in + out'].corr(df.running):.2f}, against prompt tokens "
                            f"{df['http in + out'].corr(df.prompt_tokens):.2f}; intake against streams "
                            f"{df.intake.corr(df.running):.2f}")
            for lo, hi in zip(STREAM_BINS, STREAM_BINS[1:]):
                s = df[(df.running >= lo) & (df.running < hi)]
                if len(s):
                    span = f"{lo}-{hi - 1}" if hi < STREAM_BINS[-1] else f"{lo} and more"
                    print(f"| {f.relative_to(args.dir)} | {span} | {len(s)} | "
                          + " | ".join(f"{s[k].mean() * 1e3:.1f}" for k in LEGS) + " |")
        print("\ncorrelations (Pearson, per request):\n" + "\n".join(corr))
    if args.in_out:
        print_in_out(args.dir)
    if args.lag:
        print_lag(args.dir)
    if args.api:
        print_api(args.dir)
    if args.backlog:
        print_backlog(args.dir, args.backlog, args.usage_cost)


if __name__ == "__main__":
    main()
