"""The ``mta`` entry point. User errors print one line and exit 2; bugs show a traceback."""

from __future__ import annotations

import sys

import click
import typer

from mta import __version__
from mta.cli import data, evaluate, models
from mta.cli.common import err_console, setup_logging
from mta.errors import MtaError

app = typer.Typer(
    name="mta", no_args_is_help=True, pretty_exceptions_enable=False,
    help="Merge-then-Adapt: personalise one LLM for many users with little data each.",
)
app.add_typer(data.app, name="data")
app.add_typer(models.app, name="models")
app.command("eval")(evaluate.eval_cmd)


def _version(value: bool) -> None:
    if value:
        print(f"mta {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    setup_logging(verbose)


def main(argv: list[str] | None = None) -> int:
    try:
        app(args=argv, standalone_mode=False)
    except MtaError as e:
        err_console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        return 2
    except click.exceptions.Abort:
        err_console.print("aborted")
        return 130
    except click.exceptions.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    return 0


def entry() -> None:
    sys.exit(main())
