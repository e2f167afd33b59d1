"""How the API server's queue grows with load, host by host: the queue fit of `profile-model` redone with a
gentler shape.

    python bench/queue_shape.py docs/fidelity/*/raw-lease.json [--exponents 0,0.25,0.5,0.75,1]
    python bench/queue_shape.py docs/fidelity/trace-h200/raw-lease.json --load-window-s 4

The simulator charges a request wait = h * R / (1 - rho) in vLLM's API server (`EngineProfile.frontend_wait_rates`:
R the mean residual CPU work a request finds, rho the server's utilisation, both from the costs profile-model fitted
on the server's CPU counter). Here each raw profile's load windows (those the fit keeps) are refitted with
wait = h * R / (1 - rho)^a for each exponent a (a = 1 is the model; a = 0 a wait for the work in service alone, no
queue behind it), the latency and h by the same weighted least squares, and each window's relative error in client
TTFT printed. A host whose windows a gentler a fits better has a queue that grows more slowly near saturation than
the model's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from simulator.fit import (DEFAULT_LOAD_WINDOW_S, RawProfile, _step_profile, fit_latency_and_factor, fit_profile,
                           load_probe_points, probe_lag_steps, window_engine_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("raw", nargs="+", type=Path, help="raw profiles (profile-model --raw)")
    ap.add_argument("--exponents", default="0,0.25,0.5,0.75,1", help="exponents a of (1 - rho) to try")
    ap.add_argument("--budget", type=int, default=8192, help="--max-num-batched-tokens the engine ran with")
    ap.add_argument("--load-window-s", type=float, default=DEFAULT_LOAD_WINDOW_S,
                    help="the windows' length, s, where a raw file did not record it (the twentieth session's H200: 4)")
    args = ap.parse_args()
    exponents = [float(x) for x in args.exponents.split(",")]
    for path in args.raw:
        raw = RawProfile.from_json(path.read_text())
        window_s = args.load_window_s  # where a window did not record its own length
        fit = fit_profile(raw, args.budget, load_window_s=window_s)
        if fit.frontend_cpu_per_token_s <= 0 and fit.frontend_cpu_per_request_s <= 0:
            print(f"{path}: no API-server CPU counter, no queue to refit")
            continue
        prof = _step_profile(fit, args.budget, frontend_cpu_per_request_s=fit.frontend_cpu_per_request_s,
                             frontend_cpu_per_token_s=fit.frontend_cpu_per_token_s, frontend_queue_factor=1.0)
        pts = [p for p in load_probe_points(raw) if p.engine_s is not None and not p.ran_away(window_s)]
        lag = probe_lag_steps(raw)
        print(f"== {path}: {fit.frontend_cpu_per_token_s * 1e6:.0f} us a token, "
              f"{fit.frontend_cpu_per_request_s * 1e3:.1f} ms a request, {len(pts)} windows")
        for a in exponents:
            rows, rhos = [], []
            for p in pts:
                steps_per_s = 1.0 / p.step_s if p.step_s > 0 else 0.0
                r, rho = prof.frontend_queue_terms(p.tokens_per_s, steps_per_s, p.rate_rps)
                rows.append((p, window_engine_s(p, prof, lag), r / (1.0 - rho) ** a))
                rhos.append(rho)
            lat, h = fit_latency_and_factor(rows)
            errs = [(engine + lat + h * w - p.client_ttft_s) / p.client_ttft_s for p, engine, w in rows]
            cells = " ".join(f"{p.streams}/{p.rate_rps:.0f}(rho {rho:.2f}) {e:+.0%}"
                             for (p, _, _), rho, e in zip(rows, rhos, errs))
            print(f"  a={a:g}: latency {lat * 1e3:.1f} ms, h {h:.2f}, mean |err| {np.mean(np.abs(errs)):.1%}, "
                  f"max {np.max(np.abs(errs)):.1%}  [streams/probes a second] {cells}")


if __name__ == "__main__":
    main()
