"""The commands' heavy helpers (the backbone, run records): imported by the command
modules, never by `mta --help`'s path (mta.cli.main, mta.cli.common)."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from mta import __version__
from mta.backbone import Backbone
from mta.cli.common import err_console
from mta.paths import write_json_atomic


def load_backbone(cfg, default_model: str | None = None, default_embedder: str | None = None):
    """Load the backbone of ``cfg`` (a BackboneConfig) with a status line."""
    label = cfg.model or default_model or "the default model"
    with err_console.status(f"loading {label} on {cfg.device}"):
        return Backbone.load(cfg, default_model, default_embedder)


def write_config(out: Path, command: str, cfg, backbone=None, **extra) -> dict:
    """OUT/config.json: the command's resolved configuration, versions and the backbone."""
    record = {"command": command, **extra, "configs": cfg.dump(),
              "backbone": backbone.describe() if backbone is not None else None,
              "mta_version": __version__, "torch": torch.__version__, "python": platform.python_version()}
    write_json_atomic(out / "config.json", record)
    return record
