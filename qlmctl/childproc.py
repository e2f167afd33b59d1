"""A helper process that lives until its parent says stop or dies: the two ends of that one pipe.

The child blocks in `wait_told`; the parent calls `stop_child`. A parent killed outright never calls it, but its
end of the pipe closes with it, which ends `wait_told` just the same: nothing is left running."""

from __future__ import annotations

from multiprocessing.connection import Connection
from typing import Any


def wait_told(conn: Connection) -> None:
    """Block (in the child) until the parent sends anything or its end of `conn` closes."""
    try:
        conn.recv()
    except (EOFError, OSError):
        pass


def stop_child(proc: Any, conn: Connection, timeout_s: float = 10.0) -> None:
    """Tell the child to stop (and close this end), wait up to `timeout_s` for it, then kill it."""
    try:
        conn.send("stop")
    except OSError:  # it has gone already
        pass
    conn.close()
    proc.join(timeout_s)
    if proc.is_alive():
        proc.kill()
        proc.join()
