"""Repeated log messages of the live gateway, one line per interval.

A hostile or broken client can make the same thing happen thousands of times a second (a malformed body,
a connection refused at the limit, asyncio's "socket.accept() out of system resource"); a line per event
would fill the disk and hide everything else. `RepeatFilter` lets the first record of a message (its
template, before arguments) through, drops the same message for `interval_s`, and says how many it dropped
in the next one it lets through.

The gateway puts one on the `asyncio` and `uvicorn.error` loggers while it runs, and on its own logger for
the records it marks as per-event (`extra=PER_EVENT`).
"""

from __future__ import annotations

import logging
import time

PER_EVENT = {"qlm_per_event": True}
"""`extra` of gateway log records written once per client event (rate-limited by `RepeatFilter`)."""


class RepeatFilter(logging.Filter):
    """At most one record per message template per `interval_s`; the next says how many were dropped."""

    def __init__(self, interval_s: float = 10.0, only_marked: bool = False) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.only_marked = only_marked
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if self.only_marked and not getattr(record, "qlm_per_event", False):
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = time.monotonic()
        last, n = self._seen.get(key, (None, 0))
        if last is not None and now - last < self.interval_s:
            self._seen[key] = (last, n + 1)
            self.dropped += 1
            return False
        self._seen[key] = (now, 0)
        if n:
            record.msg = f"{record.msg} [and {n:,} more like this in the last {now - last:.0f} s]"
        return True


class QuietLoggers:
    """Puts `RepeatFilter`s on the loggers a gateway's clients can flood, for the gateway's lifetime."""

    def __init__(self, interval_s: float) -> None:
        self._filters = [(logging.getLogger("asyncio"), RepeatFilter(interval_s)),
                         (logging.getLogger("uvicorn.error"), RepeatFilter(interval_s)),
                         (logging.getLogger("qlmctl.gateway"), RepeatFilter(interval_s, only_marked=True))]

    def install(self) -> None:
        for logger, f in self._filters:
            logger.addFilter(f)

    def remove(self) -> None:
        for logger, f in self._filters:
            logger.removeFilter(f)
