"""What the gateway's usage in every chunk costs vLLM's API server: `frontend_usage_cpu_per_token_s`.

    python bench/usage_cost.py --gateway DIR [DIR ...] --direct DIR [DIR ...]

Each DIR is a replay's results folder (summary.json) of the same trace at the same rate against the same vLLM
server process: through `qlmctl serve` (which asks vLLM for `stream_options.continuous_usage_stats` under
`live.token_count: usage`) and straight to vLLM (`bench/device/replay_direct.py`, usage only at the end). Both
record the API server's CPU counter over the run (`engine_metrics.<engine>.process_cpu_seconds`) and the tokens
it streamed (`vllm:generation_tokens`). The difference of the mean CPU seconds over the tokens is the extra CPU a
streamed token costs when its chunk carries usage, as a profile's `frontend_usage_cpu_per_token_s` takes it
(whatever else the gateway's requests cost the server is in it too). Server processes differ by a few percent in
CPU for the same replay: compare runs on one process only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import mean


def cpu_and_tokens(folder: Path) -> tuple[float, float]:
    """(API-server CPU seconds, tokens streamed) of a replay, summed over its engines."""
    path = folder / "summary.json"
    try:
        metrics = json.loads(path.read_text())["engine_metrics"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"{path}: no engine_metrics ({e})") from None
    cpu = tokens = 0.0
    for name, m in metrics.items():
        if "process_cpu_seconds" not in m or "vllm:generation_tokens" not in m:
            raise SystemExit(f"{path}: engine {name} lacks process_cpu_seconds or vllm:generation_tokens")
        cpu += float(m["process_cpu_seconds"])
        tokens += float(m["vllm:generation_tokens"])
    return cpu, tokens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gateway", type=Path, nargs="+", required=True, help="replays through qlmctl serve")
    ap.add_argument("--direct", type=Path, nargs="+", required=True, help="replays straight to vLLM")
    args = ap.parse_args(argv)
    gw = [cpu_and_tokens(d) for d in args.gateway]
    direct = [cpu_and_tokens(d) for d in args.direct]
    tokens = {t for _, t in gw + direct}
    if len(tokens) != 1:
        print(f"the replays streamed different token counts ({sorted(tokens)}): not the same trace", file=sys.stderr)
        return 1
    n = tokens.pop()
    g, d = mean(c for c, _ in gw), mean(c for c, _ in direct)
    extra = (g - d) / n
    print(f"API-server CPU: through the gateway {g:.2f} s ({len(gw)} runs), straight {d:.2f} s ({len(direct)} runs), "
          f"{n:,.0f} tokens streamed")
    print(f"frontend_usage_cpu_per_token_s: {extra:.3g}  ({extra * 1e6:+.1f} us a token; {(g - d) / d:+.1%} CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
