"""vLLM's API server in front of one engine, as the requests going through it see it.

The server is one Python process between the clients and the engine: it takes in each request before the
engine sees it and relays every streamed token after. Its costs are the profile's (`frontend_delay`,
`frontend_wait`); what it adds here is the state they depend on: the rate at which requests arrive (an
exponentially decayed count over `RATE_WINDOW_S`) and the load of the tokens it streams. That load is, by the
profile's `frontend_window_s`, either the engine step in flight (its streams over its length), or the tokens
streamed and the steps taken over an exponential window of that length. The two agree on a steady batch; with
short decode-only steps between long prefill ones, the step in flight puts a request that arrives during a
short step near saturation (up to ~0.2 s at 200 streams), the window does not. docs/fidelity.md says which
fits which live runs.
"""

from __future__ import annotations

import math
from typing import Final

from simulator.engine import Engine
from simulator.profile import FRONTEND_RHO_CAP

RATE_WINDOW_S: Final = 1.0
"""Time constant of the rates the server is seen to work at, s."""


class APIServer:
    """The API server in front of `engine` (the engine's model may change; the server reads its profile)."""

    __slots__ = ("engine", "_rate", "_rate_t", "_token_rate", "_step_rate", "_tokens", "_steps", "_seen_t")

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._rate = 0.0  # arrivals per second, decayed over RATE_WINDOW_S
        self._rate_t = 0.0
        self._token_rate = 0.0  # tokens streamed per second, weighted over the profile's frontend_window_s
        self._step_rate = 0.0  # engine steps per second, the same way
        self._tokens = 0  # the engine's token and step counts at `_seen_t`
        self._steps = 0
        self._seen_t = 0.0

    def arrival_rate(self, now: float) -> float:
        """Requests per second taken in, decayed to `now` (which must not precede the last arrival)."""
        return self._rate * math.exp(-(now - self._rate_t) / RATE_WINDOW_S)

    def stream_rates(self, now: float, window_s: float) -> tuple[float, float]:
        """(tokens streamed per second, engine steps per second) over an exponential window of `window_s` up to
        `now`: each interval since the last look weighs in at the rate it had (tokens and steps spread evenly
        over it)."""
        tokens, steps = self.engine.streamed(now)
        dt = now - self._seen_t
        if dt <= 0:
            return self._token_rate, self._step_rate
        decay = math.exp(-dt / window_s)
        grow = (1.0 - decay) / dt
        self._token_rate = self._token_rate * decay + (tokens - self._tokens) * grow
        self._step_rate = self._step_rate * decay + (steps - self._steps) * grow
        self._tokens, self._steps, self._seen_t = tokens, steps, now
        return self._token_rate, self._step_rate

    def frontend_delay(self) -> float:
        """What a client sees on top of the engine's time now: the profile's frontend delay at the streams
        the server relays (0 with no model loaded)."""
        prof = self.engine.profile
        return prof.frontend_delay(self.engine.num_running) if prof is not None else 0.0

    def ingress_delay(self, now: float) -> float:
        """Take in a request at `now`; return how long it waits in the server before the engine sees it: the
        profile's queue model at the streaming load now and the arrival rate (this request included).

        Requests may reach the engine in another order than they came: the wait stands for the first token's
        whole way through the server (the fitted loop hops, out as well as in), not only the hand-over, so
        chaining each behind the one before (a FIFO hand-over) would charge the output side to the requests
        behind. Tried: with the step-in-flight load it put TTFT p50 on the BurstGPT scenario up 30 %."""
        # (`arrival_rate(now)`, inlined: this runs for every dispatch)
        self._rate = self._rate * math.exp(-(now - self._rate_t) / RATE_WINDOW_S) + 1.0 / RATE_WINDOW_S
        self._rate_t = now
        prof = self.engine.profile
        if prof is None or prof.frontend_queue_factor <= 0.0:
            return 0.0
        window = prof.frontend_window_s
        if window <= 0.0:
            # prof.frontend_wait(streams, step, rate), i.e. frontend_wait_rates(streams / step, 1 / step, rate),
            # the same arithmetic without the calls (this runs for every dispatch).
            eng = self.engine
            step = eng.step_s()
            tokens_per_s, steps_per_s = (eng.num_running / step, 1.0 / step) if step > 0 else (0.0, 0.0)
            n = max(1, prof.api_server_count)
            cr = prof.frontend_cpu_per_request_s
            token_load = tokens_per_s / n * prof.frontend_cpu_per_token_s
            per_rate = self._rate / n
            rho = min(FRONTEND_RHO_CAP, token_load + per_rate * cr)
            residual = (token_load * token_load / (2.0 * steps_per_s) if steps_per_s > 0 else 0.0) \
                + per_rate * cr * cr / 2.0
            wait = prof.frontend_queue_factor * residual / (1.0 - rho)
        else:
            tokens_per_s, steps_per_s = self.stream_rates(now, window)
            wait = prof.frontend_wait_rates(tokens_per_s, steps_per_s, self._rate)
        return wait
