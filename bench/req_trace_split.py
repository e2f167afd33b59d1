"""Where each request's TTFT went inside vLLM, from `bench/device/req_trace.sh`'s per-request traces.

    python bench/req_trace_split.py DIR        # DIR: the unpacked req_trace.tgz (conv/near/direct/..., code/...)

Per replay (a folder holding the server's reqtrace.jsonl and, in it or below, the replay's requests.parquet), the mean and p50 / p90
of each leg of the time to first token, ms:
  http in + out   the client's TTFT less the API server's own first-token latency (the request's way in before the
                  API server stamps it, and the first token's way out to the client);
  intake          API-server arrival to the engine core's QUEUED (input processing, the hand-over, the core
                  picking it up between steps);
  queue           QUEUED to SCHEDULED (vLLM's queue time);
  prefill         SCHEDULED to the engine core's first-token output (vLLM's prefill time);
  output          that output to the API server's first token (the output's way back and its processing).
The five add up to the client's TTFT.
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


def legs(folder: Path) -> pd.DataFrame:
    """One row per request of the replay in `folder`: its legs (s), joined on the request id the client sent."""
    rows = []
    plain = folder / "reqtrace.jsonl"
    text = plain.read_text() if plain.exists() else gzip.decompress((folder / "reqtrace.jsonl.gz").read_bytes()).decode()
    for line in text.splitlines():
        t = json.loads(line)
        m = re.match(r"cmpl-(\d+)", t["id"])
        if m is None or not t["first_token"]:
            continue
        arrival = t["arrival_wall"] - t["wall_minus_mono"]  # on the engine core's monotonic clock
        rows.append({"request_id": int(m.group(1)), "intake": t["queued"] - arrival,
                     "queue": t["scheduled"] - t["queued"], "prefill": t["first_token"] - t["scheduled"],
                     "output": t["first_token_latency"] - (t["first_token"] - arrival),
                     "vllm_ttft": t["first_token_latency"], "prompt_tokens": t["prompt_tokens"]})
    trace = pd.DataFrame(rows)
    found = sorted(folder.rglob("requests.parquet"))  # the replay's folder (`direct/`) beside the trace
    if len(found) != 1:
        raise SystemExit(f"{folder}: expected one replay's requests.parquet under it, found {len(found)}")
    client = pd.read_parquet(found[0])[["request_id", "ttft_s"]].dropna()
    df = trace.merge(client, on="request_id", how="inner")
    df["http in + out"] = df["ttft_s"] - df["vllm_ttft"]
    return df


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    args = ap.parse_args()
    print("| replay | requests | client TTFT mean / p50 (ms) | " + " | ".join(f"{k}: mean / p50 / p90" for k in LEGS) + " |")
    print("|---|---:|---:|" + "---:|" * len(LEGS))
    for f in sorted({p.parent for p in args.dir.rglob("reqtrace.jsonl*")}):  # (committed gzipped)
        df = legs(f)
        if df.empty:
            continue
        cells = [f"{df[k].mean() * 1e3:.1f} / {df[k].median() * 1e3:.1f} / {np.percentile(df[k], 90) * 1e3:.1f}"
                 for k in LEGS]
        print(f"| {f.relative_to(args.dir)} | {len(df)} | {df['ttft_s'].mean() * 1e3:.1f} / "
              f"{df['ttft_s'].median() * 1e3:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
