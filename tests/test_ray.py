"""Adaptation sharded over a local Ray instance (2 CPU workers, the tiny model): equal to
the single-process result, a worker killed mid-shard is retried and the store ends
complete and consistent, and a re-run trains nobody."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mta.cli.main import main
from mta.store import UserStore

pytestmark = pytest.mark.integration  # subprocesses, servers, Ray, benchmarks: the integration tier

pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[1]
USERS = ",".join(f"synth-{i:04d}" for i in range(4))


def _adapt(tmp: Path, out: str, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mta", "--quiet", "adapt", "--bank", str(tmp / "bank"), "--data",
                           str(tmp / "data"), "--out", str(tmp / out), "--users", USERS, "--users-per-pass", "2",
                           *extra], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})})


def _tensors(store: Path) -> dict:
    st = UserStore(store)
    return {u: load_file(str(st.user_dir(u) / "stack" / "adapter_model.safetensors")) for u in st.user_ids()}


def test_sharded_adapt_equals_single_process_and_survives_a_killed_worker(tmp_path):
    assert main(["data", "synth", "--out", str(tmp_path / "data"), "--users", "8", "--queries", "1"]) == 0
    assert main(["--quiet", "bank", "build", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "bank"),
                 "--anchors", "2", "--min-history", "1", "--model", "tiny-random-llama", "--embedder",
                 "hashing-embedder"]) == 0
    single = _adapt(tmp_path, "single")
    assert single.returncode == 0, single.stderr[-1500:]
    want = _tensors(tmp_path / "single")

    def same(got: dict) -> None:  # workers run one CPU thread each: float sums may round differently
        assert sorted(got) == sorted(want)
        for u in want:
            for k in want[u]:
                torch.testing.assert_close(got[u][k], want[u][k], atol=1e-6, rtol=1e-5)

    # sharded over 2 workers, one of which dies (no clean-up) after writing its first user:
    # Ray restarts it and retries the shard; the users equal the single-process ones
    killed = _adapt(tmp_path, "killed", "--ray", "local", "--ray-workers", "2",
                    env={"MTA_FAULT": "store:user-written:1", "MTA_FAULT_ONCE": str(tmp_path / "fault-fired")})
    assert (tmp_path / "fault-fired").exists(), "the fault did not fire"
    assert killed.returncode == 0, killed.stderr[-1500:]
    assert "in 2 shard(s) on 2 Ray worker(s)" in killed.stdout
    # the driver logs what the workers spent inside their shards (benchmarks/ray_adapt.py reads it)
    summary = [ln for ln in (tmp_path / "killed" / "run.log").read_text().splitlines() if "ray adapt: " in ln]
    inner = json.loads(summary[-1].split("ray adapt: ", 1)[1])
    assert len(inner["worker_pids"]) >= 2 and 0 < inner["busiest_worker_seconds"] <= inner["shard_seconds"]
    same(_tensors(tmp_path / "killed"))
    st = UserStore(tmp_path / "killed")
    assert all(e.record is not None for e in st.entries())
    for u in st.user_ids():
        st.stack_path(u, st.meta(u))  # every checksum holds
    again = _adapt(tmp_path, "killed")  # the store the retried shards left is whole: nothing to redo
    assert again.returncode == 0 and "adapted 0 user(s)" in again.stdout and "4 unchanged" in again.stdout


def test_bank_build_on_ray_equals_the_plain_build(tmp_path):
    assert main(["data", "synth", "--out", str(tmp_path / "data"), "--users", "6", "--queries", "0"]) == 0
    common = ["--data", str(tmp_path / "data"), "--anchors", "3", "--min-history", "1", "--group-size", "1",
              "--model", "tiny-random-llama", "--embedder", "hashing-embedder"]
    assert main(["--quiet", "bank", "build", "--out", str(tmp_path / "plain"), *common]) == 0
    r = subprocess.run([sys.executable, "-m", "mta", "--quiet", "bank", "build", "--out", str(tmp_path / "ray"),
                        *common, "--ray", "local", "--ray-workers", "2"], capture_output=True, text=True, cwd=ROOT,
                       timeout=600, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert r.returncode == 0, r.stderr[-1500:]
    from mta.bank import adapter_dir, read_index

    plain, ray_rec = read_index(tmp_path / "plain"), read_index(tmp_path / "ray")
    assert ray_rec.complete and ray_rec.anchor_ids == plain.anchor_ids
    for a, b in zip(plain.anchors, ray_rec.anchors):
        ta = load_file(str(adapter_dir(tmp_path / "plain", a.slot) / "adapter_model.safetensors"))
        tb = load_file(str(adapter_dir(tmp_path / "ray", b.slot) / "adapter_model.safetensors"))
        # workers run one CPU thread each, the plain build two: float sums may round differently
        for k in ta:
            torch.testing.assert_close(tb[k], ta[k], atol=1e-6, rtol=1e-5)
        assert b.examples == a.examples and b.done
