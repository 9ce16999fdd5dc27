"""Task registry: one small definition per file, looked up by its CLI name."""

from mta.errors import MtaError
from mta.tasks import lamp1, lamp2, lamp3, lamp4, lamp5, lamp7, lastfm, movielens, synth
from mta.tasks.base import Task

TASKS: dict[str, Task] = {
    m.TASK.name: m.TASK for m in (lamp1, lamp2, lamp3, lamp4, lamp5, lamp7, lastfm, movielens, synth)
}


def get_task(name: str) -> Task:
    key = name.strip().lower().replace("-", "").replace("_", "")
    for t in TASKS.values():
        if t.name.replace("-", "") == key:
            return t
    raise MtaError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")


__all__ = ["TASKS", "Task", "get_task"]
