"""Summarise an `nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,power.limit,temperature.gpu,
utilization.gpu,clocks_event_reasons.active --format=csv -lms N` log by phase (a file of "epoch-seconds name" lines,
a phase ending where the next begins; names ending in "-end" close one). Busy samples: power over 150 W.

    python bench/device/smi_phases.py SMI.csv PHASES.txt
"""

import csv
import math
import sys
from collections.abc import Iterable
from datetime import datetime
from typing import NamedTuple


class SmiSample(NamedTuple):
    t: float
    """Epoch seconds."""
    sm_mhz: float
    power_w: float
    temp_c: float
    util_pct: float
    """NaN where nvidia-smi gave none."""
    reasons: str
    """The active clock event (throttle) reasons, a hex mask."""


def read_smi(lines: Iterable[str]) -> list[SmiSample]:
    """The samples of such a log (its header line first); rows that do not parse are left out."""
    out = []
    for r in list(csv.reader(lines))[1:]:
        try:  # nvidia-smi stamps local time, as datetime.timestamp() reads it
            t = datetime.strptime(r[0].strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
            head = (t, float(r[1].split()[0]), float(r[3].split()[0]), float(r[5]))
            reasons = r[7].strip()
        except (ValueError, IndexError):
            continue
        try:
            util = float(r[6].split()[0])
        except (ValueError, IndexError):
            util = math.nan
        out.append(SmiSample(*head, util, reasons))
    return out


def main(smi: str, phases_file: str) -> None:
    phases = [line.split(" ", 1) for line in open(phases_file).read().splitlines() if line.strip()]
    data = read_smi(open(smi))
    ends = phases[1:] + [[str(data[-1][0] + 1 if data else 0), "end"]]
    for (t0, name), (t1, _) in zip(phases, ends):
        if name.endswith("-end"):
            continue
        sel = [d for d in data if float(t0) <= d.t < float(t1)]
        busy = [d for d in sel if d.power_w > 150]  # an idle H100 draws ~70-120 W
        if not sel:
            continue

        def f(xs: list[float]) -> tuple | None:
            return (round(sum(xs) / len(xs)), round(min(xs)), round(max(xs))) if xs else None

        capped = sum(1 for d in busy if int(d.reasons, 16) & 0x4) if busy else 0  # SW power cap
        print(f"{name}: {len(sel)} samples, {len(busy)} busy; busy SM MHz mean/min/max {f([d.sm_mhz for d in busy])}, "
              f"W {f([d.power_w for d in busy])}, temp {f([d.temp_c for d in sel])}, power-capped {capped}/{len(busy)}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
