"""What `qlmctl serve --launch` leaves on disk so that a later launch can tell its engines from others.

One record per engine port, `<state dir>/engine-<port>.json` (state dir: `$XDG_RUNTIME_DIR/qlmctl`, else
`<tmp>/qlmctl-<uid>`), written when the engine starts and removed when the launcher stops it: the engine's
process group (its reaper's pid, `qlmctl.gateway.reaper`), the gateway's pid, both processes' start
times (so that a reused pid is not mistaken for them) and the command.

At the next start, for each engine port (`Launcher.claim_ports`):

- a record whose gateway still runs: another gateway owns that engine; the launch stops and says so;
- a record whose gateway is gone but whose engine group still runs (its reaper was killed too): an
  engine orphaned by an earlier launch; it is stopped (SIGTERM, then SIGKILL) and the launch goes on;
- then the port must be free: a port held by a process this launch did not start stops the launch, with
  the holder's pid and command when they can be found (`port_holder`, from /proc on Linux).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path


def state_dir() -> Path:
    run = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(run) / "qlmctl" if run else Path(tempfile.gettempdir()) / f"qlmctl-{os.getuid()}"
    return base / "engines"


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, Linux), None if it is gone or unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def alive(pid: int, started: int | None) -> bool:
    """Whether `pid` runs and is the process that started at `started` (when known)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = start_time(pid)
    return started is None or now is None or now == started


@dataclass
class EngineRecord:
    port: int
    pgid: int
    pgid_start: int | None
    gateway_pid: int
    gateway_start: int | None
    argv: list[str]

    @staticmethod
    def path(port: int) -> Path:
        return state_dir() / f"engine-{port}.json"

    @classmethod
    def read(cls, port: int) -> EngineRecord | None:
        try:
            return cls(**json.loads(cls.path(port).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def write(self) -> None:
        p = self.path(self.port)
        try:
            p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = p.with_suffix(".tmp")
            tmp.write_text(json.dumps(asdict(self)))
            tmp.replace(p)
        except OSError:
            pass  # a record is a help for the next launch, not a condition of this one

    @classmethod
    def remove(cls, port: int) -> None:
        try:
            cls.path(port).unlink()
        except OSError:
            pass


def port_in_use(host: str, port: int) -> bool:
    """Whether something listens on (host, port): a bind there fails (TIME_WAIT leftovers do not count)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def port_holder(port: int) -> str | None:
    """'pid N (command)' of the process listening on `port`, from /proc (Linux; None if not found)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                        inodes.add(parts[9])
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    if not inodes:
        return None
    targets = {f"socket:[{i}]" for i in inodes}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in targets:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                    return f"pid {pid} ({cmd[:120]})"
        except OSError:
            continue
    return None
