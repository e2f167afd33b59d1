"""`qlmctl emulate`: an HTTP server that answers like one `vllm serve` instance, without a GPU.

Token timing, batching, preemption and KV use come from the simulator's vLLM V1 engine model run in
real time (`qlmctl.emulator.core`). The endpoints, bodies and metric names follow vLLM's OpenAI-compatible
server with VLLM_SERVER_DEV_MODE=1 (sleep mode on); see EMULATOR_API.md next to this file.

Use `create_app` for an ASGI app, or `start_emulator` for a server on a background thread (tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from qlmctl import __version__
from qlmctl.emulator.core import EmulatedEngine, EmuRequest, prompt_blocks
from qlmctl.emulator.faults import FaultInjector, FaultMiddleware, Faults
from qlmctl.emulator.protocol import (
    DONE_EVENT,
    VLLM_API_VERSION,
    ApiError,
    GenRequest,
    StreamFormatter,
    chat_prompt_ids,
    chat_prompt_tokens,
    full_response,
    parse_request,
    token_ids,
    token_text,
)
from simulator.profile import EngineProfile

log = logging.getLogger("qlmctl.emulator")

SleepState = Literal["awake", "falling_asleep", "asleep", "waking"]


@dataclass
class EmulatorConfig:
    """Settings of one emulated server (all durations in simulated seconds unless noted)."""

    profile: EngineProfile
    served_model_name: str
    speedup: float = 1.0
    """Simulated seconds per wall second: 10 runs the modelled GPU ten times faster."""
    sleep_s: float | None = None
    """Duration of POST /sleep; None: the profile's sleep_s."""
    policy: str = "fcfs"
    """vLLM --scheduling-policy: fcfs, or priority (then requests may carry `priority`, lower first)."""
    stream_interval_s: float = 0.01
    """Shortest wall-clock gap between token deliveries to a stream, wall seconds."""
    hold_while_asleep: bool = False
    """Completions sent while asleep wait for /wake_up (vLLM 0.24) instead of failing with 503."""
    faults: Faults = field(default_factory=Faults)
    """Faults to inject from the start (see `qlmctl.emulator.faults`); changed at run time by POST /emulator/faults."""


class EmulatorServer:
    """Request handlers and sleep state of one emulated vLLM server (one per app: no global state)."""

    def __init__(self, cfg: EmulatorConfig) -> None:
        self.cfg = cfg
        self.core = EmulatedEngine(cfg.profile, cfg.served_model_name, speedup=cfg.speedup, policy=cfg.policy,
                                   stream_interval_s=cfg.stream_interval_s)
        self.injector = FaultInjector(cfg.faults, cfg.speedup, self.core.set_speed)
        self.sleep_state: SleepState = "awake"
        self.sleep_level = 0
        self._transition = asyncio.Lock()
        self._awake = asyncio.Event()
        self._awake.set()
        self.created = int(time.time())

    @property
    def name(self) -> str:
        return self.cfg.served_model_name

    @property
    def is_sleeping(self) -> bool:
        # Like vLLM: true once /sleep has finished, until /wake_up has finished.
        return self.sleep_state in ("asleep", "waking")

    # ------------------------------------------------------------- lifecycle
    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.injector.start()
        yield
        await self.core.aclose()

    # --------------------------------------------------------------- routes
    def routes(self) -> list[Route]:
        return [
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/version", self.version, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/sleep", self.sleep, methods=["POST"]),
            Route("/wake_up", self.wake_up, methods=["POST"]),
            Route("/is_sleeping", self.is_sleeping_route, methods=["GET"]),
            Route("/reset_prefix_cache", self.reset_prefix_cache, methods=["POST"]),
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/emulator/state", self.emulator_state, methods=["GET"]),
            Route("/emulator/faults", self.get_faults, methods=["GET"]),
            Route("/emulator/faults", self.set_faults, methods=["POST"]),
        ]

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completion")

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    async def models(self, request: Request) -> Response:
        card = {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "vllm",
            "root": self.name,
            "parent": None,
            "max_model_len": self.cfg.profile.max_model_len,
            "permission": [{
                "id": f"modelperm-{self.created:x}", "object": "model_permission", "created": self.created,
                "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                "organization": "*", "group": None, "is_blocking": False,
            }],
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def health(self, request: Request) -> Response:
        return Response(status_code=200)

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": VLLM_API_VERSION, "emulator": f"qlmctl {__version__}"})

    async def metrics(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(self.core.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def is_sleeping_route(self, request: Request) -> Response:
        return JSONResponse({"is_sleeping": self.is_sleeping})

    async def reset_prefix_cache(self, request: Request) -> Response:
        return Response(status_code=200)  # the engine model has no prefix cache

    async def tokenize(self, request: Request) -> Response:
        """POST /tokenize as vLLM's: `{"prompt": str}` (with BOS unless `add_special_tokens` is false) or
        `{"messages": [...]}` (the chat template applied, with the generation prompt)."""
        try:
            body = await _json_body(request)
            if not isinstance(body, dict):
                raise ApiError(400, "The request body must be a JSON object.")
            model = body.get("model") or self.name
            if model != self.name:
                raise ApiError(404, f"The model `{model}` does not exist.", "model")
            if "messages" in body and body.get("prompt") is None:
                chat_prompt_tokens(body["messages"])  # validates
                ids = chat_prompt_ids(body["messages"])
            else:
                prompt = body.get("prompt")
                if not isinstance(prompt, str):
                    raise ApiError(400, "prompt must be a string.", "prompt")
                special = body.get("add_special_tokens", True)
                ids = token_ids(prompt) if special is not False else token_ids(prompt)[1:]
        except ApiError as e:
            return _error(e)
        return JSONResponse({"count": len(ids), "max_model_len": self.cfg.profile.max_model_len, "tokens": ids,
                             "token_strs": None})

    async def emulator_state(self, request: Request) -> Response:
        st: dict[str, Any] = dict(self.core.state())
        st.update(model=self.name, sleep_state=self.sleep_state, is_sleeping=self.is_sleeping)
        return JSONResponse(st)

    async def get_faults(self, request: Request) -> Response:
        return JSONResponse(self.injector.status())

    async def set_faults(self, request: Request) -> Response:
        """POST /emulator/faults: replace the faults (a JSON object of `Faults` fields; `{}` heals)."""
        try:
            faults = Faults.from_json(await _json_body(request))
        except ApiError as e:
            return _error(e)
        except (TypeError, ValueError) as e:
            return _error(ApiError(400, str(e)))
        self.injector.apply(faults)
        return JSONResponse(self.injector.status())

    # ---------------------------------------------------------------- sleep
    async def sleep(self, request: Request) -> Response:
        """POST /sleep?level=1|2: abort requests in flight (as vLLM 0.24), then take `sleep_s` (scaled)."""
        try:
            level = int(request.query_params.get("level", "1"))
        except ValueError:
            return _error(ApiError(400, "level must be 1 or 2.", "level"))
        if level not in (1, 2):
            return _error(ApiError(400, "level must be 1 or 2.", "level"))
        async with self._transition:
            if self.sleep_state == "asleep":
                return Response(status_code=200)
            self.sleep_state = "falling_asleep"
            self._awake.clear()
            n = self.core.abort_all()
            if n:
                log.info("sleep aborted %d request(s) in flight", n)
            self.core.engine.reset_prefix_cache()  # level 1 and 2 both drop the KV cache
            sleep_s = self.cfg.sleep_s if self.cfg.sleep_s is not None else self.cfg.profile.sleep_s
            try:
                await asyncio.sleep(self.core.clock.wall(sleep_s))
            finally:
                self.sleep_state = "asleep"
                self.sleep_level = level
                self.core.metrics.sleep_state = "weights_offloaded" if level == 1 else "discard_all"
        return Response(status_code=200)

    async def wake_up(self, request: Request) -> Response:
        """POST /wake_up: takes load_warm_s after level 1, load_cold_s after level 2 (scaled)."""
        async with self._transition:
            if self.sleep_state == "awake":
                return Response(status_code=200)
            self.sleep_state = "waking"
            p = self.cfg.profile
            dur = p.load_cold_s if self.sleep_level == 2 else p.load_warm_s
            try:
                await asyncio.sleep(self.core.clock.wall(dur))
            finally:
                self.sleep_state = "awake"
                self.sleep_level = 0
                self.core.metrics.sleep_state = "awake"
                self._awake.set()
        return Response(status_code=200)

    # ----------------------------------------------------------- generation
    async def _generate(self, request: Request, kind: Literal["completion", "chat"]) -> Response:
        try:
            body = await _json_body(request)
            gen = parse_request(body, kind, self.name, self.cfg.profile.max_model_len,
                                request.headers.get("x-request-id"))
            if self.sleep_state != "awake" and not self.cfg.hold_while_asleep:
                raise ApiError(503, f"The engine is {self.sleep_state.replace('_', ' ')}: "
                                    f"POST /wake_up and wait for it before sending requests.")
        except ApiError as e:
            return _error(e)
        if gen.stream:
            return StreamingResponse(self._stream(gen), media_type="text/event-stream")
        if not self._awake.is_set() and not await _wait_or_disconnect(request, self._awake.wait()):
            return Response(status_code=499)  # client left while the engine slept
        req = self._submit(gen)
        try:
            finished = await _wait_or_disconnect(request, _ended(req))
        finally:
            if not (req.done or req.aborted or req.error):
                self.core.abort(req)  # cancelled (server stopping) or client gone
        if not finished:
            return Response(status_code=499)  # nobody is listening
        if req.error:
            return _error(ApiError(500, req.error))
        return JSONResponse(full_response(gen, req.produced, req.finish_reason))

    def _submit(self, gen: GenRequest) -> EmuRequest:
        # vLLM accepts `priority` under fcfs too, and ignores it there.
        priority = gen.priority if self.cfg.policy == "priority" else 0
        prof = self.core.profile
        prefix = None
        if prof.enable_prefix_caching and gen.prompt is not None:
            prompt = gen.prompt[0] if isinstance(gen.prompt, list) and len(gen.prompt) == 1 else gen.prompt
            ids = token_ids(prompt) if isinstance(prompt, str) else prompt if isinstance(prompt, list) else []
            prefix = prompt_blocks(ids, prof.block_size)
        return self.core.submit(gen.prompt_tokens, gen.max_tokens, priority=priority, stream=gen.stream,
                                prefix=prefix)

    async def _stream(self, gen: GenRequest) -> AsyncIterator[str]:
        # Submitted on the first iteration: a client gone before the response starts costs nothing.
        fmt = StreamFormatter(gen)
        req: EmuRequest | None = None
        try:
            await self._awake.wait()  # only ever waits with hold_while_asleep
            req = self._submit(gen)
            if gen.kind == "chat":
                yield fmt.role()
            sent = 0
            last_sent = False
            while True:
                await req.event.wait()
                req.event.clear()
                if req.error:
                    yield fmt.error(ApiError(500, req.error))
                    break
                n = req.produced
                ended = req.done or req.aborted
                if n > sent:
                    fr = req.finish_reason if ended else None
                    yield "".join(
                        fmt.token(token_text(gen.prompt_tokens, j), fr if j == n - 1 else None, j + 1, j)
                        for j in range(sent, n)
                    )
                    sent = n
                    last_sent = ended
                if ended:
                    if not last_sent:
                        yield fmt.token("", req.finish_reason, sent)
                    if gen.include_usage:
                        yield fmt.usage(sent)
                    break
            yield DONE_EVENT
        finally:
            if req is not None and not (req.done or req.aborted or req.error):
                self.core.abort(req)


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except ValueError as e:
        raise ApiError(400, f"Invalid JSON body: {e}") from None


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _ended(req: EmuRequest) -> None:
    while not (req.done or req.aborted or req.error):
        await req.event.wait()
        req.event.clear()


async def _wait_or_disconnect(request: Request, aw: Awaitable[Any]) -> bool:
    """Await `aw` (True) unless the client disconnects first (False; `aw` is cancelled)."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    t_aw = asyncio.ensure_future(aw)
    t_disc = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((t_aw, t_disc), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (t_aw, t_disc):
            t.cancel()
    return t_aw.done() and not t_aw.cancelled()


def create_app(
    profile: EngineProfile,
    served_model_name: str,
    *,
    speedup: float = 1.0,
    sleep_s: float | None = None,
    policy: str = "fcfs",
    stream_interval_s: float = 0.01,
    hold_while_asleep: bool = False,
    faults: Faults | None = None,
) -> Starlette:
    """An ASGI app emulating `vllm serve` of one model with `profile`'s timing and limits.

    Args:
        profile: Step-time model and limits (KV blocks, batch size, max_model_len, load times).
        served_model_name: The only model name the server accepts (vLLM's --served-model-name).
        speedup: Simulated seconds per wall second; also divides sleep and wake-up durations.
        sleep_s: Simulated seconds that POST /sleep takes; None uses profile.load_warm_s.
        policy: "fcfs" or "priority" (vLLM's --scheduling-policy).
        stream_interval_s: Shortest wall-clock gap between token deliveries to one stream.
        hold_while_asleep: Completions sent while asleep wait for /wake_up (as vLLM 0.24) instead of
            failing at once with 503.
        faults: Faults to inject from the start (kill, hang, error rate, slowdown; see
            `qlmctl.emulator.faults`). Dropping connections (kill) needs the app served by `uvicorn_server`
            or `start_emulator`.
    """
    server = EmulatorServer(EmulatorConfig(profile, served_model_name, speedup, sleep_s, policy,
                                           stream_interval_s, hold_while_asleep, faults or Faults()))
    app = Starlette(routes=server.routes(), lifespan=server.lifespan,
                    middleware=[Middleware(FaultMiddleware, injector=server.injector)])
    app.state.emulator = server
    return app


@dataclass
class EmulatorHandle:
    """A running in-process emulator; `stop()` it (or use it as a context manager)."""

    host: str
    port: int
    model: str
    app: Starlette
    _server: Any = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:40123 (append /v1 for an OpenAI client)."""
        return f"http://{self.host}:{self.port}"

    def set_faults(self, faults: Faults, timeout_s: float = 5.0) -> dict[str, Any]:
        """Replace the server's faults now (through POST /emulator/faults); returns the fault status."""
        import httpx

        resp = httpx.post(self.url + "/emulator/faults", json=faults.to_json(), timeout=timeout_s)
        resp.raise_for_status()
        return resp.json()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop serving; open streams are cut after a short grace period."""
        if not self._thread.is_alive():
            return
        self._server.should_exit = True
        self._thread.join(min(1.0, timeout_s))
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout_s)

    def __enter__(self) -> "EmulatorHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> "EmulatorHandle":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one). Raises OSError if it cannot bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP; without it
    # every streamed answer on a reused connection waits ~40 ms (Nagle + delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def uvicorn_server(app: Starlette, log_level: str = "warning", access_log: bool = False) -> Any:
    """A uvicorn server for an emulator app (run it with `.run(sockets=[bind_socket(...)])`)."""
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=1, timeout_keep_alive=30)
    server = uvicorn.Server(config)
    emu = getattr(app.state, "emulator", None)
    if emu is not None:
        emu.injector.attach_server(server)  # a kill drops the server's connections
    return server


def start_emulator(
    profile: EngineProfile,
    name: str,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    speedup: float = 1.0,
    sleep_s: float | None = None,
    policy: str = "fcfs",
    stream_interval_s: float = 0.01,
    hold_while_asleep: bool = False,
    faults: Faults | None = None,
    startup_timeout_s: float = 10.0,
) -> EmulatorHandle:
    """Start an emulator on a background thread (its own event loop) and return once it accepts.

    `port=0` picks a free port; the handle's `.port` and `.url` report the real one. A port given
    explicitly may be one a stopped emulator used (restarts of a killed engine on the same address).
    """
    app = create_app(profile, name, speedup=speedup, sleep_s=sleep_s, policy=policy,
                     stream_interval_s=stream_interval_s, hold_while_asleep=hold_while_asleep, faults=faults)
    sock = bind_socket(host, port)
    real_port = sock.getsockname()[1]
    server = uvicorn_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name=f"qlmctl-emulator-{real_port}")
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"emulator did not start on {host}:{real_port}")
        time.sleep(0.002)
    return EmulatorHandle(host=host, port=real_port, model=name, app=app, _server=server, _thread=thread)


async def astart_emulator(profile: EngineProfile, name: str, **kw: Any) -> EmulatorHandle:
    """`start_emulator` without blocking the caller's event loop: `async with await astart_emulator(...)`."""
    return await asyncio.to_thread(start_emulator, profile, name, **kw)
