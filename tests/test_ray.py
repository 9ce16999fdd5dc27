"""Adaptation sharded over a local Ray instance (2 CPU workers, the tiny model): equal to
the single-process result, a worker killed mid-shard is retried and the store ends
complete and consistent, and a re-run trains nobody."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mta.cli.main import main
from mta.store import UserStore

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
    sharded = _adapt(tmp_path, "sharded", "--ray", "local", "--ray-workers", "2")
    assert sharded.returncode == 0, sharded.stderr[-1500:]
    assert "in 2 shard(s) on 2 Ray worker(s)" in sharded.stdout
    want = _tensors(tmp_path / "single")
    for got in (_tensors(tmp_path / "sharded"),):
        assert sorted(got) == sorted(want)
        for u in want:
            assert all(torch.equal(got[u][k], want[u][k]) for k in want[u]), u
    # a worker dies (no clean-up) after writing its first user: Ray restarts it and retries the shard
    killed = _adapt(tmp_path, "killed", "--ray", "local", "--ray-workers", "2",
                    env={"MTA_FAULT": "store:user-written:1", "MTA_FAULT_ONCE": str(tmp_path / "fault-fired")})
    assert (tmp_path / "fault-fired").exists(), "the fault did not fire"
    assert killed.returncode == 0, killed.stderr[-1500:]
    got = _tensors(tmp_path / "killed")
    assert sorted(got) == sorted(want)
    for u in want:
        assert all(torch.equal(got[u][k], want[u][k]) for k in want[u]), u
    st = UserStore(tmp_path / "killed")
    assert all(e.record is not None for e in st.entries())
    for u in st.user_ids():
        st.stack_path(u, st.meta(u))  # every checksum holds
    again = _adapt(tmp_path, "killed", "--ray", "local", "--ray-workers", "2")
    assert again.returncode == 0 and "adapted 0 user(s)" in again.stdout and "4 unchanged" in again.stdout
