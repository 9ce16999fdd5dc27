"""The one cache root, atomic writes, writer locks and crash recovery: everything that
lands on disk goes through here (docs/reliability.md states the guarantees).

- ``atomic_path(dest)``: write to a temporary beside ``dest``, rename into place on
  success. A directory that already exists is replaced in two renames (dest -> .dest.old,
  tmp -> dest); ``recover`` completes or undoes that after a crash between them.
- ``writer(root)``: one writer per store or bank directory (a file lock); a second one
  fails at once with a one-line error.
- ``fault(point)``: test hook; ``MTA_FAULT=point:N`` kills the process (exit 99, no
  clean-up, like SIGKILL) at the N-th time ``point`` is reached.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from mta.errors import MtaError

log = logging.getLogger(__name__)

ENV_HOME = "MTA_HOME"
LOCK = ".lock"
# an evaluation's result of a method on a fold, kept beside that method's adapters
# (mta.evaluation.runner); one of other settings is run again and replaced, so a directory
# holding only it is written into as an empty one
RESULT = "result.json"
OURS = {LOCK, "run.log", "config.json", RESULT}  # what a command writes into an output directory first
_FAULTS: dict[str, int] = {}


def mta_home() -> Path:
    """Cache root: ``$MTA_HOME``, else ``~/.cache/mta``."""
    return Path(os.environ.get(ENV_HOME) or Path.home() / ".cache" / "mta").expanduser()


def models_dir() -> Path:
    return mta_home() / "models"


def fault(point: str) -> None:
    """Die here, without any clean-up, when ``MTA_FAULT`` names this point (tests only).
    With ``MTA_FAULT_ONCE=FILE`` only one process dies (it creates FILE first): a
    restarted worker then runs through."""
    spec = os.environ.get("MTA_FAULT")
    if not spec:
        return
    name, _, count = spec.rpartition(":")
    if name != point:
        return
    _FAULTS[point] = _FAULTS.get(point, 0) + 1
    if _FAULTS[point] == int(count or 1):
        once = os.environ.get("MTA_FAULT_ONCE")
        if once:
            try:
                Path(once).touch(exist_ok=False)
            except FileExistsError:
                return
        os._exit(99)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


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
        fault("atomic:before-rename")
        if dest.is_dir() and not dest.is_symlink():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            fault("atomic:between-renames")
            target.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, dest)
        fault("atomic:after-rename")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def recover(parent: Path) -> list[str]:
    """After a crash: finish or undo interrupted replacements in ``parent`` and remove
    stale temporaries. Only call it holding the writer lock (no live writer then).
    Returns what was done, for the log."""
    done: list[str] = []
    if not Path(parent).is_dir():
        return done
    for p in sorted(Path(parent).iterdir()):
        name = p.name
        if name.startswith(".") and name.endswith(".old"):
            live = p.with_name(name[1:-len(".old")])
            if live.exists():
                shutil.rmtree(p, ignore_errors=True)
                done.append(f"removed the leftover of a finished replacement of {live.name}")
            else:  # killed between the two renames: the old version is the last complete one
                p.rename(live)
                done.append(f"restored {live.name}, interrupted while being replaced")
        elif name.startswith(".") and name.endswith(".tmp"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            done.append(f"removed the stale temporary {name}")
    return done


@contextlib.contextmanager
def log_to_file(path: Path, alone: bool = False) -> Iterator[None]:
    """Log the ``mta`` logger at INFO into ``path`` while the block runs (``alone``: there
    only, not also to the handlers above it, as in a helper process without a terminal)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger("mta")
    old = root.level, root.propagate
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = not alone and old[1]
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old[0])
        root.propagate = old[1]
        handler.close()


# Whether `writer` waits for another process's writer instead of refusing: set by the
# processes of one `mta tune --jobs N`, whose concurrent trials may need the same shared
# bank (the first builds it, the others wait and then find it finished)
_WAIT = {"on": False}


@contextlib.contextmanager
def wait_for_writers(on: bool = True) -> Iterator[None]:
    """While the block runs, `writer` waits for a lock another process holds (``on``) or
    refuses at once; as it was after."""
    before, _WAIT["on"] = _WAIT["on"], on
    try:
        yield
    finally:
        _WAIT["on"] = before


@contextlib.contextmanager
def writer(root: Path, what: str) -> Iterator[None]:
    """Hold the one writer lock of ``root`` (a store or a bank directory); held by another
    process: an error, or (`wait_for_writers`) a wait until it is released."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root / LOCK), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        if not _WAIT["on"]:
            raise MtaError(f"{what} {root} is being written by another process (lock {root / LOCK}); wait for "
                           "it to finish") from None
        log.info("%s %s is being written by another process: waiting for it", what, root)
        lock.acquire(timeout=-1)
    try:
        yield
    finally:
        lock.release()


def check_file_dest(dest: Path) -> Path:
    """A file about to be written whole: refused when a directory is there (``atomic_path``
    would replace the directory, and everything in it, with the file)."""
    dest = Path(dest)
    if dest.is_dir():
        raise MtaError(f"{dest} is a directory; give the path of a file to write")
    return dest


def _umask() -> int:  # read once, at import: setting it to read it is not safe beside other threads
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _umask()


def shared_modes(path: Path) -> None:
    """Give ``path`` and everything under it the permissions a new file or directory gets
    under the process's umask (some writers, safetensors among them, create files 0600):
    for what is handed to another program, such as an export a vLLM server reads."""
    path = Path(path)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~UMASK)


def write_text_atomic(dest: Path, text: str, mode: int | None = None) -> None:
    """Write a file whole; ``mode``: its permissions, set before it takes the name."""
    with atomic_path(check_file_dest(dest)) as tmp:
        tmp.write_text(text, encoding="utf-8")
        if mode is not None:
            os.chmod(tmp, mode)


def write_json_atomic(dest: Path, obj: Any, mode: int | None = None) -> None:
    write_text_atomic(dest, json.dumps(obj, indent=2, ensure_ascii=False) + "\n", mode)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def foreign_entries(out: Path) -> list[str]:
    """The names in ``out`` that mta's own bookkeeping did not write."""
    if not Path(out).is_dir():
        return []
    return sorted(p.name for p in Path(out).iterdir()
                  if p.name not in OURS and not (p.name.startswith(".") and p.name.endswith((".tmp", ".old"))))


def check_output_dir(out: Path, is_ours, what: str) -> None:
    """An output directory must be new, empty (but for our own bookkeeping), or one of
    ours (``is_ours(out)``); anything else is refused before a byte is written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MtaError(f"{out}: exists and is not a directory")
    have = foreign_entries(out)
    if have and not is_ours(out):
        raise MtaError(f"{out} is not empty and not {what} (it holds {', '.join(have[:5])}); refusing to write "
                       "into it: give a new or empty directory")
