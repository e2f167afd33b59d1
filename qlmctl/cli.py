"""The `qlmctl` command line: the Typer app, with every command of `qlmctl.commands` registered on it."""

from __future__ import annotations

import importlib
import sys

import typer
import typer.core

from qlmctl.commands import COMMAND_MODULES
from qlmctl.commands.common import print_error
from qlmctl.errors import UserError
from qlmctl.invocation import invoked_with


class _Root(typer.core.TyperGroup):
    """The root group keeps the arguments as typed (see `qlmctl.invocation`)."""

    def main(self, args=None, *rest, **kwargs):  # type: ignore[no-untyped-def]
        with invoked_with(args):
            return super().main(args, *rest, **kwargs)


app = typer.Typer(
    cls=_Root,
    add_completion=True,
    no_args_is_help=True,
    help="SLO-oriented queue management (QLM) for LLM serving: simulate, serve, profile, plot. "
    "Shell completion: qlmctl --install-completion.",
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def _version(value: bool) -> None:
    if value:
        import simulator
        from qlmctl.vllm_bench import version

        typer.echo(f"qlmctl {version()} ({simulator.build()} build)")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """SLO-oriented queue management (QLM) for LLM serving: simulate, serve, profile, plot."""



def _register_commands() -> None:
    # A module that fails to import stops the CLI: a command must not vanish from --help silently.
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app)


_register_commands()


def main() -> None:
    try:
        app()
    except UserError as e:
        print_error(e)
        sys.exit(2)


if __name__ == "__main__":
    main()
