"""Download the official LaMP files: resumable, atomic, JSON-verified.

A file downloads to ``NAME.part`` beside its destination. An interrupted download
resumes from the bytes already there with an HTTP Range request (a server that ignores
the range is detected by its 200 status and the file restarts). Only a complete file
that parses as JSON is renamed onto ``NAME``; anything else is never visible there.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from mta.errors import MtaError

log = logging.getLogger(__name__)

LAMP_URL = "https://ciir.cs.umass.edu/downloads/LaMP"
LAMP_TASKS = (1, 2, 3, 4, 5, 7)
CHUNK = 1 << 16

Progress = Callable[[str, int, int | None], None]  # (file name, bytes done, total or None)


def lamp_urls(task: int, split: str, split_kind: str = "user", base: str = LAMP_URL) -> list[str]:
    """The question and output URLs of one LaMP task and split."""
    if task not in LAMP_TASKS:
        raise MtaError(f"--task must be one of {LAMP_TASKS}, got {task}")
    if split not in ("train", "dev"):
        raise MtaError(f"--split must be train or dev, got {split!r} (test golds are not public)")
    if split_kind not in ("user", "time"):
        raise MtaError(f"--split-kind must be user or time, got {split_kind!r}")
    root = base.rstrip("/") + ("/time" if split_kind == "time" else "")
    # Movie tagging (the LaMP-2 we support) lives under LaMP_2/new.
    folder = f"LaMP_{task}/new" if task == 2 else f"LaMP_{task}"
    return [f"{root}/{folder}/{split}/{split}_{kind}.json" for kind in ("questions", "outputs")]


def download(url: str, dest: Path, progress: Progress | None = None, timeout: float = 60) -> Path:
    """Fetch ``url`` to ``dest`` (resuming a ``.part``); verify it is JSON; rename atomically."""
    dest = Path(dest)
    if dest.exists():
        log.info("%s exists; skipping", dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the .part already holds the whole file
            resp = None
        else:
            raise MtaError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise MtaError(f"{url}: cannot connect ({reason}); the partial file is kept") from None
    if resp is not None:
        with resp:
            if have and resp.status != 206:
                have = 0  # the server ignored the range: start again
            length = resp.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            done = have
            try:
                with part.open("ab" if have else "wb") as fh:
                    while chunk := resp.read(CHUNK):
                        fh.write(chunk)
                        done += len(chunk)
                        if progress:
                            progress(dest.name, done, total)
            except (OSError, TimeoutError) as e:
                raise MtaError(f"{url}: download interrupted ({e}); rerun to resume") from None
            if total is not None and done < total:
                raise MtaError(f"{url}: got {done} of {total} bytes; rerun to resume")
    try:
        with part.open(encoding="utf-8") as fh:
            json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        part.unlink(missing_ok=True)
        raise MtaError(f"{url}: the download is not valid JSON ({e}); removed, rerun to retry") from None
    os.replace(part, dest)
    return dest


def fetch_lamp(
    task: int, split: str, out: Path, split_kind: str = "user", base: str | None = None,
    progress: Progress | None = None,
) -> list[Path]:
    base = base or os.environ.get("MTA_LAMP_URL") or LAMP_URL
    return [download(u, Path(out) / u.rsplit("/", 1)[1], progress)
            for u in lamp_urls(task, split, split_kind, base)]
