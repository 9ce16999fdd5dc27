import pytest

from mta.data.schema import HistoryItem
from mta.errors import MtaError
from mta.tasks import TASKS, get_task
from mta.tasks.base import parse_first_line, parse_label, parse_score
from mta.tasks.lamp2 import LABELS


@pytest.mark.parametrize("text, expected", [
    ("comedy", "comedy"),
    ("  \"Sci-Fi\".", "sci-fi"),
    ("The tag is: dark comedy", "dark comedy"),          # longer label beats "comedy"
    ("This movie is a comedy-drama.", "comedy"),
    ("based on a book\nbecause ...", "based on a book"),
    ("I think it's about psychology, maybe a twist ending", "psychology"),
    ("Tag: [true story]", "true story"),
    ("no idea", None),
    ("", None),
    ("scifi", None),                                        # no fuzzy guessing
    ("twist endingHuman: what next", "twist ending"),       # ran on past its answer (seen with Qwen)
    ("dark comedyUser", "dark comedy"),                     # the longest leading label
])
def test_parse_tag(text, expected):
    assert parse_label(text, LABELS) == expected


@pytest.mark.parametrize("text, expected", [
    ("4", 4.0), ("Score: 5/5", 5.0), ("I'd say 3.5 stars", 3.5), ("7", 5.0),
    ("0", 1.0), ("-2", 1.0), ("five", None), ("", None),
])
def test_parse_score(text, expected):
    assert parse_score(text) == expected


@pytest.mark.parametrize("text, expected", [
    ('\n\n  "Deep Nets for Everyone"\nSecond line', "Deep Nets for Everyone"),
    ("Title: A Survey of LoRA", "A Survey of LoRA"),
    ("   ", ""),
])
def test_parse_first_line(text, expected):
    assert parse_first_line(text) == expected


def test_lamp1_parse():
    t = get_task("lamp1")
    assert t.parse("[2]") == "[2]"
    assert t.parse("The answer is [ 1 ] because") == "[1]"
    assert t.parse("2") == "[2]"
    assert t.parse("neither") is None


def test_every_task_renders_and_scores():
    samples = {
        "lamp1": {"title": "T", "abstract": "A"}, "lamp2": {"description": "D", "tag": "comedy"},
        "lamp3": {"text": "good", "score": 4}, "lamp4": {"text": "body", "title": "head"},
        "lamp5": {"title": "T", "abstract": "A"}, "lamp7": {"text": "tweet"},
        "movielens": {"title": "Heat (1995)", "genres": "Action", "score": 4},
        "synth": {"description": "D", "tag": "drama"}, "lastfm": {"artist": "Björk", "tag": "experimental"},
    }
    assert set(samples) == set(TASKS)
    for name, fields in samples.items():
        t = TASKS[name]
        item = HistoryItem(id="1", **fields)
        assert t.check_item(item) is None
        assert t.render_item(item)
        inp, out = t.item_example(item)
        assert inp and out
        gold = {"classification": (t.labels[0] if t.labels else "x"), "rating": "3",
                "generation": "a b"}[t.kind]
        scored = t.score([t.parse(gold)], [gold])
        assert set(scored) == set(t.metric_names)
        best = 0.0 if t.kind == "rating" else 1.0
        assert scored[t.metric_names[0]] == pytest.approx(best)


def test_check_item_names_missing_field():
    msg = get_task("lamp2").check_item(HistoryItem(id="1", description="x"))
    assert "no field 'tag'" in msg


def test_unknown_task():
    with pytest.raises(MtaError, match="unknown task 'lamp9'"):
        get_task("lamp9")
    assert get_task("LaMP-2").name == "lamp2"


def test_prompt_puts_history_before_instruction():
    t = get_task("lamp2")
    item = HistoryItem(id="1", description="Robots.", tag="sci-fi")
    p = t.prompt(t.query_input("Aliens."), [item])
    assert p.index('is "sci-fi"') < p.index("Which tag")
    assert t.prompt("Q") == "Q"
