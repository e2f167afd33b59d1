"""The parent of one engine launched by `qlmctl serve --launch`: the engine dies with the gateway.

    python reaper.py LIFELINE_FD GRACE_S -- ENGINE_ARGV...

Run by path, with the standard library only (it starts in a few tens of milliseconds and imports nothing
of qlmctl). The launcher starts it in a session (and process group) of its own and hands it the read end
of a pipe whose write end only the gateway holds: when the gateway dies, however (SIGKILL, a crash, the
OOM killer), the kernel closes the write end and this process reads end-of-file. It then sends SIGTERM
to the engine's process group (vLLM's workers are in it), and SIGKILL after GRACE_S seconds.

Otherwise it waits for the engine and exits with its status, so that the launcher sees the engine's exit.
A SIGTERM or SIGINT to the group (the launcher stopping the engine) reaches the engine directly; this
process ignores them and stays until the engine has gone. The engine itself gets PR_SET_PDEATHSIG
(SIGKILL): should this process be killed outright, the engine does not outlive it either.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the engine's child, before exec: SIGKILL when this reaper dies (Linux; elsewhere nothing)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def main(argv: list[str]) -> int:
    if len(argv) < 5 or argv[3] != "--":
        print("usage: reaper.py LIFELINE_FD GRACE_S -- ENGINE_ARGV...", file=sys.stderr)
        return 2
    lifeline, grace = int(argv[1]), float(argv[2])
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: None)  # the engine gets the same signal; wait for it to exit
    try:
        child = subprocess.Popen(argv[4:], preexec_fn=_die_with_parent)  # single-threaded here: safe
    except OSError as e:
        print(f"cannot start {argv[4]!r}: {e.strerror}", file=sys.stderr)
        return 127
    group = os.getpgid(0)
    waiters = [lifeline]
    pidfd = None
    if hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(child.pid)
            waiters.append(pidfd)
        except OSError:
            pidfd = None
    while True:
        try:
            ready, _, _ = select.select(waiters, [], [], None if pidfd is not None else 0.2)
        except InterruptedError:
            ready = []
        code = child.poll()
        if code is not None:
            return code if code >= 0 else 128 - code
        if lifeline in ready:
            try:
                gone = os.read(lifeline, 1) == b""
            except OSError:
                gone = True
            if gone:
                break
    # The gateway is gone: stop the engine's group, then make sure.
    _signal_group(group, signal.SIGTERM)
    try:
        child_group = os.getpgid(child.pid)
    except ProcessLookupError:
        child_group = group
    if child_group != group:
        _signal_group(child_group, signal.SIGTERM)
    end = time.monotonic() + grace
    while child.poll() is None and time.monotonic() < end:
        time.sleep(0.05)
    if child_group != group:
        _signal_group(child_group, signal.SIGKILL)
    _signal_group(group, signal.SIGKILL)  # the engine's leftovers, and this process
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
