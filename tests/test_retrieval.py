from mta.data.schema import HistoryItem
from mta.retrieval import retrieve
from mta.tasks import get_task

T = get_task("lamp2")
HIST = [
    HistoryItem(id="1", description="Two friends on a silly road trip.", tag="comedy"),
    HistoryItem(id="2", description="Astronauts travel through a wormhole in space.", tag="sci-fi"),
    HistoryItem(id="3", description="A young wizard at a school of magic.", tag="fantasy"),
]


def test_bm25_picks_the_matching_item():
    q = T.query_input("A space crew finds a wormhole near Saturn.")
    assert [it.id for it in retrieve(T, q, HIST, 1)] == ["2"]
    q = T.query_input("A school for wizard children.")
    assert retrieve(T, q, HIST, 1)[0].id == "3"


def test_k_bounds_and_exclusion():
    q = T.query_input("A space crew finds a wormhole.")
    assert retrieve(T, q, HIST, 0) == []
    assert len(retrieve(T, q, HIST, 10)) == 3
    got = retrieve(T, q, HIST, 1, exclude_id="2")
    assert got and got[0].id != "2"


def test_no_overlap_is_deterministic():
    q = T.query_input("zzz qqq")
    assert [it.id for it in retrieve(T, q, HIST, 2)] == ["1", "2"]
