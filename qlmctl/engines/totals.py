"""An engine's cumulative histograms and counters over a run: summed from its Prometheus page, differenced.

`parse_engine_totals` uses prometheus_client's full parser, which takes milliseconds on a large page: for
the start and end of a run, off the gateway's event loop (the per-poll reading is each kind's own fast scan).
"""

from __future__ import annotations

from typing import Any

from qlmctl.engines.base import EngineTotals, HistogramTotals


def parse_engine_totals(text: str, histograms: tuple[str, ...] = (), counters: tuple[str, ...] = ()) -> EngineTotals:
    """Sum `histograms` and `counters` over their label sets (model_name, engine, ...) on a /metrics page.

    Samples are matched by name, not by family, so that both spellings of a counter work: the parser
    strips `_total` from a counter family's name when the page types it, and keeps it when the page does
    not (and a histogram's name may itself end in `_total`). Series that are absent are absent from the
    result.
    """
    from prometheus_client.parser import text_string_to_metric_families

    roles: dict[str, tuple[str, str]] = {}
    for h in histograms:
        for suffix in ("_bucket", "_count", "_sum"):
            roles[h + suffix] = (h, suffix)
    for c in counters:
        roles[c] = roles[c + "_total"] = (c, "")
    out = EngineTotals()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            role = roles.get(s.name)
            if role is None:
                continue
            name, suffix = role
            if not suffix:
                out.counters[name] = out.counters.get(name, 0.0) + s.value
                continue
            h = out.histograms.setdefault(name, HistogramTotals())
            if suffix == "_count":
                h.count += s.value
            elif suffix == "_sum":
                h.sum += s.value
            elif "le" in s.labels:
                le = s.labels["le"]
                h.buckets[le] = h.buckets.get(le, 0.0) + s.value
    return out


def _bound(le: str) -> float:
    try:
        return float(le)
    except ValueError:
        return float("inf")


def engine_totals_delta(before: EngineTotals, after: EngineTotals) -> dict[str, Any]:
    """What changed between two scrapes of one engine, as plain JSON-serialisable values.

    Returns {histogram: {"count", "sum", "mean" (None without observations), "buckets": {le: cumulative
    count}}, counter: change}, for the series on the later page. A series that went down (the engine
    restarted in between) counts from zero, as Prometheus' `increase` does.
    """
    out: dict[str, Any] = {}
    for name, h in after.histograms.items():
        b = before.histograms.get(name)
        if b is None or h.count < b.count:
            b = HistogramTotals()
        count = h.count - b.count
        total = h.sum - b.sum
        les = sorted(h.buckets, key=_bound)
        buckets = {le: h.buckets[le] - b.buckets.get(le, 0.0) for le in les}
        out[name] = {"count": count, "sum": total, "mean": total / count if count > 0 else None, "buckets": buckets}
    for name, v in after.counters.items():
        prev = before.counters.get(name, 0.0)
        out[name] = v - prev if v >= prev else v
    return out
