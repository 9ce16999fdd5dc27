"""Users' stacked adapters resident on the device: the engine's stack table as a cache
of the store, least recently used out, and the stacks of waiting requests read from the
store ahead of their load (a server's decode loop then only copies them)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from mta.engine.engine import finite, flat_host
from mta.engine.peft_io import load_adapter
from mta.records import UserRecord
from mta.store import UserStore

if TYPE_CHECKING:
    from mta.loaded_bank import LoadedBank

READ_AHEAD = 64  # stacks read ahead and not yet loaded, at most (``ResidentStacks.prefetch``)


class ResidentStacks:
    """Users' stacked adapters held in the engine's stack table, least recently used
    first out. The table is sized to ``capacity`` slots (at least the users of one
    batch), with the largest rank and the union of the layers of the users it holds;
    lower ranks and missing layers are zero-padded, which is exact."""

    def __init__(self, bank: LoadedBank, capacity: int = 256):
        self.bank, self.capacity = bank, capacity
        self.slots: OrderedDict[str, int] = OrderedDict()
        self.stamps: dict[str, str] = {}  # user -> the stored stack a slot holds (its sha256)
        self.rank, self.layers, self.size = 0, frozenset(), 0
        self.loads = self.evictions = 0
        self.load_seconds = 0.0  # spent reading stacks from the store into the table (a server's "load" phase)
        # stacks read ahead of their load (``prefetch``): user -> a reader thread's (stamp, tensors, config)
        self._reads: OrderedDict[str, Future] = OrderedDict()
        self._reads_lock = threading.Lock()
        self._reader: ThreadPoolExecutor | None = None
        self.read_ahead = 0  # loads that found their stack read ahead

    def invalidate(self) -> None:
        """The engine's stack table was reused for something else (training)."""
        self.slots.clear()
        self.stamps.clear()
        self.rank, self.layers, self.size = 0, frozenset(), 0

    def evict(self, user_id: str) -> None:
        self.stamps.pop(user_id, None)
        if self.slots.pop(user_id, None) is not None:
            self.evictions += 1

    @staticmethod
    def _stamp(rec: UserRecord) -> str:
        return rec.stack.sha256 or rec.history_hash

    def ensure(self, records: dict[str, UserRecord], store: UserStore) -> dict[str, int]:
        """Make every user of ``records`` (all with a stack) resident; return user -> slot.
        A slot holding an older stack of the user (re-adapted by another process sharing
        the store) is loaded again."""
        engine = self.bank.backbone.engine
        for uid in records:
            if uid in self.slots and self.stamps.get(uid) != self._stamp(records[uid]):
                self.evict(uid)
            if uid in self.slots:
                self.slots.move_to_end(uid)
        new = [u for u in records if u not in self.slots]
        if new:
            rank = max([self.rank] + [records[u].stack.rank for u in new])
            layers = self.layers.union(*(self._layers_of(records[u]) for u in new))
            room = max(self.capacity, len(records))
            if rank > self.rank or layers != self.layers or room > self.size:
                # a new shape: reallocate; this batch's users load again, the rest on demand
                engine.alloc_stacks(room, rank, sorted(layers))
                self.rank, self.layers, self.size = rank, frozenset(layers), room
                self.slots.clear()
                self.stamps.clear()
                new = list(records)
            for u in new:
                self._load(u, records[u], store)
        return {u: self.slots[u] for u in records}

    def prefetch(self, user_id: str, store: UserStore) -> None:
        """(Any thread.) Read ``user_id``'s stored stack now, on a reader thread, so that its
        load at the request's admission only copies it onto the device: the file's read,
        its checksum and checks (and its pinning on CUDA, so the copy waits for nothing) off
        the decode loop's thread. Nothing for a resident user or one already being read;
        the oldest read not yet taken goes when ``READ_AHEAD`` are held (pinned host memory:
        a rank-2 stack on 8 blocks at Llama-3-8B shape is 5 MB). A read that fails,
        or whose stack is not the one the admission plans with (the user adapted again
        since), is dropped there and the stack is read as without it (its error, if any,
        then goes to the request)."""
        if user_id in self.slots:  # (read without the scheduler's lock: a hint, the load checks)
            return
        with self._reads_lock:
            if user_id in self._reads:
                return
            if len(self._reads) >= min(self.capacity, READ_AHEAD):
                self._reads.popitem(last=False)
            if self._reader is None:
                self._reader = ThreadPoolExecutor(1, thread_name_prefix="mta-stack-read")
            self._reads[user_id] = self._reader.submit(self._read, user_id, store)

    def _read(self, user_id: str, store: UserStore) -> tuple[str, dict, dict, bool] | None:
        """(The reader thread.) The stored stack of ``user_id`` as its load wants it: the
        record's stamp, the factors in the table's dtype (pinned on CUDA), the config, and
        whether every factor is finite (checked here, so the load on the decode loop's
        thread need not)."""
        if not store.has(user_id):
            return None
        rec = store.meta(user_id)
        if not rec.stack:
            return None
        backbone = self.bank.backbone
        tensors, config, _ = load_adapter(store.stack_path(user_id, rec), backbone.fingerprint)
        dtype = next(iter(backbone.engine.layers.values())).bank_A.dtype
        names = list(tensors)
        parts = [t for m in names for t in tensors[m]]
        # one host buffer in the table's dtype (pinned on CUDA), the factors views of it: one
        # concatenation and one pinning copy, not a cast and a pinning copy a factor (392 at
        # Qwen2.5-1.5B with a stack on every layer), each a parallel region that on a busy
        # host waits for a time slice (mta.engine.engine.flat_host)
        flat = flat_host(parts, dtype)
        if backbone.device.type == "cuda":
            flat = flat.pin_memory()
        views = [v.view(t.shape) for v, t in zip(flat.split([t.numel() for t in parts]), parts)]
        tensors = {m: (views[2 * i], views[2 * i + 1]) for i, m in enumerate(names)}
        return self._stamp(rec), tensors, config, finite([flat])

    def _read_ahead(self, user_id: str, rec: UserRecord) -> tuple[dict, dict, bool] | None:
        """The stack ``prefetch`` read for ``user_id``, if it is ``rec``'s (waiting for the
        read when it is still running), with whether its factors are finite; None otherwise."""
        with self._reads_lock:
            fut = self._reads.pop(user_id, None)
        if fut is None:
            return None
        try:
            got = fut.result()
        except Exception:  # noqa: BLE001 - read again at the load, whose error reaches the request
            return None
        if got is None or got[0] != self._stamp(rec):
            return None
        self.read_ahead += 1
        return got[1], got[2], got[3]

    def close(self) -> None:
        """Stop the reader thread (reads in flight finish; those not yet taken are dropped)."""
        with self._reads_lock:
            self._reads.clear()
            reader, self._reader = self._reader, None
        if reader is not None:
            reader.shutdown(wait=True, cancel_futures=True)

    def _layers_of(self, rec: UserRecord) -> set[str]:
        engine = self.bank.backbone.engine
        return set(engine.stack_selection(rec.stack.targets, rec.stack.layers))

    def _load(self, user_id: str, rec: UserRecord, store: UserStore) -> None:
        used = set(self.slots.values())
        if len(used) >= self.size:  # the least recently used user leaves
            gone, slot = self.slots.popitem(last=False)
            self.stamps.pop(gone, None)
            self.evictions += 1
        else:
            slot = next(s for s in range(self.size) if s not in used)
        t0 = time.monotonic()
        read = self._read_ahead(user_id, rec)
        checked = False
        if read is None:
            tensors, config, _ = load_adapter(store.stack_path(user_id, rec), self.bank.backbone.fingerprint)
        else:
            tensors, config, checked = read
        self.bank.backbone.engine.load_user(slot, tensors, alpha=float(config["lora_alpha"]), checked=checked)
        self.load_seconds += time.monotonic() - t0
        self.slots[user_id] = slot
        self.stamps[user_id] = self._stamp(rec)
        self.loads += 1
