"""``mta serve`` (the OpenAI-compatible server) and ``mta keys`` (its API keys)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from mta.cli.common import console, err_console, load_backbone, with_recipes
from mta.cli.options import BankPath, Configs, configured
from mta.config import AdaptConfig, BackboneConfig, GenerateConfig, ServeConfig
from mta.errors import MtaError

keys_app = typer.Typer(help="API keys of `mta serve` (stored hashed).", no_args_is_help=True)
KeysFile = typer.Option(..., "--keys", help="The keys file (JSON; only hashes are stored).")


@keys_app.command("add")
def keys_add(
    keys: Path = KeysFile,
    role: str = typer.Option(..., help="admin (everything), or user (one user's requests only)."),
    user: str | None = typer.Option(None, help="The user a user key is bound to."),
    name: str = typer.Option("key", help="A label for the key, shown nowhere else."),
) -> None:
    """Create an API key; it is printed once, and only its hash is kept."""
    from mta.serving.security import add_key

    key = add_key(keys, role, user, name)
    err_console.print(f"added a {role} key to {escape(str(keys))}; it is shown only now:")
    console.print(key)


@configured(ServeConfig, BackboneConfig, GenerateConfig, AdaptConfig)
def serve_cmd(
    bank: BankPath,
    store: Path | None = typer.Option(None, help="User store (users adapted by `mta adapt` or by this server)."),
    users: Path | None = typer.Option(None, help="Users' data: histories for retrieval and fusion."),
    keys: Path = KeysFile,
    *, cfg: Configs,
) -> None:
    """Serve personalised answers over HTTP, OpenAI-compatible (docs/serving.md)."""
    import uvicorn

    from mta.bank import read_index
    from mta.data.readers import load_dataset
    from mta.loaded_bank import LoadedBank
    from mta.serving.app import build_app
    from mta.serving.security import Keys
    from mta.store import UserStore

    key_table = Keys.read(keys)
    if not key_table.entries:
        raise MtaError(f"{keys}: no keys; add one with: mta keys add --keys {keys} --role admin")
    rec = read_index(bank)
    cfg, _ = with_recipes(cfg, None, cfg.backbone.model or rec.model, rec)
    st = UserStore(store, create=True) if store else None
    histories = load_dataset(users, rec.task).users if users else []
    backbone = load_backbone(cfg.backbone, rec.model, rec.embedder)
    loaded = LoadedBank(backbone, bank, resident=cfg.serve.resident)
    app = build_app(loaded, st, key_table, cfg.serve, cfg.generate, histories, cfg.adapt)
    s = cfg.serve
    err_console.print(f"serving {escape(str(bank))} ({rec.task}, {backbone.model_id} on {backbone.device}) at "
                      f"http://{s.host}:{s.port}")
    uvicorn.run(app, host=s.host, port=s.port, log_level="warning", timeout_graceful_shutdown=int(s.shutdown_timeout))
