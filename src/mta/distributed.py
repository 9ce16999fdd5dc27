"""Adaptation sharded over Ray: each actor holds one backbone and one loaded bank (on its
GPU, or CPU) and adapts whole passes of users; results land in the one store (a shared
filesystem path), atomically per user (docs/scale.md).

The driver is the store's one writer (it holds the lock and repairs a crashed run first);
its workers write users without taking the lock. Shards are exactly the passes of an
unsharded run (``AdaptConfig.users_per_pass`` users, in order, each with its pass's index),
so with the same seeds the sharded result equals the single-process one. A shard is
retrained whole when its worker dies (Ray restarts the actor and retries the call), which
reproduces the same tensors; users already written are simply written again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from mta.config import AdaptConfig, BackboneConfig
from mta.data.schema import User
from mta.errors import MtaError
from mta.store import UserStore, history_hash

log = logging.getLogger(__name__)


class AdaptWorker:
    """A Ray actor: one backbone and one loaded bank, kept for every shard it is given."""

    def __init__(self, backbone: dict, bank: str, threads: int | None = None):
        import torch

        from mta.backbone import Backbone
        from mta.bank import read_index
        from mta.loaded_bank import LoadedBank

        if threads:
            torch.set_num_threads(threads)
        rec = read_index(Path(bank))
        self.backbone = Backbone.load(BackboneConfig.build(backbone), rec.model, rec.embedder)
        self.bank = LoadedBank(self.backbone, Path(bank))

    def adapt(self, users: list[dict], cfg: dict, store: str, first_pass: int) -> dict:
        shard = [User.model_validate(u) for u in users]
        stats = self.bank.adapt(shard, AdaptConfig.build(cfg), UserStore(store), locked=False, first_pass=first_pass,
                                force=True)
        return {"adapted": stats["adapted"], "train_seconds": stats["train_seconds"],
                "trainable_params_per_user": stats["trainable_params_per_user"], "pid": os.getpid()}


def ray_adapt(address: str, backbone: BackboneConfig, bank: Path, users: Sequence[User], cfg: AdaptConfig,
              store: UserStore, workers: int | None = None,
              progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Adapt ``users`` into ``store`` on Ray (``address`` "local": a local instance)."""
    import ray

    from mta.bank import read_index

    rec = read_index(bank)
    settings = {"bank": rec.bank_id, "adapt": cfg.dump()}
    started = not ray.is_initialized()
    if started:
        ray.init(address=None if address == "local" else address, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
    try:
        with store.writing():
            todo = [u for u in users if not (store.has(u.user_id) and store.meta(u.user_id).history_hash
                                            == history_hash(u, rec.task, settings))]
            shards = [(i, todo[i:i + cfg.users_per_pass]) for i in range(0, len(todo), cfg.users_per_pass)]
            if progress:
                progress("users", 0, len(todo))
            if not shards:
                return {"adapted": 0, "skipped": len(users), "shards": 0, "workers": 0}
            gpus = ray.cluster_resources().get("GPU", 0)
            gpu = backbone.device.startswith("cuda") or (backbone.device == "auto" and gpus > 0)
            cpus = int(ray.cluster_resources().get("CPU", 1))
            n = min(len(shards), workers or (int(gpus) if gpu else cpus) or 1)
            opts = {"num_gpus": 1} if gpu else {"num_cpus": 1}
            actor = ray.remote(max_restarts=3, max_task_retries=3, **opts)(AdaptWorker)
            threads = None if gpu else max(1, cpus // n)
            pool = [actor.remote(backbone.dump(), str(bank), threads) for _ in range(n)]
            done, stats, pending = 0, [], {}
            queue = list(shards)
            for a in pool:  # one shard per worker at a time; the next goes to whoever finishes first
                if queue:
                    first, shard = queue.pop(0)
                    pending[a.adapt.remote([u.model_dump() for u in shard], cfg.dump(), str(store.root), first)] = a
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                a = pending.pop(ready[0])
                try:
                    stats.append(ray.get(ready[0]))
                except ray.exceptions.RayError as e:
                    raise MtaError(f"a worker failed its shard after retries: {str(e).splitlines()[0]}") from None
                done += stats[-1]["adapted"]
                if progress:
                    progress("users", done, len(todo))
                if queue:
                    first, shard = queue.pop(0)
                    pending[a.adapt.remote([u.model_dump() for u in shard], cfg.dump(), str(store.root), first)] = a
        return {"adapted": done, "skipped": len(users) - len(todo), "shards": len(shards), "workers": n,
                "worker_pids": sorted({s["pid"] for s in stats}),
                "trainable_params_per_user": stats[0]["trainable_params_per_user"] if stats else 0}
    finally:
        if started:
            ray.shutdown()
