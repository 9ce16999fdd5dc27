"""Read users from the three layouts and check them against their task.

Layouts, detected from the path:

- ``lamp``: the official LaMP files, ``{split}_questions.json`` (a list of
  ``{id, input, profile}``, one user per question) plus, when present, the sibling
  ``{split}_outputs.json`` (``{task, golds: [{id, output}]}``);
- ``processed``: the per-user list used by the MTA and Per-Pcs code
  (``{user_id, profile, query: [{id, input, gold}]}``);
- ``jsonl``: the canonical schema, one user per line (see ``mta.data.schema``).

Every problem raises ``DataError`` whose message names the file, the record and the
field, so the CLI can print one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mta.data.persons import infer_persons, read_persons, with_persons
from mta.data.schema import Dataset, HistoryItem, Query, User
from mta.errors import DataError
from mta.tasks import Task, get_task

LAMP_TASK_NAMES = {f"LaMP_{k}": f"lamp{k}" for k in (1, 2, 3, 4, 5, 7)}


def _load_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None


def _where(path: Path, index: int, raw: Any) -> str:
    uid = raw.get("user_id", raw.get("id")) if isinstance(raw, dict) else None
    return f"{path}: record {index}" + (f" (user {uid})" if uid is not None else "")


def _validation_message(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "record"
    msg = first["msg"]
    if first["type"] == "missing":
        return f"missing field '{loc}'"
    return f"field '{loc}': {msg}"


def _make_user(path: Path, index: int, raw: Any) -> User:
    if not isinstance(raw, dict):
        raise DataError(f"{path}: record {index}: expected an object, got {type(raw).__name__}")
    try:
        return User.model_validate(raw)
    except ValidationError as e:
        raise DataError(f"{_where(path, index, raw)}: {_validation_message(e)}") from None


def jsonl_lines(text: str) -> list[str]:
    """The lines of a JSON Lines text: split at "\n" only (and a "\r" before it). Not
    ``str.splitlines``, which also splits at U+0085, U+2028 and other characters that JSON
    may carry unescaped inside a string (a user id, say)."""
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def read_jsonl(path: Path) -> tuple[list[User], str | None, bool]:
    users, tasks, synthetic = [], set(), False
    try:
        lines = jsonl_lines(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {lineno}: not valid JSON: {e.msg}") from None
        user = _make_user(path, lineno, raw)
        users.append(user)
        if user.task:
            tasks.add(user.task)
        synthetic |= user.source == "synthetic"
    if len(tasks) > 1:
        raise DataError(f"{path}: users of several tasks in one file: {sorted(tasks)}")
    return users, (tasks.pop() if tasks else None), synthetic


def read_processed(path: Path, data: list) -> list[User]:
    users = []
    for i, raw in enumerate(data):
        if not isinstance(raw, dict):
            raise DataError(f"{path}: record {i}: expected an object, got {type(raw).__name__}")
        for key in ("user_id", "profile"):
            if key not in raw:
                raise DataError(f"{_where(path, i, raw)}: missing field '{key}'")
        queries = raw.get("query", [])
        if isinstance(queries, dict):
            queries = [queries]
        users.append(_make_user(path, i, {
            "user_id": raw["user_id"], "history": raw["profile"], "queries": queries,
        }))
    return users


def _outputs_path(questions: Path) -> Path:
    return questions.with_name(questions.name.replace("_questions.json", "_outputs.json"))


def read_lamp(questions: Path) -> tuple[list[User], str | None]:
    data = _load_json(questions)
    if not isinstance(data, list):
        raise DataError(f"{questions}: expected a JSON list of questions, got {type(data).__name__}")
    golds: dict[str, str] = {}
    task = None
    outputs = _outputs_path(questions)
    if outputs.exists():
        out = _load_json(outputs)
        if not isinstance(out, dict) or not isinstance(out.get("golds"), list):
            raise DataError(f"{outputs}: expected an object with a 'golds' list")
        task = LAMP_TASK_NAMES.get(str(out.get("task")))
        for j, g in enumerate(out["golds"]):
            if not isinstance(g, dict) or "id" not in g or "output" not in g:
                raise DataError(f"{outputs}: gold {j}: needs fields 'id' and 'output'")
            gid = str(g["id"])
            if gid in golds:
                raise DataError(f"{outputs}: gold {j}: duplicate id '{gid}'")
            golds[gid] = str(g["output"])
    users = []
    for i, raw in enumerate(data):
        if not isinstance(raw, dict):
            raise DataError(f"{questions}: record {i}: expected an object, got {type(raw).__name__}")
        for key in ("id", "input", "profile"):
            if key not in raw:
                raise DataError(f"{_where(questions, i, raw)}: missing field '{key}'")
        qid = str(raw["id"])
        users.append(_make_user(questions, i, {
            "user_id": qid,
            "history": raw["profile"],
            "queries": [{"id": qid, "input": raw["input"], "gold": golds.get(qid)}],
        }))
    if golds:
        asked = {u.user_id for u in users}
        orphans = [g for g in golds if g not in asked]
        if orphans:
            raise DataError(
                f"{outputs}: {len(orphans)} gold(s) have no question, first id '{orphans[0]}'"
            )
    return users, task


# How each task's query input begins (the LaMP instructions; ours for MovieLens).
INPUT_PREFIXES = {
    "For an author who has written the paper": "lamp1",
    "Which tag does this movie relate to": "lamp2",
    "What is the score of the following review": "lamp3",
    "Generate a headline for the following article": "lamp4",
    "Generate a title for the following abstract": "lamp5",
    "Paraphrase the following tweet": "lamp7",
    "What score from 1 to 5 would this user give": "movielens",
    "Which tag does this user give this artist": "lastfm",
}


def detect_task(users: list[User]) -> str | None:
    """Guess the task from the query wording, else from the history item fields."""
    for u in users[:20]:
        for q in u.queries:
            for prefix, name in INPUT_PREFIXES.items():
                if q.input.startswith(prefix):
                    return name
    items = [it for u in users[:20] for it in u.history]
    if not items:
        return None
    fields = set(items[0].fields)
    if {"description", "tag"} <= fields:
        return "lamp2"
    if {"artist", "tag"} <= fields:
        return "lastfm"
    if {"title", "genres", "score"} <= fields:
        return "movielens"
    if {"text", "score"} <= fields:
        return "lamp3"
    if {"text", "title"} <= fields:
        return "lamp4"
    if {"title", "abstract"} <= fields:
        return "lamp5"
    if fields <= {"text", "date"} and "text" in fields:
        return "lamp7"
    return None


def _resolve(path: Path) -> tuple[str, Path]:
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        found = sorted(path.glob("*_questions.json"))
        if len(found) == 1:
            return "lamp", found[0]
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise DataError(f"{path}: several question files ({names}); pass one of them")
        for name in ("users.jsonl", "users.json"):
            if (path / name).exists():
                return _resolve(path / name)
        listing = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
        raise DataError(f"{path}: no users.jsonl or *_questions.json here (found: {listing})")
    if path.suffix == ".jsonl":
        return "jsonl", path
    if path.name.endswith("_outputs.json"):
        q = path.with_name(path.name.replace("_outputs.json", "_questions.json"))
        if not q.exists():
            raise DataError(f"{path}: golds without questions: {q.name} is missing")
        return "lamp", q
    return "json", path


def load_dataset(path: str | Path, task: str | None = None, persons: str | Path | None = None) -> Dataset:
    """Read users from ``path`` (any supported layout) and validate them for the task.

    Persons: a ``persons`` file (JSON {user id: person}) sets them for every layout;
    otherwise the LaMP layouts (official and processed) infer them from profile overlap
    (``mta.data.persons``) and canonical JSONL keeps its ``person`` fields."""
    path = Path(path)
    layout, file = _resolve(path)
    synthetic = False
    declared = None
    if layout == "jsonl":
        users, declared, synthetic = read_jsonl(file)
    elif layout == "lamp":
        users, declared = read_lamp(file)
    else:
        data = _load_json(file)
        if isinstance(data, list) and data and isinstance(data[0], dict) and "user_id" in data[0]:
            layout, users = "processed", read_processed(file, data)
        elif isinstance(data, list) and data and isinstance(data[0], dict) and "input" in data[0]:
            layout = "lamp"
            users, declared = read_lamp(file)
        elif isinstance(data, list) and not data:
            raise DataError(f"{file}: the file holds no users")
        else:
            raise DataError(
                f"{file}: unknown layout; expected official LaMP questions, the processed "
                "per-user list, or canonical JSONL"
            )
    if not users:
        raise DataError(f"{file}: the file holds no users")
    if task and declared and get_task(task).name != get_task(declared).name:
        raise DataError(f"{file} declares task {declared}, not {task}; give data of task {task} (a bank "
                        "answers the task it was built for)")
    name = task or declared or detect_task(users)
    if name is None:
        raise DataError(f"{file}: cannot tell the task from the fields; pass --task")
    t = get_task(name)
    validate_users(file, users, t)
    if persons is not None:
        users = with_persons(users, read_persons(Path(persons), users))
    elif layout in ("lamp", "processed"):
        users = with_persons(users, infer_persons(users))
    return Dataset(users=users, task=t.name, layout=layout, path=file, synthetic=synthetic)


def validate_users(path: Path, users: list[User], task: Task) -> None:
    seen: set[str] = set()
    for i, u in enumerate(users):
        where = f"{path}: record {i} (user {u.user_id})"
        if u.user_id in seen:
            raise DataError(f"{where}: duplicate user id '{u.user_id}'")
        seen.add(u.user_id)
        if not u.history:
            raise DataError(f"{where}: history is empty; every user needs at least 1 item")
        item_ids: set[str] = set()
        for j, item in enumerate(u.history):
            problem = task.check_item(item)
            if problem:
                raise DataError(f"{where}: history item {j} {problem}")
            if item.id in item_ids:
                raise DataError(f"{where}: history item {j}: duplicate item id '{item.id}'")
            item_ids.add(item.id)
        qids: set[str] = set()
        for j, q in enumerate(u.queries):
            if q.id in qids:
                raise DataError(f"{where}: query {j}: duplicate query id '{q.id}'")
            qids.add(q.id)
            if q.gold is not None and task.kind == "classification":
                if q.gold.strip() not in task.labels:
                    raise DataError(
                        f"{where}: query {j}: gold {q.gold!r} is not one of the task's labels"
                    )
            if q.gold is not None and task.kind == "rating":
                try:
                    float(q.gold)
                except ValueError:
                    raise DataError(f"{where}: query {j}: gold {q.gold!r} is not a number") from None


def write_jsonl(users: list[User], dest: Path) -> None:
    """Write users in the canonical layout, atomically."""
    from mta.paths import atomic_path, check_file_dest

    with atomic_path(check_file_dest(dest)) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for u in users:
            fh.write(json.dumps(u.model_dump(exclude_none=True), ensure_ascii=False) + "\n")


__all__ = ["HistoryItem", "Query", "User", "load_dataset", "write_jsonl", "detect_task"]
