"""`qlmctl serve --launch`: start the scenario's engines as processes, wait for them, stop them on exit.

One process per `live.engines` entry, from the `live.launch.command` template:

    {model}    the engine's model (the scenario's name, also the served model name)
    {port}     the port of the engine's url
    {gpu}      its CUDA device index (`device`, else the instance's position among the instances)
    {name}     its instance name
    {speedup}  `live.speedup` (for emulated engines)
    {python}   this Python interpreter
    {scenario} the scenario file's absolute path (e.g. for `qlmctl emulate --scenario`)

The environment adds the engine kind's (`EngineKind.launch_env`; vLLM's: VLLM_SERVER_DEV_MODE=1, for its
sleep and wake-up endpoints), CUDA_VISIBLE_DEVICES={gpu}, and `live.launch.env`. Each process runs in its
own process group (so that vLLM's workers stop with it) and writes its output to
`<log_dir>/<instance>-<model>.log`.

Engines die with the gateway, whatever kills it: each engine runs under a small reaper process
(`qlmctl.gateway.reaper`, its own session and process group) that holds the read end of a pipe only the
gateway writes to; when the gateway dies, even by SIGKILL, the reaper sees the pipe close and stops the
engine's group (SIGTERM, SIGKILL after `ORPHAN_GRACE_S`). At start, ports are claimed
(`qlmctl.gateway.launchstate`): an engine orphaned by an earlier launch is stopped, and a port held by a
process this launch did not start stops the launch with a message naming it (rather than letting the new
engine fail with "address already in use" while the gateway talks to the old process).

Swaps between the engines of one GPU use sleep mode when `launch.sleep_mode` is true (all engines start;
all but one are put to sleep). Otherwise only one engine per GPU runs at a time, and a
swap stops its process and starts the other model's (a cold load: the profile's `load_cold_s`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from qlmctl.engines import engine_kind
from qlmctl.errors import UserError
from qlmctl.gateway import reaper
from qlmctl.gateway.instance import SwapControl
from qlmctl.gateway.launchstate import EngineRecord, alive, port_holder, port_in_use, start_time
from qlmctl.gateway.swap import SleepModeControl
from qlmctl.scenario import LaunchSpec, LiveEngineSpec, Scenario

if TYPE_CHECKING:
    from qlmctl.gateway.instance import LiveEngine

STOP_GRACE_S = 15.0
"""Seconds between SIGTERM and SIGKILL when stopping an engine."""
ORPHAN_GRACE_S = 3.0
"""Seconds between SIGTERM and SIGKILL when an engine's gateway has died (its reaper stops it)."""

log = logging.getLogger("qlmctl.gateway")


@dataclass
class EngineProcess:
    """One engine's process (None while not running)."""

    spec: LiveEngineSpec
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Launcher:
    """Starts and stops the engine processes of a live scenario."""

    def __init__(self, scenario: Scenario, log_dir: Path | None = None) -> None:
        live = scenario.spec.live
        if live is None or live.launch is None:
            raise UserError("--launch needs live.launch.command in the scenario", scenario.path, field="live.launch")
        self.scenario = scenario
        self.launch: LaunchSpec = live.launch
        self.log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="qlmctl-engines-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        order: list[str] = []
        for e in live.engines:
            if e.instance not in order:
                order.append(e.instance)
        self._initial = {name: spec.model for name, spec in scenario.instance_specs()}
        self.procs: dict[tuple[str, str], EngineProcess] = {}
        self._lifeline: tuple[int, int] | None = None
        """A pipe whose write end only this process holds: the engines' reapers watch the read end."""
        for e in live.engines:
            url = urlparse(e.url)
            if url.hostname not in ("127.0.0.1", "localhost", "::1", "0.0.0.0") or url.port is None:
                raise UserError(f"--launch starts engines on this machine: url {e.url} must be a local "
                                "address with a port", scenario.path, field="live.engines")
            device = e.device if e.device is not None else order.index(e.instance)
            fields = {"model": e.model, "port": url.port, "gpu": device, "name": e.instance,
                      "speedup": live.speedup, "python": sys.executable,
                      "scenario": str(scenario.path.resolve()) if scenario.path is not None else ""}
            try:
                argv = shlex.split(self.launch.command.format(**fields))
            except (KeyError, IndexError, ValueError) as err:
                raise UserError(f"bad launch command template: {err!r}; placeholders are "
                                f"{', '.join('{' + k + '}' for k in fields)}", scenario.path,
                                field="live.launch.command") from None
            env = {**os.environ, **engine_kind(e.kind).launch_env, "CUDA_VISIBLE_DEVICES": str(device),
                   **self.launch.env}
            log_path = self.log_dir / f"{e.instance}-{e.model}.log".replace("/", "_")
            self.procs[(e.instance, e.model)] = EngineProcess(e, argv, env, log_path)

    def _first_wave(self) -> list[EngineProcess]:
        """Every engine in sleep mode; else one per instance (its initial model, else its first engine)."""
        if self.launch.sleep_mode:
            return list(self.procs.values())
        chosen: dict[str, EngineProcess] = {}
        for (inst, model), p in self.procs.items():
            if inst not in chosen or self._initial.get(inst) == model:
                chosen[inst] = p
        return list(chosen.values())

    async def start(self) -> None:
        """Start the engines and wait until all answer /health; on failure stop them and raise UserError."""
        await self.claim_ports()
        wave = self._first_wave()
        for p in wave:
            self._spawn(p)
        try:
            await asyncio.gather(*(self.wait_healthy(p) for p in wave))
        except BaseException:
            await self.stop()
            raise

    async def claim_ports(self) -> None:
        """Make sure every engine's port is this launch's to use (see `qlmctl.gateway.launchstate`)."""
        me = os.getpid()
        for p in self.procs.values():
            url = urlparse(p.spec.url)
            port = url.port
            assert port is not None
            rec = EngineRecord.read(port)
            if rec is not None and rec.gateway_pid != me:
                if alive(rec.gateway_pid, rec.gateway_start):
                    raise UserError(f"port {port} (engine {p.spec.model} on {p.spec.instance}) belongs to an engine "
                                    f"launched by a running gateway (pid {rec.gateway_pid}); stop that gateway first")
                if alive(rec.pgid, rec.pgid_start):
                    log.warning("stopping engine group %d on port %d, left running by an earlier launch whose "
                                "gateway (pid %d) is gone", rec.pgid, port, rec.gateway_pid)
                    await asyncio.to_thread(_stop_group, rec.pgid, ORPHAN_GRACE_S)
                EngineRecord.remove(port)
            host = url.hostname or "127.0.0.1"
            if port_in_use("127.0.0.1" if host in ("localhost", "0.0.0.0") else host, port):
                holder = port_holder(port)
                raise UserError(f"port {port} (engine {p.spec.model} on {p.spec.instance}) is in use by a process "
                                f"this launch did not start{f': {holder}' if holder else ''}; stop it or change "
                                "live.engines[].url", field="live.engines")

    def _spawn(self, p: EngineProcess) -> None:
        if self._lifeline is None:
            self._lifeline = os.pipe()  # both ends close-on-exec: no engine inherits the write end
        r, _ = self._lifeline
        argv = [sys.executable, "-I", reaper.__file__, str(r), str(ORPHAN_GRACE_S), "--", *p.argv]
        out = open(p.log_path, "ab")
        try:
            p.proc = subprocess.Popen(argv, env=p.env, stdout=out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True, pass_fds=(r,))
        except OSError as e:
            raise UserError(f"cannot start engine '{p.argv[0]}': {e.strerror}", field="live.launch.command") from None
        finally:
            out.close()
        port = urlparse(p.spec.url).port
        assert port is not None
        EngineRecord(port, p.proc.pid, start_time(p.proc.pid), os.getpid(), start_time(os.getpid()),
                     p.argv).write()

    async def wait_healthy(self, p: EngineProcess) -> None:
        client = engine_kind(p.spec.kind).connect(p.spec.url, max_connections=4)
        deadline = time.monotonic() + self.launch.health_timeout_s
        try:
            while True:
                if not p.running:
                    code = p.proc.returncode if p.proc is not None else None
                    raise UserError(f"engine {p.spec.model} on {p.spec.instance} exited with status {code} before it "
                                    f"was healthy; its log ({p.log_path}) ends with:\n{self.log_tail(p)}")
                if await client.health(timeout_s=2.0):
                    if not p.running:  # another process answered on its port, and this one has failed
                        continue
                    return
                if time.monotonic() > deadline:
                    raise UserError(f"engine {p.spec.model} on {p.spec.instance} ({p.spec.url}) not healthy after "
                                    f"{self.launch.health_timeout_s:g} s; log: {p.log_path}")
                await asyncio.sleep(0.25)
        finally:
            await client.aclose()

    def log_tail(self, p: EngineProcess, lines: int = 15) -> str:
        try:
            text = p.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def stop_one(self, p: EngineProcess) -> None:
        proc = p.proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                await asyncio.to_thread(proc.wait, STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                await asyncio.to_thread(proc.wait)
        p.proc = None
        port = urlparse(p.spec.url).port
        rec = EngineRecord.read(port) if port is not None else None
        if rec is not None and rec.pgid == proc.pid:
            EngineRecord.remove(rec.port)

    async def stop(self) -> None:
        """Stop every engine this launcher started (its whole process group)."""
        await asyncio.gather(*(self.stop_one(p) for p in self.procs.values()))
        if self._lifeline is not None:
            for fd in self._lifeline:
                os.close(fd)
            self._lifeline = None

    def swap_control(self) -> SwapControl:
        return SleepModeControl() if self.launch.sleep_mode else RestartControl(self)

    async def __aenter__(self) -> "Launcher":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class RestartControl:
    """Swap by process restart: stop the awake model's server, start the target's, wait for its health."""

    warm = False

    def __init__(self, launcher: Launcher) -> None:
        self.launcher = launcher

    async def release(self, engine: LiveEngine) -> None:
        await self.launcher.stop_one(self.launcher.procs[(engine.instance.name, engine.model)])
        engine.sleeping = True

    async def acquire(self, engine: LiveEngine) -> None:
        p = self.launcher.procs[(engine.instance.name, engine.model)]
        if not p.running:
            self.launcher._spawn(p)
        await self.launcher.wait_healthy(p)
        engine.sleeping = False

    def available(self, engine: LiveEngine) -> bool:
        return self.launcher.procs[(engine.instance.name, engine.model)].running


def _stop_group(pgid: int, grace_s: float) -> None:
    """SIGTERM a process group, SIGKILL it after `grace_s` if it still runs (blocking)."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    end = time.monotonic() + grace_s
    while time.monotonic() < end:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
