"""How qlmctl was invoked: the arguments as typed, for the `command` key of a run's summary.

The CLI's root group stores them in click's context (`remember`), because sys.argv is the host's, not
ours, when the app runs inside another program (a test's CliRunner, a notebook, a sweep worker)."""

from __future__ import annotations

import shlex
import sys

import click

_KEY = "qlmctl.argv"


def remember(ctx: click.Context, args: list[str]) -> None:
    """Keep the arguments the root group is about to parse."""
    ctx.meta[_KEY] = list(args)


def command_line() -> str:
    """The command as typed (`qlmctl simulate ...`): the CLI's own arguments, else sys.argv."""
    ctx = click.get_current_context(silent=True)
    args = ctx.meta.get(_KEY) if ctx is not None else None
    if args is None:
        args = sys.argv[1:]
    return "qlmctl " + " ".join(shlex.quote(a) for a in args) if args else "qlmctl"
