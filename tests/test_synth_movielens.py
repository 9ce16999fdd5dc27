from collections import Counter

import pytest

from mta.data.movielens import movielens_users
from mta.data.synth import GROUPS, group_of, synth_users
from mta.errors import DataError


def test_synth_is_deterministic_and_marked():
    a = synth_users(8, seed=3)
    b = synth_users(8, seed=3)
    assert a == b and a != synth_users(8, seed=4)
    assert all(u.source == "synthetic" and u.task == "synth" for u in a)
    assert all(len(u.history) == 10 and len(u.queries) == 2 for u in a)


def test_synth_history_reveals_the_group():
    # Personalisation must matter: for each query, the tag that the user's OWN history
    # prefers between the two themes beats the tag a random other group would pick.
    users = synth_users(40, seed=0, noise=0.1)
    own, other = 0, 0
    for u in users:
        g = group_of(u.user_id)
        rank = GROUPS[g]
        alt = GROUPS[(g + 1) % 4]
        for q in u.queries:
            gold = q.gold
            # reconstruct the two candidate tags from the description's themes
            from mta.data.synth import THEMES
            cands = [t for t, phrases in THEMES.items() if any(p in q.input for p in phrases)]
            assert gold in cands and len(cands) == 2
            own += min(cands, key=rank.index) == gold
            other += min(cands, key=alt.index) == gold
        counts = Counter(it.tag for it in u.history)
        assert sum(counts.values()) == 10
    n = sum(len(u.queries) for u in users)
    assert own == n  # queries carry the group's choice without noise
    assert other < 0.75 * n


def test_synth_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_users"):
        synth_users(0)
    with pytest.raises(ValueError, match="groups"):
        synth_users(4, groups=9)


def test_movielens_small_fixture(tmp_path):
    (tmp_path / "movies.csv").write_text(
        "movieId,title,genres\n1,Heat (1995),Action|Crime\n2,Up (2009),Animation\n"
        "3,Alien (1979),Horror|Sci-Fi\n")
    (tmp_path / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n7,1,4.5,30\n7,2,0.5,10\n7,3,3.0,20\n8,1,2.0,5\n")
    users = movielens_users(tmp_path / "ratings.csv", tmp_path / "movies.csv")
    assert [u.user_id for u in users] == ["7"]  # user 8 has too few ratings
    u = users[0]
    assert [it.id for it in u.history] == ["2", "3"]  # chronological
    assert [it.get("score") for it in u.history] == [1, 3]  # 0.5 -> 1, 3.0 -> 3
    assert u.queries[0].gold == "5" and "Heat (1995)" in u.queries[0].input


def test_movielens_bad_csv(tmp_path):
    (tmp_path / "movies.csv").write_text("movieId,name\n1,x\n")
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n")
    with pytest.raises(DataError, match=r"missing column\(s\) \['title', 'genres'\]"):
        movielens_users(tmp_path / "ratings.csv", tmp_path / "movies.csv")


def test_movielens_shared(movielens_dir):
    users = movielens_users(movielens_dir / "ratings.csv", movielens_dir / "movies.csv")
    assert len(users) == 671
    assert min(len(u.history) for u in users) >= 19
