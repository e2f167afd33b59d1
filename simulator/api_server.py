"""vLLM's API server in front of one engine, as the requests going through it see it.

The server is one Python process between the clients and the engine: it takes in each request before the
engine sees it and relays every streamed token after. Its costs are the profile's (`frontend_delay`,
`frontend_wait`); what it adds here is the state they depend on: the streams it relays (the engine's running
sequences, with the engine's step length) and the rate at which requests arrive, which it tracks as an
exponentially decayed count.
"""

from __future__ import annotations

import math

from simulator.engine import Engine

RATE_WINDOW_S = 1.0
"""Time constant of the arrival rate the server is seen to take in, s."""


class APIServer:
    """The API server in front of `engine` (the engine's model may change; the server reads its profile)."""

    __slots__ = ("engine", "_rate", "_rate_t")

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._rate = 0.0  # arrivals per second, decayed over RATE_WINDOW_S
        self._rate_t = 0.0

    def arrival_rate(self, now: float) -> float:
        """Requests per second taken in, decayed to `now` (which must not precede the last arrival)."""
        return self._rate * math.exp(-(now - self._rate_t) / RATE_WINDOW_S)

    def frontend_delay(self) -> float:
        """What a client sees on top of the engine's time now: the profile's frontend delay at the streams
        the server relays (0 with no model loaded)."""
        prof = self.engine.profile
        return prof.frontend_delay(self.engine.num_running) if prof is not None else 0.0

    def ingress_delay(self, now: float) -> float:
        """Take in a request at `now`; return how long it waits in the server before the engine sees it (the
        profile's queue model at the streams, step length and arrival rate now, this request included)."""
        self._rate = self.arrival_rate(now) + 1.0 / RATE_WINDOW_S
        self._rate_t = now
        prof = self.engine.profile
        if prof is None:
            return 0.0
        return prof.frontend_wait(self.engine.num_running, self.engine.step_s(), self._rate)
