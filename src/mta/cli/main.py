"""The ``mta`` entry point. Exit codes (docs/reliability.md): 0 done; 2 a user error
(input, configuration, a busy store or bank), one line; 3 the environment (out of
memory, a full disk, permissions), one line; 130 interrupted; 1 a bug, with its traceback."""

from __future__ import annotations

import importlib
import sys

import typer
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from mta import __version__
from mta.cli.common import QUIET, err_console, setup_logging
from mta.cli.options import cli_message
from mta.errors import MtaError

# Each command's module is imported only when that command runs or shows its own help, so
# `mta --help` starts without torch: name -> (module, attribute: a command function or a
# Typer group, the summary `mta --help` shows: the first paragraph of its own help, a test checks).
COMMANDS: dict[str, tuple[str, str, str]] = {
    "eval": ("mta.cli.evaluate", "eval_cmd",
             "Compare methods under one protocol; write metrics.json, results.md and PNG plots."),
    "adapt": ("mta.cli.pipeline", "adapt_cmd",
              "Stages 2+3: fuse each user's nearest anchors and train their stacked adapter."),
    "generate": ("mta.cli.pipeline", "generate_cmd",
                 "Personalised answers; one --user/--input, or many users batched from --input-file. Prints "
                 "one JSON object per answer and line: user_id, route, output, parsed."),
    "export": ("mta.cli.pipeline", "export_cmd",
               "Write a user's fused + stacked adapter as ONE ordinary PEFT LoRA (fp32 factors), or every "
               "user's, for vLLM."),
    "run": ("mta.cli.evaluate", "run_cmd",
            "The whole method on one split: build the bank on the anchor candidates, adapt the held-out "
            "targets, score base vs RAG vs MTA on their queries."),
    "tune": ("mta.cli.evaluate", "tune_cmd",
             "Choose a recipe for this model and task on dev users; write OUT/recipe.json."),
    "demo": ("mta.cli.evaluate", "demo_cmd",
             "`mta run` on built-in SYNTHETIC data (4 taste groups) with the default models."),
    "serve": ("mta.cli.serve", "serve_cmd",
              "Serve personalised answers over HTTP, OpenAI-compatible (docs/serving.md)."),
    "data": ("mta.cli.data", "app", "Per-user data: inspect, convert, synthesise, download."),
    "models": ("mta.cli.models", "app", "The offline model registry: list and fetch models."),
    "bank": ("mta.cli.pipeline", "bank_app", "Stage 1: the meta-LoRA bank."),
    "store": ("mta.cli.pipeline", "store_app", "The per-user store: list and delete users."),
    "keys": ("mta.cli.serve", "keys_app", "API keys of `mta serve` (stored hashed)."),
}


def load_command(name: str):
    """The click command of ``name``, its module imported now."""
    module, attr, _ = COMMANDS[name]
    obj = getattr(importlib.import_module(module), attr)
    one = typer.Typer()
    one.callback()(lambda: None)  # a group of one, so that Typer builds ``name`` as a subcommand
    if isinstance(obj, typer.Typer):
        one.add_typer(obj, name=name)
    else:
        one.command(name)(obj)
    return typer.main.get_command(one).commands[name]


class LazyGroup(TyperGroup):
    """The root group: commands listed from ``COMMANDS``' summaries, loaded when used."""

    listing = False

    def list_commands(self, ctx) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx, name: str):
        if name not in COMMANDS:
            return None
        if self.listing:
            return TyperCommand(name, help=COMMANDS[name][2])
        return load_command(name)

    def format_help(self, ctx, formatter) -> None:
        self.listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self.listing = False


app = typer.Typer(
    name="mta", no_args_is_help=True, pretty_exceptions_enable=False, cls=LazyGroup,
    help="Merge-then-Adapt: personalise one LLM for many users with little data each.",
)


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
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if code == 130:  # Typer turns Ctrl-C inside a command into a silent exit 130
            err_console.print("interrupted")
        return code
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
