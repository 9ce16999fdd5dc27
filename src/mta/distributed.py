"""Bank building and adaptation sharded over Ray: each actor holds one backbone (and, to
adapt, one loaded bank) on its GPU, or CPU, and trains whole groups of anchors or passes
of users; results land in one bank or store on a shared filesystem path, atomically per
anchor or user (docs/scale.md).

Bank: one worker chooses the anchors and writes the index; the groups an unsharded build
would train (``BankConfig.group_size``) go to the workers; the driver marks each group
done in the index as it comes back. Adaptation: see ``ray_adapt``.

The driver is the store's one writer (it holds the lock and repairs a crashed run first);
its workers write users without taking the lock. Shards are exactly the passes of an
unsharded run (``AdaptConfig.users_per_pass`` users, in order, each with its pass's index),
so with the same seeds the sharded result equals the single-process one. A shard is
retrained whole when its worker dies (Ray restarts the actor and retries the call), which
reproduces the same tensors; users already written are simply written again.
"""

from __future__ import annotations

import json
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
                "fusion_seconds": stats["fusion_seconds"],
                "trainable_params_per_user": stats["trainable_params_per_user"], "pid": os.getpid()}


def ray_adapt(address: str, backbone: BackboneConfig, bank: Path, users: Sequence[User], cfg: AdaptConfig,
              store: UserStore, workers: int | None = None,
              progress: Callable[[str, int, int], None] | None = None, force: bool = False) -> dict:
    """Adapt ``users`` into ``store`` on Ray (``address`` "local": a local instance);
    users stored unchanged and intact are skipped unless ``force``."""
    import ray

    from mta.bank import read_index

    rec = read_index(bank)
    settings = {"bank": rec.bank_id, "adapt": cfg.identity()}
    started = not ray.is_initialized()
    if started:
        ray.init(address=None if address == "local" else address, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
    try:
        with store.writing():
            todo = [u for u in users if force or not store.unchanged(u.user_id, history_hash(u, rec.task, settings))]
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
        busy: dict[int, float] = {}  # per worker: seconds inside its shards (fusion + training)
        for s in stats:
            busy[s["pid"]] = busy.get(s["pid"], 0.0) + s["fusion_seconds"] + s["train_seconds"]
        result = {"adapted": done, "skipped": len(users) - len(todo), "shards": len(shards), "workers": n,
                  "worker_pids": sorted(busy), "shard_seconds": round(sum(busy.values()), 3),
                  "busiest_worker_seconds": round(max(busy.values(), default=0.0), 3),
                  "trainable_params_per_user": stats[0]["trainable_params_per_user"] if stats else 0}
        log.info("ray adapt: %s", json.dumps(result))
        return result
    finally:
        if started:
            ray.shutdown()


class BankWorker:
    """A Ray actor: one backbone, for every group of anchors it is given."""

    def __init__(self, backbone: dict, threads: int | None = None):
        import torch

        from mta.backbone import Backbone

        if threads:
            torch.set_num_threads(threads)
        self.backbone = Backbone.load(BackboneConfig.build(backbone))

    def prepare(self, users: list[dict], task: str, cfg: dict, out: str, recipe: dict | None) -> dict:
        """The bank's index, and (``bank_base`` "task") its task LoRA trained here, before
        any group of residual anchors is handed out."""
        from mta.bank import ensure_base, prepare_bank
        from mta.config import BankConfig
        from mta.tasks import get_task

        people, t, c = [User.model_validate(u) for u in users], get_task(task), BankConfig.build(cfg)
        rec = prepare_bank(self.backbone, people, t, c, Path(out), recipe)
        ensure_base(self.backbone, rec, people, t, c, Path(out))
        return rec.model_dump(mode="json")

    def train(self, rec: dict, slots: list[int], users: list[dict], task: str, cfg: dict, out: str) -> list[dict]:
        from mta.bank import train_group
        from mta.config import BankConfig
        from mta.records import BankRecord
        from mta.tasks import get_task

        record = BankRecord.model_validate(rec)
        done = train_group(self.backbone, record, slots, [User.model_validate(u) for u in users], get_task(task),
                           BankConfig.build(cfg), Path(out))
        return [a.model_dump(mode="json") for a in done] + [{"pid": os.getpid()}]


def ray_build_bank(address: str, backbone: BackboneConfig, users: Sequence[User], task: str, cfg, out: Path,
                   workers: int | None = None, progress: Callable[[str, int, int], None] | None = None,
                   recipe: dict | None = None):
    """Build a bank with anchor groups trained on Ray workers (``address`` "local": a
    local instance); the same anchors and tensors as ``bank.build_bank``."""
    import ray

    from mta.bank import INDEX, check_out, todo_groups
    from mta.paths import recover, write_text_atomic, writer
    from mta.records import AnchorRecord, BankRecord, dump

    out = Path(out)
    check_out(out)
    started = not ray.is_initialized()
    if started:
        ray.init(address=None if address == "local" else address, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
    try:
        with writer(out, "bank"):
            recover(out)
            recover(out / "anchors")
            gpus = ray.cluster_resources().get("GPU", 0)
            gpu = backbone.device.startswith("cuda") or (backbone.device == "auto" and gpus > 0)
            cpus = int(ray.cluster_resources().get("CPU", 1))
            payload = [u.model_dump() for u in users]
            n = workers or (int(gpus) if gpu else cpus) or 1
            opts = {"num_gpus": 1} if gpu else {"num_cpus": 1}
            actor = ray.remote(max_restarts=3, max_task_retries=3, **opts)(BankWorker)
            threads = None if gpu else max(1, cpus // n)
            pool = [actor.remote(backbone.dump(), threads)]
            rec = BankRecord.model_validate(ray.get(pool[0].prepare.remote(payload, task, cfg.dump(), str(out),
                                                                             recipe)))
            groups = todo_groups(rec, out, cfg)
            pool += [actor.remote(backbone.dump(), threads) for _ in range(min(n, len(groups)) - 1)]
            total, done = len(rec.anchors), len(rec.anchors) - sum(len(g) for g in groups)
            if progress:
                progress("anchors", done, total)
            pending: dict = {}
            queue = list(groups)
            record = rec.model_dump(mode="json")
            for a in pool:
                if queue:
                    pending[a.train.remote(record, queue.pop(0), payload, task, cfg.dump(), str(out))] = a
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                a = pending.pop(ready[0])
                try:
                    trained = ray.get(ready[0])[:-1]
                except ray.exceptions.RayError as e:
                    raise MtaError(f"a worker failed its anchors after retries: {str(e).splitlines()[0]}") from None
                for t in trained:
                    rec.anchors[t["slot"]] = AnchorRecord.model_validate(t)
                write_text_atomic(out / INDEX, dump(rec))
                done += len(trained)
                if progress:
                    progress("anchors", done, total)
                if queue:
                    pending[a.train.remote(record, queue.pop(0), payload, task, cfg.dump(), str(out))] = a
        return rec
    finally:
        if started:
            ray.shutdown()
