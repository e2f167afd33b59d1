"""The API server's part of a probe's TTFT under load, window by window, for `bench/device/api_split.sh`.

    python bench/device/api_split.py --url http://127.0.0.1:8010 --streams 0,128,256 --rates 4,8,12,16,20 -o F.json

profile-model's load windows (`Profiler.frontend_load_points`: Poisson probes of 1,024-token prompts while the
server streams N decodes) at more arrival rates, written as JSON: per window the client's TTFT, vLLM's own TTFT
(API-server arrival to first token) and its queue + prefill, the API server's CPU, the step and the tokens
streamed. Run once per `--api-server-count` to tell the API server's share of the rate effect from the engine's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import asdict

from qlmctl.client.prober import Profiler


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--streams", default="0,128,256")
    ap.add_argument("--rates", default="4,8,12,16,20")
    ap.add_argument("--window-s", type=float, default=4.0)
    ap.add_argument("-o", "--out", required=True)
    args = ap.parse_args()
    prof = Profiler(args.url, args.model)
    points = []
    try:
        for n in (int(x) for x in args.streams.split(",")):
            got = await prof.frontend_load_points(n, [float(r) for r in args.rates.split(",")],
                                                  window_s=args.window_s, max_tokens=4000)
            for p in got:
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(p).items()}),
                      flush=True)
            points.extend(asdict(p) for p in got)
    finally:
        await prof.close()
        with open(args.out, "w") as f:
            json.dump(points, f, indent=1)


if __name__ == "__main__":
    asyncio.run(main())
