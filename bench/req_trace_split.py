"""Where each request's TTFT went inside vLLM, from `bench/device/req_trace.sh`'s per-request traces.

    python bench/req_trace_split.py DIR                 # DIR: the unpacked req_trace.tgz (conv/near/..., code/...)
    python bench/req_trace_split.py DIR --by-streams    # and the legs by streams running at arrival, per replay

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


def _trace_lines(folder: Path) -> list[dict]:
    plain, packed = folder / "reqtrace.jsonl", folder / "reqtrace.jsonl.gz"
    text = plain.read_text() if plain.exists() else gzip.decompress(packed.read_bytes()).decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def legs(folder: Path) -> tuple[pd.DataFrame, int]:
    """One row per request of the replay in `folder` (its legs, s, and the streams running at its arrival), joined on
    the request id the client sent; and how many requests were on one side only."""
    lines = _trace_lines(folder)
    arrivals = np.array([t["arrival_wall"] - t["wall_minus_mono"] for t in lines])  # the engine core's clock
    lasts = np.array([t["last_token"] for t in lines])
    rows = []
    for t, arrival in zip(lines, arrivals):
        m = re.match(r"cmpl-(\d+)", t["id"])
        if m is None or not t["first_token"]:
            continue
        rows.append({"request_id": int(m.group(1)), "intake": t["queued"] - arrival,
                     "queue": t["scheduled"] - t["queued"], "prefill": t["first_token"] - t["scheduled"],
                     "output": t["first_token_latency"] - (t["first_token"] - arrival),
                     "vllm_ttft": t["first_token_latency"], "prompt_tokens": t["prompt_tokens"],
                     "running": int(((arrivals < arrival) & (lasts > arrival)).sum())})
    trace = pd.DataFrame(rows)
    found = sorted(folder.rglob("requests.parquet"))  # the replay's folder (`direct/`) beside the trace
    if len(found) != 1:
        raise SystemExit(f"{folder}: expected one replay's requests.parquet under it, found {len(found)}")
    client = pd.read_parquet(found[0])[["request_id", "ttft_s"]].dropna()
    df = trace.merge(client, on="request_id", how="inner")
    df["http in + out"] = df["ttft_s"] - df["vllm_ttft"]
    return df, len(lines) + len(client) - 2 * len(df)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--by-streams", action="store_true", help="also the mean legs by streams running at arrival")
    args = ap.parse_args()
    print("| replay | requests | unjoined | client TTFT mean / p50 (ms) | "
          + " | ".join(f"{k}: mean / p50 / p90" for k in LEGS) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(LEGS))
    frames = {}
    for f in sorted({p.parent for p in args.dir.rglob("reqtrace.jsonl*")}):
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


if __name__ == "__main__":
    main()
