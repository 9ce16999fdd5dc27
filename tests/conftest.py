"""Shared fixtures. Tests needing ../shared/data skip when it is absent; tests needing
real weights are marked ``integration`` and skip when the model is not fetched (make
test fetches them first, so in CI they run)."""

from __future__ import annotations

import json
import os
from pathlib import Path

# MKL (torch's CPU BLAS here) may round differently from run to run (memory alignment,
# threading) unless its conditional numerical reproducibility is on; tests that compare
# the answers of two processes (a Ray replica and the single server, the server and
# `mta generate`) then see a greedy token flip on the tiny random model's near-tied
# logits. One such flip was seen once (2026-12-01, test_ray_serve, not reproduced in
# three reruns). Set before torch loads, for this process and the servers it starts.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
LAMP2_USERS = SHARED / "data" / "lamp2m_movie_tagging_72users" / "users.json"
MOVIELENS = SHARED / "data" / "movielens_ml-latest-small_2016"


@pytest.fixture
def lamp2_users() -> Path:
    if not LAMP2_USERS.exists():
        pytest.skip(f"shared data absent: {LAMP2_USERS}")
    return LAMP2_USERS


@pytest.fixture
def movielens_dir() -> Path:
    if not (MOVIELENS / "ratings.csv").exists():
        pytest.skip(f"shared data absent: {MOVIELENS}")
    return MOVIELENS


def require_model(name: str) -> None:
    from mta.models.registry import get_spec

    if not get_spec(name).present:
        pytest.skip(f"model {name} not fetched (run: mta models fetch {name})")


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


@pytest.fixture
def lamp_official(tmp_path: Path) -> Path:
    """A small LaMP-2 dev split in the official layout (questions + outputs)."""
    from mta.tasks.lamp2 import TASK

    questions, golds = [], []
    for i, (desc, tag) in enumerate([
        ("A crew of astronauts travels through a wormhole.", "sci-fi"),
        ("A clumsy detective solves a case by accident.", "comedy"),
        ("A wizard boy attends a school of magic.", "fantasy"),
    ]):
        qid = f"2{i:02d}"
        questions.append({"id": qid, "input": TASK.query_input(desc), "profile": [
            {"id": f"{qid}1", "description": "Robots rise against humans.", "tag": "sci-fi"},
            {"id": f"{qid}2", "description": "Two friends on a silly road trip.", "tag": "comedy"},
        ]})
        golds.append({"id": qid, "output": tag})
    d = tmp_path / "lamp2"
    d.mkdir()
    write_json(d / "dev_questions.json", questions)
    write_json(d / "dev_outputs.json", {"task": "LaMP_2", "golds": golds})
    return d
