"""The one cache root, and atomic file writes used everywhere something lands on disk."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ENV_HOME = "MTA_HOME"


def mta_home() -> Path:
    """Cache root: ``$MTA_HOME``, else ``~/.cache/mta``."""
    return Path(os.environ.get(ENV_HOME) or Path.home() / ".cache" / "mta").expanduser()


def models_dir() -> Path:
    return mta_home() / "models"


@contextlib.contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` only on success.

    Works for files and directories. A failure leaves ``dest`` untouched and removes
    the temporary, so a reader never sees a half-written result.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    target = tmp / dest.name
    try:
        yield target
        if dest.is_dir() and not dest.is_symlink():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            target.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(dest: Path, text: str) -> None:
    with atomic_path(Path(dest)) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(dest: Path, obj: Any) -> None:
    write_text_atomic(dest, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
