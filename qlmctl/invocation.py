"""How qlmctl was invoked: the arguments as typed, for the `command` key of a run's summary.

The CLI's root group records them (`invoked_with`) for the length of its run, because sys.argv is the
host's, not ours, when the app runs inside another program (a test's CliRunner, a notebook, a sweep
worker). A context variable, not click's context: typer may bundle its own copy of click, whose context
stack an outside `import click` does not see."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

_ARGS: ContextVar[tuple[str, ...] | None] = ContextVar("qlmctl_args", default=None)


@contextmanager
def invoked_with(args: Sequence[str] | None) -> Iterator[None]:
    """Within the block, `command_line()` reports `args` (None: sys.argv's own)."""
    token = _ARGS.set(tuple(sys.argv[1:] if args is None else args))
    try:
        yield
    finally:
        _ARGS.reset(token)


def command_line() -> str:
    """The command as typed (`qlmctl simulate ...`): the CLI's own arguments, else sys.argv."""
    args = _ARGS.get()
    if args is None:
        args = tuple(sys.argv[1:])
    return "qlmctl " + " ".join(shlex.quote(a) for a in args) if args else "qlmctl"
