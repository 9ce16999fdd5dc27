"""``mta serve`` (the OpenAI-compatible server) and ``mta keys`` (its API keys)."""

from __future__ import annotations

from pathlib import Path

import typer
import uvicorn
from rich.markup import escape

from mta.bank import read_index
from mta.cli.common import console, err_console, with_recipes
from mta.cli.loading import load_backbone
from mta.cli.options import BankPath, Configs, configured
from mta.config import AdaptConfig, BackboneConfig, GenerateConfig, ServeConfig
from mta.data.readers import load_dataset
from mta.errors import MtaError
from mta.loaded_bank import LoadedBank
from mta.serving.app import build_app, switch_interval
from mta.serving.ray_serve import serve_on_ray
from mta.serving.security import Keys, add_key
from mta.store import UserStore

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
    key = add_key(keys, role, user, name)
    err_console.print(f"added a {role} key to {escape(str(keys))}; it is shown only now:")
    console.print(key)


@configured(ServeConfig, BackboneConfig, GenerateConfig, AdaptConfig)
def serve_cmd(
    bank: BankPath,
    store: Path | None = typer.Option(None, help="User store (users adapted by `mta adapt` or by this server)."),
    users: Path | None = typer.Option(None, help="Users' data: histories for retrieval and fusion."),
    keys: Path = KeysFile,
    ray: str | None = typer.Option(None, "--ray", help="Serve with replicas on Ray Serve: 'local' (a local "
                                   "instance) or a cluster address; requests are routed by user (docs/scale.md)."),
    replicas: int = typer.Option(2, min=1, help="Ray Serve replicas (with --ray), one GPU each on a GPU cluster."),
    *, cfg: Configs,
) -> None:
    """Serve personalised answers over HTTP, OpenAI-compatible (docs/serving.md)."""
    for flag, rule in (("--rating-answer", cfg.generate.rating_answer), ("--label-answer", cfg.generate.label_answer)):
        if rule != "text":
            raise MtaError(f"{flag} {rule}: the server answers with generated text; the answer rules are for "
                           "mta eval and mta generate")
    key_table = Keys.read(keys)
    if not key_table.entries:
        raise MtaError(f"{keys}: no keys; add one with: mta keys add --keys {keys} --role admin")
    rec = read_index(bank)
    cfg, _ = with_recipes(cfg, None, cfg.backbone.model or rec.model, rec)
    st = UserStore(store, create=True) if store else None
    histories = load_dataset(users, rec.task).users if users else []
    if ray is not None:
        _serve_on_ray(ray, replicas, bank, store, users, keys, cfg, rec)
        return
    backbone = load_backbone(cfg.backbone, rec.model, rec.embedder)
    switch_interval(cfg.serve)
    loaded = LoadedBank(backbone, bank, resident=cfg.serve.resident)
    app = build_app(loaded, st, key_table, cfg.serve, cfg.generate, histories, cfg.adapt, backbone=cfg.backbone)
    s = cfg.serve
    scheduler = app.state.scheduler
    loop = scheduler.decoder_kind + (", async steps" if getattr(scheduler.decoder, "async_steps", False) else "")
    if s.switch_interval_ms is not None:
        loop += f"; thread switch interval {s.switch_interval_ms:g} ms"
    err_console.print(f"serving {escape(str(bank))} ({rec.task}, {backbone.model_id} on {backbone.device}; decode "
                      f"loop {loop}) at http://{s.host}:{s.port}")

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # told to stop: requests still running a second before
            scheduler.drain(max(0.5, s.shutdown_timeout - 1))  # the limit are answered "shutting down"
            super().handle_exit(sig, frame)

    Server(uvicorn.Config(app, host=s.host, port=s.port, log_level="warning",
                          timeout_graceful_shutdown=int(s.shutdown_timeout))).run()


def _serve_on_ray(address, replicas, bank, store, users, keys, cfg, rec) -> None:
    s = cfg.serve
    spec = {"configs": cfg.dump(), "bank": str(Path(bank).resolve()), "keys": str(Path(keys).resolve()),
            "store": str(Path(store).resolve()) if store else None,
            "users": str(Path(users).resolve()) if users else None}

    def ready() -> None:
        err_console.print(f"serving {escape(str(bank))} ({rec.task}) with {replicas} replica(s) on Ray Serve at "
                          f"http://{s.host}:{s.port}")

    serve_on_ray(address, spec, s.host, s.port, replicas, s.resident, cfg.backbone.device, ready=ready)
