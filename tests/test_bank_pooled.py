"""Meta-LoRAs trained on their cluster's pooled histories (``--anchor-training cluster``):
every candidate belongs to exactly one anchor's cluster, each anchor trains on all of its
members' items, its retrieval embedding is the members' mean, and the default stays the
paper's (an anchor trains on its own history only)."""

from __future__ import annotations

import json

import numpy as np

from mta.bank import read_index
from mta.cli.main import main
from mta.data.readers import load_dataset

TINY = ["--model", "tiny-random-llama", "--embedder", "hashing-embedder"]


def test_pooled_anchors_train_on_their_whole_cluster(tmp_path):
    assert main(["data", "synth", "--out", str(tmp_path / "data"), "--users", "12", "--queries", "1"]) == 0
    users = {u.user_id: u for u in load_dataset(tmp_path / "data", "synth").users}
    for mode in ("user", "cluster"):
        assert main(["--quiet", "bank", "build", "--data", str(tmp_path / "data"), "--out", str(tmp_path / mode),
                     "--anchors", "3", "--min-history", "1", "--anchor-training", mode, *TINY]) == 0
    own, pooled = read_index(tmp_path / "user"), read_index(tmp_path / "cluster")
    assert own.config.anchor_training == "user" and all(a.members == [] for a in own.anchors)
    assert all(a.examples == len(users[a.user_id].history) for a in own.anchors)
    # the same anchors and clusters; each now trains on every member's items
    assert [a.user_id for a in pooled.anchors] == [a.user_id for a in own.anchors]
    members = [m for a in pooled.anchors for m in a.members]
    assert sorted(members) == sorted(users)  # a partition of the candidates
    for a in pooled.anchors:
        assert a.user_id in a.members
        assert a.examples == sum(len(users[m].history) for m in a.members)
        assert len(a.members) == 1 or a.examples > len(users[a.user_id].history)
        mean = np.mean([own_emb(own, users, m) for m in a.members], axis=0)
        assert np.allclose(a.embedding, mean / np.linalg.norm(mean), atol=1e-5)
    assert json.loads((tmp_path / "cluster" / "index.json").read_text())["config"]["anchor_training"] == "cluster"


def own_emb(rec, users, user_id):
    """A user's embedding as the bank embeds it (the hashing embedder is deterministic)."""
    from mta.anchors import embed_users
    from mta.models.loading import HashingEmbedder
    from mta.tasks import get_task

    return embed_users([users[user_id]], get_task(rec.task), HashingEmbedder())[0]


def test_skipped_training_steps_are_recorded_with_the_adapter(tmp_path, monkeypatch):
    """The steps an adapter skipped for a non-finite gradient (mta.engine.train) are in its
    record: the bank's index for an anchor, the store's record for a user's stack."""
    import mta.bank as bank_mod
    import mta.stacking as stacking_mod
    from mta.store import UserStore

    def one_skipped(real):
        def train(engine, target, jobs, *a, **kw):
            stats = real(engine, target, jobs, *a, **kw)
            return {**stats, "skipped_steps": {jobs[0].key: 1}}
        return train

    monkeypatch.setattr(bank_mod, "train_jobs", one_skipped(bank_mod.train_jobs))
    monkeypatch.setattr(stacking_mod, "train_jobs", one_skipped(stacking_mod.train_jobs))
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--users", "8", "--queries", "1"]) == 0
    assert main(["--quiet", "bank", "build", "--data", str(data), "--out", str(tmp_path / "bank"), "--anchors", "2",
                 "--min-history", "1", "--group-size", "1", *TINY]) == 0
    assert [a.skipped_steps for a in read_index(tmp_path / "bank").anchors] == [1, 1]  # one group each
    users = [u.user_id for u in load_dataset(data, "synth").users][:2]
    assert main(["--quiet", "adapt", "--bank", str(tmp_path / "bank"), "--data", str(data), "--out",
                 str(tmp_path / "store"), "--users", ",".join(users), "--users-per-pass", "2", *TINY]) == 0
    store = UserStore(tmp_path / "store")
    assert sorted(store.meta(u).stack.skipped_steps for u in users) == [0, 1]  # the pass's first job only
