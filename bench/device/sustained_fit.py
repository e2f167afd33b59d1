"""The sustained-load slowdown of a raw profile's sustained windows, read against a committed profile's step model.

    python bench/device/sustained_fit.py RAW.json --profile scenarios/profiles/h200-llama-3.1-8b.yaml

`profile-model` fits the slowdown against the profile it measures in the same call; a short call that measures only
the sustained run (bench/device/sustained_only.sh) has too few step points for that, so its windows are read here
against an existing profile of the same GPU and model (the decode-only windows carry the host's own offset)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dataclasses import fields  # noqa: E402

from simulator.fit import RawProfile, sustained_slowdowns  # noqa: E402
from simulator.profile import EngineProfile  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("raw", type=Path)
    ap.add_argument("--profile", type=Path, required=True)
    args = ap.parse_args()
    import yaml

    raw = RawProfile.from_json(args.raw.read_text())
    known = {k: v for k, v in yaml.safe_load(args.profile.read_text()).items()
              if k in {f.name for f in fields(EngineProfile)} and k != "sustained_prefill_slowdown"}
    prof = EngineProfile(**{"model": raw.model, **known})
    for run, dec, load, share, slow in sustained_slowdowns(prof, raw.sustained):
        print(f"run {run}: decode-only steps at {dec:.3f} of the model, loaded steps at {load:.3f} (prefill work "
              f"{share:.0%} of their time): prefill work {slow:+.1%}")


if __name__ == "__main__":
    main()
