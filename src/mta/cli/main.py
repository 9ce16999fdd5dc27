"""The ``mta`` entry point. Exit codes (docs/reliability.md): 0 done; 2 a user error
(input, configuration, a busy store or bank), one line; 3 the environment (out of
memory, a full disk, permissions), one line; 130 interrupted; 1 a bug, with its traceback."""

from __future__ import annotations

import sys

import typer
from rich.markup import escape

from mta import __version__
from mta.cli import data, evaluate, models, pipeline, serve
from mta.cli.common import QUIET, err_console, setup_logging
from mta.cli.options import cli_message
from mta.errors import MtaError

app = typer.Typer(
    name="mta", no_args_is_help=True, pretty_exceptions_enable=False,
    help="Merge-then-Adapt: personalise one LLM for many users with little data each.",
)
app.add_typer(data.app, name="data")
app.add_typer(models.app, name="models")
app.command("eval")(evaluate.eval_cmd)
app.add_typer(pipeline.bank_app, name="bank")
app.add_typer(pipeline.store_app, name="store")
app.command("adapt")(pipeline.adapt_cmd)
app.command("generate")(pipeline.generate_cmd)
app.command("export")(pipeline.export_cmd)
app.command("run")(evaluate.run_cmd)
app.command("tune")(evaluate.tune_cmd)
app.command("demo")(evaluate.demo_cmd)
app.command("serve")(serve.serve_cmd)
app.add_typer(serve.keys_app, name="keys")


def _version(value: bool) -> None:
    if value:
        print(f"mta {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or progress lines."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    setup_logging(verbose)
    QUIET["on"] = quiet


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code. Typer handles usage errors (exit 2) itself."""
    try:
        app(args=argv, prog_name="mta")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except MtaError as e:
        err_console.print(f"[red]error:[/red] {escape(cli_message(e))}", highlight=False, soft_wrap=True)
        return e.exit_code
    except OSError as e:  # the environment: permissions, a full disk, not a directory...
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        err_console.print(f"[red]error:[/red] {escape((e.strerror or str(e)) + where)}", highlight=False,
                          soft_wrap=True)
        return 3
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    return 0


def entry() -> None:
    sys.exit(main())
