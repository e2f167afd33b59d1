"""Summarise an `nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,power.limit,temperature.gpu,
utilization.gpu,clocks_event_reasons.active --format=csv -lms N` log by phase (a file of "epoch-seconds name" lines,
a phase ending where the next begins; names ending in "-end" close one). Busy samples: power over 150 W.

    python bench/device/smi_phases.py SMI.csv PHASES.txt
"""

import csv
import sys
from datetime import datetime


def main(smi: str, phases_file: str) -> None:
    phases = [line.split(" ", 1) for line in open(phases_file).read().splitlines() if line.strip()]
    rows = list(csv.reader(open(smi)))
    data = []
    for r in rows[1:]:
        try:  # nvidia-smi stamps local time, as datetime.timestamp() reads it
            t = datetime.strptime(r[0].strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
            data.append((t, float(r[1].split()[0]), float(r[3].split()[0]), float(r[5]), r[7].strip()))
        except (ValueError, IndexError):
            pass
    ends = phases[1:] + [[str(data[-1][0] + 1 if data else 0), "end"]]
    for (t0, name), (t1, _) in zip(phases, ends):
        if name.endswith("-end"):
            continue
        sel = [d for d in data if float(t0) <= d[0] < float(t1)]
        busy = [d for d in sel if d[2] > 150]  # an idle H100 draws ~70-120 W
        if not sel:
            continue

        def f(xs: list[float]) -> tuple | None:
            return (round(sum(xs) / len(xs)), round(min(xs)), round(max(xs))) if xs else None

        capped = sum(1 for d in busy if int(d[4], 16) & 0x4) if busy else 0  # SW power cap
        print(f"{name}: {len(sel)} samples, {len(busy)} busy; busy SM MHz mean/min/max {f([d[1] for d in busy])}, "
              f"W {f([d[2] for d in busy])}, temp {f([d[3] for d in sel])}, power-capped {capped}/{len(busy)}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
