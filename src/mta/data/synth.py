"""A deterministic synthetic tagging dataset whose users differ by latent taste group.

Every movie mentions two themes, each tied to one of six tags. A user's tag for a
movie is the theme their taste group ranks higher (a user flips it with probability
``noise``). The two themes are shuffled in the text, so a model that knows nothing of
the user can at best guess between them: the user's history is what tells. This is
what makes personalisation measurably matter on it.
"""

from __future__ import annotations

import random

from mta.data.schema import User
from mta.tasks.synth import LABELS, TASK

THEMES: dict[str, list[str]] = {
    "action": ["car chases and explosions", "a heist that goes loud", "rooftop fist fights",
               "a desperate shoot-out", "a ticking bomb"],
    "comedy": ["slapstick mishaps", "a wedding that goes hilariously wrong", "deadpan banter",
               "a bumbling detective", "absurd misunderstandings"],
    "romance": ["two strangers falling in love", "a love letter lost for years",
                "a summer romance", "an unlikely couple", "a proposal in the rain"],
    "horror": ["a haunted house", "a creature in the dark", "a cursed videotape",
               "whispers in the basement", "a masked stalker"],
    "sci-fi": ["a starship crew", "time travel", "a rogue android", "a colony on Mars",
               "an alien signal"],
    "drama": ["a family torn apart", "a long trial", "grief after a loss",
              "a miner's strike", "a mother's sacrifice"],
}
SETTINGS = ["in Paris", "in a small town", "on a remote island", "in 1920s Chicago",
            "in a future megacity", "aboard a ship", "in a boarding school", "in the desert"]

# Each group ranks the six tags; groups are chosen so that they disagree on most pairs.
GROUPS: list[tuple[str, ...]] = [
    ("action", "sci-fi", "horror", "comedy", "drama", "romance"),
    ("romance", "drama", "comedy", "sci-fi", "horror", "action"),
    ("horror", "comedy", "action", "romance", "sci-fi", "drama"),
    ("drama", "romance", "sci-fi", "action", "comedy", "horror"),
]


def _movie(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.sample(LABELS, 2)
    pa, pb = rng.choice(THEMES[a]), rng.choice(THEMES[b])
    if rng.random() < 0.5:
        pa, pb = pb, pa
    desc = f"A film set {rng.choice(SETTINGS)} with {pa} and {pb}."
    return desc, a, b


def _tag(rank: tuple[str, ...], a: str, b: str, rng: random.Random, noise: float) -> str:
    first, second = (a, b) if rank.index(a) < rank.index(b) else (b, a)
    return second if rng.random() < noise else first


def synth_users(
    n_users: int, seed: int = 0, history: int = 10, queries: int = 2,
    groups: int = 4, noise: float = 0.1,
) -> list[User]:
    """``n_users`` users spread evenly over ``groups`` taste groups; deterministic in seed."""
    if n_users < 1:
        raise ValueError(f"n_users must be at least 1, got {n_users}")
    if not 1 <= groups <= len(GROUPS):
        raise ValueError(f"groups must be between 1 and {len(GROUPS)}, got {groups}")
    if history < 1 or queries < 0:
        raise ValueError(f"history must be >= 1 and queries >= 0, got {history}, {queries}")
    if not 0.0 <= noise < 0.5:
        raise ValueError(f"noise must be in [0, 0.5), got {noise}")
    rng = random.Random(seed)
    users = []
    for u in range(n_users):
        group = u % groups
        rank = GROUPS[group]
        items, qs = [], []
        for j in range(history):
            desc, a, b = _movie(rng)
            items.append({"id": f"{u}-{j}", "description": desc, "tag": _tag(rank, a, b, rng, noise)})
        for j in range(queries):
            desc, a, b = _movie(rng)
            qs.append({"id": f"{u}-q{j}", "input": TASK.query_input(desc),
                       "gold": _tag(rank, a, b, rng, 0.0)})
        users.append(User.model_validate({
            "user_id": f"synth-{u:04d}", "task": TASK.name, "source": "synthetic",
            "history": items, "queries": qs,
        }))
    return users


def group_of(user_id: str, groups: int = 4) -> int:
    """The latent group of a synthetic user (for plots and sanity checks, never for models)."""
    return int(user_id.rsplit("-", 1)[1]) % groups
