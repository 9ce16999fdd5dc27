"""Adaptation beside decoding: a server's adapt jobs run in a worker process with its own
copy of the backbone and the bank, so the decode loop never waits for training
(docs/serving.md, "Onboarding a user").

The worker is started on the first job (a spawned process: loading the model there takes
seconds, once) and adapts one user at a time into a staging store of its own; the server
then installs the user into its store (one user's record and stack copied, under the
store's writer lock), unless the user was deleted meanwhile. Running requests see the new
stack from their next admission on, as they see a user adapted by another process sharing
the store (the resident stack's checksum changed).

The worker takes a share of the machine (``ServeConfig.adapt_share``): that share of the
CPU cores for its threads (at least one), or of the GPU's memory for its training
micro-batches. A worker that dies (out of memory, killed) fails its job with a message
that says so; the next job starts a new one.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import tempfile
import threading
import uuid
from pathlib import Path

import torch

from mta.backbone import Backbone
from mta.config import AdaptConfig, BackboneConfig
from mta.data.schema import User
from mta.errors import MtaError
from mta.loaded_bank import LoadedBank
from mta.store import UserStore

log = logging.getLogger(__name__)


class WorkerDied(MtaError):
    """The adaptation worker process ended while it held a job."""


def worker_backbone(cfg: BackboneConfig, model: str, embedder: str, share: float) -> BackboneConfig:
    """The worker's backbone: the server's model and embedder on the server's device, its
    training micro-batches planned into ``share`` of the GPU's memory."""
    own = cfg.gpu_memory
    if own != "auto" and float(own) <= 1:  # the server's own share, when smaller
        share = min(share, float(own))
    return cfg.model_copy(update={"model": model, "embedder": embedder, "gpu_memory": repr(float(share))})


class AdaptWorker:
    """A worker process that adapts users for a server (one job at a time, in order)."""

    def __init__(self, backbone: BackboneConfig, bank: Path, share: float):
        self.threads = max(1, int((os.cpu_count() or 1) * share))
        self.spec = (backbone.model_dump(), str(Path(bank).resolve()), self.threads)
        self._lock = threading.Lock()  # one job at a time through the pipe
        self._proc = self._conn = None
        self._staging = Path(tempfile.mkdtemp(prefix="mta-adapt-"))
        self.starts = 0

    def _start(self) -> None:
        ctx = mp.get_context("spawn")  # a fresh interpreter: no torch or thread state inherited
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(target=serve_jobs, args=(child, *self.spec), name="mta-adapt-worker", daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent
        self.starts += 1
        log.info("adaptation worker started (pid %d, %d thread(s))", self._proc.pid, self.threads)

    def adapt(self, user: User, cfg: AdaptConfig) -> tuple[UserStore, dict]:
        """Adapt ``user`` in the worker; blocks the calling thread (never the decode loop).
        Returns the staging store that holds the user, and ``LoadedBank.adapt``'s stats."""
        with self._lock:
            if self._proc is None or not self._proc.is_alive():
                self._start()
            staging = self._staging / uuid.uuid4().hex
            try:
                self._conn.send((user.model_dump(mode="json"), cfg.model_dump(mode="json"), str(staging)))
                ok, payload = self._conn.recv()
            except (EOFError, OSError):
                code = self._proc.exitcode if self._proc is not None else None
                self._proc = None
                raise WorkerDied(f"the adaptation worker stopped (exit code {code}: out of memory or killed); "
                                 "this job failed, the server serves on; adapt the user again") from None
            if not ok:
                shutil.rmtree(staging, ignore_errors=True)
                raise MtaError(payload)
            return UserStore(staging), payload

    def close(self) -> None:
        """Stop the worker (it finishes nothing more) and remove the staging stores."""
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if proc is not None:
            try:
                conn.send(None)
            except OSError:
                pass
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        shutil.rmtree(self._staging, ignore_errors=True)


def install(store: UserStore, staged: UserStore, user_id: str) -> int:
    """Copy one adapted user from ``staged`` into ``store`` (call inside ``store.writing()``);
    their bytes in the store."""
    rec = staged.meta(user_id)
    src = staged.user_dir(user_id) / "stack"
    store.put(rec, (lambda d: shutil.copytree(src, d)) if rec.stack is not None else None)
    return store.bytes_of(user_id)


def serve_jobs(conn, backbone: dict, bank: str, threads: int) -> None:
    """The worker's loop: load the backbone and bank once, then adapt each user sent until
    told to stop (None). Each answer is (True, stats) or (False, a one-line error)."""
    torch.set_num_threads(threads)
    loaded = LoadedBank(Backbone.load(BackboneConfig.model_validate(backbone)), Path(bank))
    while True:
        try:
            msg = conn.recv()
        except EOFError:  # the server went away
            return
        if msg is None:
            return
        user, cfg, staging = msg
        try:
            stats = loaded.adapt([User.model_validate(user)], AdaptConfig.model_validate(cfg),
                                 UserStore(Path(staging), create=True))
            conn.send((True, {"adapted": stats["adapted"], "seconds_per_user": stats["seconds_per_user"]}))
        except Exception as e:  # noqa: BLE001 - the job's error, sent to the server
            conn.send((False, str(e).splitlines()[0] if str(e) else type(e).__name__))
