"""Steps that prefill several prompts at once, against the profile's step model (issue 18: code-completion traffic
at 22 req/s ran ~3 % slower live than simulated, in steps of ~8k tokens made of several 2k-token prompts, where
`profile-model` times one prefill per step).

B decoders run throughout; each injection sends k prompts of L tokens at the same moment (max_tokens=1), so that
they reach the engine within one step and are scheduled together. The engine's inter-token latency totals over
the injection (sum and count, divided by B) give the steps taken and their total time; minus the same number of
decode-only steps (timed in windows either side) that is the extra time the k prefills cost. The step model's
extra for the same work, one step holding all k (and, for scale, k steps of one each), is printed beside it.

    python bench/device/multi_prefill.py --url http://127.0.0.1:8000 --profile PROFILE.yaml --out FILE.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from qlmctl.client.prober import Profiler  # noqa: E402
from qlmctl.scenario import ProfileSpec, _load_yaml_model  # noqa: E402
from simulator.profile import chunk_pairs  # noqa: E402

POINTS = [(1, 2048), (2, 2048), (3, 2048), (4, 2000), (2, 4000), (8, 1000), (16, 500)]


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--profile", type=Path, default=None)
    ap.add_argument("--batch", type=int, default=32, help="decoders running throughout")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--ctx", type=int, default=512, help="prompt tokens of each decoder")
    ap.add_argument("--decode-tokens", type=int, default=3000, help="tokens each decoder generates (at most)")
    ap.add_argument("--points", default=None, metavar="KxL,...",
                    help="the injections, k prompts of L tokens each (default: " +
                         ",".join(f"{k}x{n}" for k, n in POINTS) + ")")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    points = POINTS if args.points is None else [tuple(int(x) for x in kl.split("x")) for kl in args.points.split(",")]
    # Prompts of random tokens, a fresh draw every run: with the same seed a later run's prompts would repeat an
    # earlier run's token stream, and a prefix cache left on would skip part of their prefill.
    prof = Profiler(args.url, args.model, seed=time.time_ns() % 2**32)
    b, ctx = args.batch, args.ctx
    # A run right after another starts only once the engine has let go of the last one's decoders (aborted as
    # their streams closed): the windows divide the engine's ITL totals by `b`, which strays count too.
    await prof.wait_idle()
    decoders = [asyncio.create_task(prof.complete(ctx, args.decode_tokens)) for _ in range(b)]
    rows = []
    try:
        await asyncio.sleep(3.0)
        await prof.wait_requests(lambda running, waiting: running >= b and waiting == 0)  # every decoder running

        async def window(k: int, length: int) -> tuple[float, float]:
            before = await prof.itl_totals()
            if k:
                await asyncio.gather(*(prof.stream(length, 1) for _ in range(k)))
            else:
                await asyncio.sleep(0.3)
            after = await prof.itl_totals()
            if any(d.done() for d in decoders):
                raise RuntimeError("the decoders finished before the windows did")
            return after[0] - before[0], after[1] - before[1]

        for k, length in points:
            extras, decode_steps = [], []
            for _ in range(args.reps):
                d0 = await window(0, 0)
                s, c = await window(k, length)
                d1 = await window(0, 0)
                t_dec = (d0[0] + d1[0]) / (d0[1] + d1[1])
                decode_steps.append(t_dec)
                extras.append((s - c * t_dec) / b)
            row = {"k": k, "prompt_tokens": length, "decoders": b, "extra_s": statistics.median(extras),
                   "extras_s": extras, "decode_step_s": statistics.median(decode_steps)}
            if args.profile is not None:
                p = _load_yaml_model(args.profile, ProfileSpec).to_profile(args.model)
                one = p.step_time(k * length, b, b * ctx, sum(chunk_pairs(0, length) for _ in range(k))) \
                    - p.step_time(0, b, b * ctx)
                each = k * (p.step_time(length, b, b * ctx, chunk_pairs(0, length)) - p.step_time(0, b, b * ctx))
                row.update(model_one_step_s=one, model_k_steps_s=each)
            rows.append(row)
            print(json.dumps({key: (round(v * 1e3, 2) if key.endswith("_s") else v) for key, v in row.items()
                              if key != "extras_s"}), flush=True)
    finally:
        for d in decoders:
            d.cancel()
        await asyncio.gather(*decoders, return_exceptions=True)
        await prof.close()
    args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
