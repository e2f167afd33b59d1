"""Step times under sustained prefill load against the step model, at several loads (issue 18: under overload the
H100 sits at its 700 W power cap with the SM clock at ~1,400-1,550 MHz, where `profile-model`'s short bursts run
at ~1,930 MHz; bench/device/sustained.sh).

Each run is `Profiler.sustained_run` (what `profile-model --sustained` measures once, with every step full):
B decoders on an idle engine, then prompts of L tokens (max_tokens=1) for `--seconds`, at `duty` 1 as many as keep
every step full, below 1 at that share of the engine's prefill capacity (by the step model), evenly spaced; the
windows before, during and after. `simulator.fit.sustained_slowdowns` compares each run with the profile's model.

    python bench/device/power_steps.py --url http://127.0.0.1:8000 --profile PROFILE.yaml --out FILE.json
    python bench/device/power_steps.py --profile PROFILE.yaml --from FILE.json   # the comparison alone, again
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from qlmctl.client.prober import Profiler  # noqa: E402
from qlmctl.scenario import ProfileSpec, _load_yaml_model  # noqa: E402
from simulator.fit import SUSTAINED_SHARE, SustainedWindow, sustained_slowdowns  # noqa: E402
from simulator.profile import chunk_pairs  # noqa: E402


def report(p, windows: list[SustainedWindow], duties: dict[int, float]) -> None:
    rows = sustained_slowdowns(p, windows)
    for run, dec, load, share, slow in rows:
        print(f"duty {duties.get(run, run):g}: decode-only {dec:.3f}, second half {load:.3f} of the model; "
              f"prefill share {share:.2f}; prefill work {slow:+.1%}")
    high = [(share, slow) for _, _, _, share, slow in rows if share >= SUSTAINED_SHARE]
    if high:
        share, slow = max(high)
        print(f"sustained_prefill_slowdown: {slow:.3f} (the run at the highest prefill share, {share:.2f}, as "
              f"profile-model takes it; the mean of the {len(high)} at {SUSTAINED_SHARE:g} or more: "
              f"{sum(x for _, x in high) / len(high):.3f})")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--profile", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=32, help="decoders running throughout")
    ap.add_argument("--ctx", type=int, default=128, help="prompt tokens of each decoder")
    ap.add_argument("--decode-tokens", type=int, default=4000, help="tokens each decoder generates (at most)")
    ap.add_argument("--length", type=int, default=2048, help="prompt tokens of each prefill-only request")
    ap.add_argument("--duties", default="1,0.8,0.5,0.25", help="share of the prefill capacity sent, per run")
    ap.add_argument("--seconds", type=float, default=25.0, help="each run's load, s")
    ap.add_argument("--window", type=float, default=1.0, help="sampling window, s")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--from", dest="from_file", type=Path, default=None,
                    help="compare a saved --out file with the profile (no engine needed)")
    ap.add_argument("--phases", type=Path, default=None, help="append each run's start and end (epoch s, name) here "
                    "(for bench/device/smi_phases.py)")
    args = ap.parse_args()
    p = _load_yaml_model(args.profile, ProfileSpec).to_profile(args.model)
    if args.from_file is not None:
        saved = json.loads(args.from_file.read_text())
        report(p, [SustainedWindow(**w) for w in saved["windows"]], {int(k): v for k, v in saved["duties"].items()})
        return
    if args.out is None:
        ap.error("--out is required to measure")

    def mark(name: str) -> None:
        if args.phases is not None:
            with args.phases.open("a") as f:
                f.write(f"{time.time()} {name}\n")

    # The engine's prefill capacity by the step model: a full step of prompts, per the time it takes.
    b, n = args.batch, args.length
    full = p.max_num_batched_tokens - b
    cap_rps = full / p.step_time(full, b, b * args.ctx, full / n * chunk_pairs(0, n)) / n
    duties = {i: float(x) for i, x in enumerate(args.duties.split(","))}
    prof = Profiler(args.url, args.model, seed=time.time_ns() % 2**32)
    windows: list[SustainedWindow] = []
    try:
        for run, duty in duties.items():
            mark(f"duty-{duty:g}")
            windows += await prof.sustained_run(run, b, n, args.seconds, rate_rps=None if duty >= 1 else duty * cap_rps,
                                                context=args.ctx, decode_tokens=args.decode_tokens,
                                                budget=p.max_num_batched_tokens, window_s=args.window)
            mark(f"duty-{duty:g}-end")
            args.out.write_text(json.dumps({"duties": duties, "windows": [asdict(w) for w in windows]}, indent=1))
            await asyncio.sleep(5.0)  # let the clock recover before the next run
    finally:
        await prof.close()
    report(p, windows, duties)


if __name__ == "__main__":
    asyncio.run(main())
