"""A simulated replay's TTFT split into vLLM's API server and its engine, in means, to set beside a live run's
(`bench/req_trace_split.py DIR --api`: vLLM's queue + prefill against the rest).

    python bench/api_part.py --profile docs/fidelity/trace-h200/h200-lease.yaml --rate 21.5 -n 540
    python bench/api_part.py --profile P --rate 21.5 -n 540 --priority    (the engine with vLLM's priority policy)

The simulation replays the scenario (`--scenario`, the conversation's unseen replays by default) straight to vLLM
with prefix caching off, as `bench/fidelity_compare.py` does; the API server's part is each request's wait in its
queue (`APIServer.ingress_delay`, recorded as the run asks for it) plus the profile's frontend latency, the engine's
the rest of the TTFT.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fidelity_compare import replay_scenario  # noqa: E402  (bench/, this script's folder, is on the path)

from qlmctl.metrics import requests_frame  # noqa: E402
from qlmctl.runner import simulate  # noqa: E402
from qlmctl.workload import build_requests  # noqa: E402
from simulator.api_server import APIServer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", type=Path, required=True, help="the profile every model runs on")
    ap.add_argument("--scenario", type=Path, default=REPO / "scenarios/fidelity_unseen.yaml")
    ap.add_argument("--rate", type=float, required=True, help="arrival rate, requests a second")
    ap.add_argument("-n", type=int, required=True, help="requests")
    ap.add_argument("--priority", action="store_true", help="the engines with --scheduling-policy priority")
    args = ap.parse_args()
    waits: list[float] = []
    take_in = APIServer.ingress_delay

    def recorded(self, now: float) -> float:
        wait = take_in(self, now)
        waits.append(wait)
        return wait

    APIServer.ingress_delay = recorded  # this process only: the run asks it once a request
    sc = replay_scenario(args.scenario, {"workload": {"target_rate_rps": args.rate, "max_requests": args.n}},
                         "priority" if args.priority else None, profile=args.profile,
                         extra={"enable_prefix_caching": False})
    reqs, _ = build_requests(sc)
    run = simulate(sc, "direct", reqs)
    if not waits:  # a compiled build's cluster calls its compiled APIServer directly, past the patch
        raise SystemExit("no API-server waits recorded: run it on the pure build (an editable install, or a checkout "
                         "without compiled modules)")
    ttft = requests_frame(run.result.requests)["ttft_s"].to_numpy() * 1e3
    inst = sc.spec.cluster.instances[0]
    latency = sc.profile(inst.model, inst.gpu, inst.profile_overrides, inst.engine).frontend_latency_s * 1e3
    wait = float(np.mean(waits)) * 1e3
    print(f"TTFT mean {ttft.mean():.1f} ms (p50 {np.median(ttft):.1f}): API server {wait + latency:.1f} "
          f"(queue {wait:.1f}, p50 {np.median(waits) * 1e3:.1f}; latency {latency:.1f}), "
          f"engine {ttft.mean() - wait - latency:.1f}")


if __name__ == "__main__":
    main()
