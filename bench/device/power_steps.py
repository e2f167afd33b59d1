"""Step times under sustained prefill load against the step model, window by window (issue 18: under overload the
H100 sits at its 700 W power cap with the SM clock at ~1,400-1,550 MHz, where `profile-model`'s short bursts run
at ~1,930 MHz; bench/device/sustained.sh).

Each phase starts B decoders on an idle engine, then sends prefill-only requests (L prompt tokens, max_tokens=1)
for `--seconds`: at `duty` 1 enough of them in flight to fill every step's token budget, below 1 at that share of
the engine's prefill capacity (by the step model), evenly spaced. Every `--window` seconds the engine's ITL totals
(sum and count, over B: the steps taken and their time) and its prompt-token counter give the window's measured
step time against the step model's for the same steps (the prompt tokens spread evenly over them at saturation; below it, a step
of its own for each prompt).

    python bench/device/power_steps.py --url http://127.0.0.1:8000 --profile PROFILE.yaml --out FILE.json
    python bench/device/power_steps.py --profile PROFILE.yaml --from FILE.json   # the fit alone, again
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from qlmctl.client.prober import Profiler  # noqa: E402
from qlmctl.scenario import ProfileSpec, _load_yaml_model  # noqa: E402
from simulator.profile import chunk_pairs  # noqa: E402


def window_model(p, b: int, ctx_now: float, steps: float, tokens: float, length: int) -> tuple[float, float]:
    """(the step model's time for a window's steps, its decode-only part): `steps` steps beside `b` decoders of
    `ctx_now` context that prefilled `tokens` prompt tokens in prompts of `length`."""
    if not steps:
        return 0.0, 0.0
    decode = steps * p.step_time(0, b, b * ctx_now)
    per = tokens / steps
    if per >= length:  # a prompt or more in every step: spread evenly
        return steps * p.step_time(per, b, b * ctx_now, per / length * chunk_pairs(0, length)), decode
    # Below saturation each prompt has a step of its own, the rest decode only.
    prompts = tokens / length
    return (prompts * p.step_time(length, b, b * ctx_now, chunk_pairs(0, length))
            + (steps - prompts) * p.step_time(0, b, b * ctx_now)), decode


def fit(rows: list[dict], p, b: int, ctx: int, length: int, share_from: float) -> None:
    """Print, per phase, the measured time over the model's for decode-only windows and for the second half of the
    injection, the share of the model's time that is prefill work, and the slowdown of that work it implies
    (relative to the decode-only windows, which carry the host's own offset); then the slowdown of the phase at
    the highest prefill share (`EngineProfile.sustained_prefill_slowdown`), and the mean of those at `share_from`
    or more."""
    picked: list[tuple[float, float]] = []  # (share, slowdown)
    for duty in dict.fromkeys(r["phase"] for r in rows):
        got = [r for r in rows if r["phase"] == duty]
        done = 0.0
        for r in got:  # the decoders' context, window by window (they start afresh each phase)
            r["_model"] = window_model(p, b, ctx + done + r["steps"] / 2, r["steps"], r["prompt_tokens"], length)
            done += r["steps"]
        dec = [r for r in got if r["window"].startswith("decode")]
        body = [r for r in got if r["window"].startswith("w")]
        late = body[len(body) // 2:]
        dec_ratio = sum(r["time_s"] for r in dec) / sum(r["_model"][0] for r in dec)
        model = sum(r["_model"][0] for r in late)
        ratio = sum(r["time_s"] for r in late) / model
        share = 1.0 - sum(r["_model"][1] for r in late) / model
        slow = (ratio / dec_ratio - 1.0) / share if share > 0 else 0.0
        if share >= share_from:
            picked.append((share, slow))
        print(f"duty {duty:g}: decode-only {dec_ratio:.3f}, second half {ratio:.3f} of the model; prefill share "
              f"{share:.2f}; prefill work {slow:+.1%}")
    if picked:
        # Overload keeps an engine's steps full of prompts: the phase nearest that (the highest share) is the figure.
        share, slow = max(picked)
        print(f"sustained_prefill_slowdown: {slow:.3f} (the phase at the highest prefill share, {share:.2f}; the mean "
              f"of the {len(picked)} at {share_from:g} or more: {sum(x for _, x in picked) / len(picked):.3f})")


async def phase(prof: Profiler, p, duty: float, args) -> list[dict]:
    b, ctx, length = args.batch, args.ctx, args.length
    await prof.wait_idle()
    decoders = [asyncio.create_task(prof.complete(ctx, args.decode_tokens)) for _ in range(b)]
    rows: list[dict] = []
    senders: set[asyncio.Task] = set()
    try:
        await asyncio.sleep(2.0)
        await prof.wait_requests(lambda running, waiting: running >= b and waiting == 0)
        steps_done = 0.0  # decode steps so far: the decoders' context grows by one token a step

        async def sample() -> tuple[float, float, float]:
            itl = await prof.itl_totals()
            pt = await prof.counter("vllm:prompt_tokens")
            assert itl is not None and pt is not None
            return itl[0], itl[1], pt

        def row(t: float, a: tuple, z: tuple, label: str) -> dict:
            nonlocal steps_done
            steps = (z[1] - a[1]) / b
            time_s = (z[0] - a[0]) / b
            tokens = z[2] - a[2]
            ctx_now = ctx + steps_done + steps / 2
            steps_done += steps
            model = window_model(p, b, ctx_now, steps, tokens, length)[0]
            return {"phase": duty, "window": label, "t": t, "steps": steps, "time_s": time_s,
                    "prompt_tokens": tokens, "step_s": time_s / steps if steps else None,
                    "model_step_s": model / steps if steps else None,
                    "ratio": time_s / model if model else None}

        a = await sample()
        await asyncio.sleep(1.0)
        z = await sample()
        rows.append(row(time.time(), a, z, "decode-before"))
        # Prefill capacity by the step model: tokens a full step of prompts takes, per the time it takes.
        full = p.max_num_batched_tokens - b
        cap_rps = full / p.step_time(full, b, b * ctx, full / length * chunk_pairs(0, length)) / length
        gap = 1.0 / (duty * cap_rps)
        t_end = time.perf_counter() + args.seconds
        inflight = max(1, -(-p.max_num_batched_tokens // length) * 3)

        async def send() -> None:
            await prof.stream(length, 1)

        async def injector() -> None:
            nxt = time.perf_counter()
            while time.perf_counter() < t_end:
                if duty >= 1.0:
                    while len(senders) < inflight:
                        task = asyncio.create_task(send())
                        senders.add(task)
                        task.add_done_callback(senders.discard)
                    await asyncio.sleep(0.005)
                else:
                    task = asyncio.create_task(send())
                    senders.add(task)
                    task.add_done_callback(senders.discard)
                    nxt += gap
                    await asyncio.sleep(max(0.0, nxt - time.perf_counter()))

        inj = asyncio.create_task(injector())
        i = 0
        a = await sample()
        while time.perf_counter() < t_end:
            await asyncio.sleep(args.window)
            z = await sample()
            rows.append(row(time.time(), a, z, f"w{i}"))
            a, i = z, i + 1
        await inj
        await asyncio.gather(*list(senders), return_exceptions=True)
        a = await sample()
        await asyncio.sleep(1.0)
        z = await sample()
        rows.append(row(time.time(), a, z, "decode-after"))
        if any(d.done() for d in decoders):
            raise RuntimeError("the decoders finished before the phase did: raise --decode-tokens")
    finally:
        for d in decoders:
            d.cancel()
        await asyncio.gather(*decoders, return_exceptions=True)
    return rows


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--profile", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=32, help="decoders running throughout")
    ap.add_argument("--ctx", type=int, default=128, help="prompt tokens of each decoder")
    ap.add_argument("--decode-tokens", type=int, default=4000, help="tokens each decoder generates (at most)")
    ap.add_argument("--length", type=int, default=2048, help="prompt tokens of each prefill-only request")
    ap.add_argument("--duties", default="1,0.6,0.3", help="share of the prefill capacity sent, per phase")
    ap.add_argument("--seconds", type=float, default=20.0, help="each phase's injection, s")
    ap.add_argument("--window", type=float, default=1.0, help="sampling window, s")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--from", dest="from_file", type=Path, default=None,
                    help="fit a saved --out file (no engine needed)")
    ap.add_argument("--share-from", type=float, default=0.6,
                    help="phases at this prefill share or more make the fitted slowdown")
    ap.add_argument("--phases", type=Path, default=None, help="append each phase's start and end (epoch s, name) here "
                    "(for bench/device/smi_phases.py)")
    args = ap.parse_args()

    def mark(name: str) -> None:
        if args.phases is not None:
            with args.phases.open("a") as f:
                f.write(f"{time.time()} {name}\n")

    p = _load_yaml_model(args.profile, ProfileSpec).to_profile(args.model)
    if args.from_file is not None:
        fit(json.loads(args.from_file.read_text()), p, args.batch, args.ctx, args.length, args.share_from)
        return
    if args.out is None:
        ap.error("--out is required to measure")
    prof = Profiler(args.url, args.model, seed=time.time_ns() % 2**32)
    rows: list[dict] = []
    try:
        for duty in (float(x) for x in args.duties.split(",")):
            mark(f"duty-{duty:g}")
            got = await phase(prof, p, duty, args)
            mark(f"duty-{duty:g}-end")
            rows.extend(got)
            body = [r for r in got if r["window"].startswith("w") and r["ratio"]]
            early, late = body[:2], body[len(body) // 2:]

            def ratio(rs: list[dict]) -> float:  # time over the model's time, summed over windows
                return sum(r["time_s"] for r in rs) / max(1e-12, sum(r["model_step_s"] * r["steps"] for r in rs))

            print(json.dumps({"duty": duty, "decode_before_ratio": got[0]["ratio"],
                              "first_2s_ratio": ratio(early), "second_half_ratio": ratio(late),
                              "second_half_step_ms": sum(r["time_s"] for r in late) * 1e3
                              / max(1e-9, sum(r["steps"] for r in late)),
                              "second_half_tokens_per_step": sum(r["prompt_tokens"] for r in late)
                              / max(1e-9, sum(r["steps"] for r in late)),
                              "decode_after_ratio": got[-1]["ratio"]}), flush=True)
            args.out.write_text(json.dumps(rows, indent=1))
            await asyncio.sleep(5.0)  # let the clock recover before the next phase
    finally:
        await prof.close()
    fit(rows, p, args.batch, args.ctx, args.length, args.share_from)


if __name__ == "__main__":
    asyncio.run(main())
