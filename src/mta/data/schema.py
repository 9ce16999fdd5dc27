"""The canonical per-user schema every reader produces and every stage consumes.

A user has an id, a non-empty history of items (whose fields depend on the task: a
LaMP-2 item has ``description`` and ``tag``) and zero or more queries, each an
``input`` with an optional ``gold`` output. ``person`` (optional) groups users who are
one person (LaMP's several questions of one user): splits and bootstraps draw persons,
never users apart from their person (``mta.data.persons``). On disk the canonical layout is JSONL,
one user per line::

    {"user_id": "u1", "task": "lamp2", "source": "synthetic", "person": "p1",
     "history": [{"id": "1", "description": "...", "tag": "comedy"}],
     "queries": [{"id": "q1", "input": "Which tag ...", "gold": "comedy"}]}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


def _to_id(value: Any) -> str:
    # The processed LaMP files use integer user ids, the official ones strings.
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"an id must be a string or an integer, got {value!r}")
    text = str(value).strip()
    if not text:
        raise ValueError("an id must not be empty")
    return text


Id = Annotated[str, BeforeValidator(_to_id)]


class HistoryItem(BaseModel):
    """One item of a user's history. Task fields (``tag``, ``text``...) are extra fields."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: Id

    def get(self, name: str) -> Any:
        return (self.model_extra or {}).get(name)

    @property
    def fields(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Query(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Id
    input: str = Field(min_length=1)
    gold: str | None = None


class User(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    user_id: Id
    history: list[HistoryItem]
    queries: list[Query] = Field(default_factory=list)
    task: str | None = None
    source: str | None = None
    # the person behind this user: several LaMP "users" (questions) can be one person,
    # whose profiles are nearly the same (mta.data.persons); None: the user is a person
    person: Id | None = None

    @property
    def person_id(self) -> str:
        """The unit of every split and bootstrap: the person, else the user."""
        return self.person if self.person is not None else self.user_id


@dataclass
class Dataset:
    """Users of one task read from one place. ``synthetic`` marks generated data."""

    users: list[User]
    task: str
    layout: str
    path: Path
    synthetic: bool = False
