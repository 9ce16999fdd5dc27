"""`mta data lastfm`: Last.fm HetRec 2011 -> per-user artist tagging, on a slice of the
shared files (skipped when ../shared/data is absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mta.cli.main import main
from mta.data.lastfm import lastfm_users
from mta.data.readers import load_dataset
from mta.errors import DataError
from mta.tasks import get_task

LASTFM = Path(__file__).resolve().parents[2] / "shared" / "data" / "lastfm_hetrec2011"
pytestmark = pytest.mark.skipif(not (LASTFM / "user_taggedartists.dat").exists(), reason="../shared/data is absent")


@pytest.fixture(scope="module")
def sliced(tmp_path_factory) -> Path:
    """The first 6,000 tag assignments (a few dozen users), with the full tag and artist lists."""
    d = tmp_path_factory.mktemp("lastfm")
    lines = (LASTFM / "user_taggedartists.dat").read_text(encoding="utf-8").splitlines(keepends=True)
    (d / "user_taggedartists.dat").write_text("".join(lines[:6001]), encoding="utf-8")
    for name in ("tags.dat", "artists.dat"):
        (d / name).write_bytes((LASTFM / name).read_bytes())
    return d


def _expected(d: Path) -> dict[str, list[tuple[str, str, str]]]:
    """Independently: per user, (date, artist id, tag) of the pairs with exactly one of the 15 tags."""
    task = get_task("lastfm")
    tags = dict(line.split("\t")[:2] for line in (d / "tags.dat").read_text(encoding="utf-8").splitlines()[1:])
    named = {line.split("\t")[0] for line in (d / "artists.dat").read_text(encoding="utf-8").splitlines()[1:]}
    seen: dict[tuple[str, str], list] = {}
    for line in (d / "user_taggedartists.dat").read_text().splitlines()[1:]:
        u, a, t, day, month, year = line.split("\t")
        if tags[t].strip() in task.labels and a in named:
            seen.setdefault((u, a), []).append((f"{int(year):04d}-{int(month):02d}-{int(day):02d}", a, tags[t].strip()))
    out: dict[str, list] = {}
    for (u, _), v in seen.items():
        if len(v) == 1:
            out.setdefault(u, []).append(v[0])
    return {u: sorted(v, key=lambda x: (x[0], int(x[1]))) for u, v in out.items()}


def test_converter_keeps_single_tag_pairs_sorted_by_date_latest_as_queries(sliced):
    users = lastfm_users(sliced, queries=3, min_items=13)
    expected = _expected(sliced)
    assert [u.user_id for u in users] == sorted((u for u, v in expected.items() if len(v) >= 13), key=int)
    task = get_task("lastfm")
    for u in users:
        items = expected[u.user_id]
        assert [(it.get("date"), it.id, it.get("tag")) for it in u.history] == items[:-3]
        assert [q.gold for q in u.queries] == [t for _, _, t in items[-3:]]
        assert all(q.id.startswith(f"{u.user_id}-") for q in u.queries)
        # a query is asked like its item would be: item-prior and the leak check match them
        last = u.history[-1]
        assert task.item_example(last)[0].endswith(f"artist: {last.get('artist')}")
        assert all(q.input.startswith("Which tag does this user give this artist") for q in u.queries)


def test_cli_writes_loadable_users_and_refuses_to_overwrite(sliced, tmp_path):
    out = tmp_path / "lf"
    assert main(["data", "lastfm", "--dir", str(sliced), "--out", str(out)]) == 0
    ds = load_dataset(out)
    assert ds.task == "lastfm" and ds.layout == "jsonl" and len(ds.users) >= 5
    assert all(u.person is None and u.person_id == u.user_id for u in ds.users)  # each Last.fm user is a person
    before = (out / "users.jsonl").read_bytes()
    assert main(["data", "lastfm", "--dir", str(sliced), "--out", str(out)]) == 2
    assert (out / "users.jsonl").read_bytes() == before
    assert json.loads((out / "users.jsonl").read_text().splitlines()[0])["source"] == "lastfm-hetrec2011"


def test_bad_inputs_are_one_line_errors(sliced, tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        lastfm_users(tmp_path / "nope")
    with pytest.raises(DataError, match="no such file"):
        lastfm_users(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("user_taggedartists.dat", "artists.dat"):
        (broken / name).write_bytes((sliced / name).read_bytes())
    (broken / "tags.dat").write_text("tagID\ttagValue\n1\trock\n", encoding="utf-8")
    with pytest.raises(DataError, match="no tag named 'pop'"):
        lastfm_users(broken)
    with pytest.raises(DataError, match="--min-items"):
        lastfm_users(sliced, queries=3, min_items=3)
