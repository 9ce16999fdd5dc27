"""``mta data inspect|synth|movielens|fetch``."""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from mta.cli.common import Bars, console, progress
from mta.data.fetch import fetch_lamp
from mta.data.lastfm import lastfm_users
from mta.data.movielens import movielens_users
from mta.data.readers import load_dataset, write_jsonl
from mta.data.synth import synth_users
from mta.errors import MtaError
from mta.paths import write_json_atomic
from mta.tasks import get_task

app = typer.Typer(help="Per-user data: inspect, convert, synthesise, download.",
                  no_args_is_help=True)


def dataset_summary(path: Path, task: str | None = None) -> dict:
    ds = load_dataset(path, task)
    t = get_task(ds.task)
    counts = [len(u.history) for u in ds.users]
    labels: Counter[str] = Counter()
    for u in ds.users:
        for it in u.history:
            lab = t.item_label(it)
            if lab is not None:
                labels[lab] += 1
        for q in u.queries:
            if q.gold is not None and t.kind != "generation":
                labels[q.gold.strip()] += 1
    return {
        "path": str(ds.path), "layout": ds.layout, "synthetic": ds.synthetic,
        "task": t.name, "task_title": t.title, "task_kind": t.kind,
        "task_labels": len(t.labels), "users": len(ds.users), "persons": len({u.person_id for u in ds.users}),
        "history_items": sum(counts), "history_per_user": {
            "min": min(counts), "median": statistics.median(counts), "max": max(counts)},
        "queries": sum(len(u.queries) for u in ds.users),
        "queries_with_gold": sum(q.gold is not None for u in ds.users for q in u.queries),
        "label_distribution": dict(labels.most_common()),
    }


def new_users_file(out: Path) -> Path:
    """OUT/users.jsonl for a command that writes users: refused (before any work) when it
    is already there, so that no users file is ever replaced."""
    dest = out / "users.jsonl"
    if dest.exists():
        raise MtaError(f"{dest} already exists; choose another --out or remove it first")
    return dest


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="A data file or directory (layout is autodetected)."),
    task: str | None = typer.Option(None, help="Task name, when it cannot be detected."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the summary here."),
) -> None:
    """Summarise a dataset: users, history items per user, queries, task, labels."""
    s = dataset_summary(path, task)
    table = Table(title=escape(s["path"] + ("  (synthetic)" if s["synthetic"] else "")),
                  show_header=False)
    h = s["history_per_user"]
    rows = [
        ("layout", s["layout"]), ("task", f"{s['task_title']} [{s['task']}]"),
        ("labels", f"{s['task_labels']} in the task's label set" if s["task_labels"] else "-"),
        ("users", str(s["users"])), ("persons", f"{s['persons']} (splits and bootstraps draw persons)"),
        ("history items", str(s["history_items"])),
        ("history per user", f"min {h['min']} / median {h['median']} / max {h['max']}"),
        ("queries", f"{s['queries']} ({s['queries_with_gold']} with gold)"),
    ]
    if s["synthetic"]:
        rows.insert(0, ("data", "synthetic"))
    for k, v in rows:
        table.add_row(k, escape(v))
    console.print(table)
    if s["label_distribution"]:
        dist = Table(title="label distribution (history + gold)")
        dist.add_column("label")
        dist.add_column("count", justify="right")
        for lab, n in s["label_distribution"].items():
            dist.add_row(escape(lab), str(n))
        console.print(dist)
    if json_out:
        write_json_atomic(json_out, s)


@app.command()
def synth(
    out: Path = typer.Option(..., help="Output directory (users.jsonl is written there; it must not exist yet)."),
    users: int = typer.Option(48, min=1, help="Number of users."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same bytes."),
    history: int = typer.Option(10, min=1, help="History items per user."),
    queries: int = typer.Option(2, min=0, help="Queries per user."),
    groups: int = typer.Option(4, min=1, max=4, help="Latent taste groups."),
    noise: float = typer.Option(0.1, min=0.0, max=0.49, help="Chance a user deviates from "
                                "their group's choice on a history item."),
) -> None:
    """Write a deterministic SYNTHETIC tagging dataset whose users differ by taste group."""
    dest = new_users_file(out)
    us = synth_users(users, seed=seed, history=history, queries=queries, groups=groups,
                     noise=noise)
    write_jsonl(us, dest)
    console.print(f"wrote {len(us)} synthetic users ({groups} taste groups, seed {seed}) "
                  f"to {out / 'users.jsonl'}")


@app.command()
def movielens(
    ratings: Path = typer.Option(..., help="MovieLens ratings.csv."),
    movies: Path = typer.Option(..., help="MovieLens movies.csv."),
    out: Path = typer.Option(..., help="Output directory (users.jsonl is written there; it must not exist yet)."),
    queries: int = typer.Option(1, min=1, help="Latest ratings per user held out as queries."),
    max_users: int | None = typer.Option(None, min=1, help="Keep at most this many users."),
) -> None:
    """Convert MovieLens ratings into a LaMP-3-style per-user rating task."""
    dest = new_users_file(out)
    us = movielens_users(ratings, movies, queries=queries, max_users=max_users)
    write_jsonl(us, dest)
    n = sum(len(u.history) for u in us)
    console.print(f"wrote {len(us)} users, {n} history items, "
                  f"{sum(len(u.queries) for u in us)} queries to {out / 'users.jsonl'}")


@app.command()
def lastfm(
    dir: Path = typer.Option(..., "--dir", help="The hetrec2011-lastfm-2k directory (user_taggedartists.dat, "
                             "tags.dat, artists.dat)."),
    out: Path = typer.Option(..., help="Output directory (users.jsonl is written there; it must not exist yet)."),
    queries: int = typer.Option(3, min=1, help="Latest items per user (by date) held out as queries."),
    min_items: int = typer.Option(13, min=2, help="Leave out users with fewer items (13: 10 history items "
                                  "and 3 queries for a target)."),
    max_users: int | None = typer.Option(None, min=1, help="Keep at most this many users."),
) -> None:
    """Convert Last.fm artist tags into a LaMP-2-style per-user tagging task (15 tags)."""
    dest = new_users_file(out)
    us = lastfm_users(dir, queries=queries, min_items=min_items, max_users=max_users)
    write_jsonl(us, dest)
    n = [len(u.history) for u in us]
    console.print(f"wrote {len(us)} users, {sum(n)} history items ({sum(x >= 20 for x in n)} users with at least "
                  f"20), {sum(len(u.queries) for u in us)} queries to {escape(str(dest))}")


fetch_app = typer.Typer(help="Download public datasets.", no_args_is_help=True)
app.add_typer(fetch_app, name="fetch")


@fetch_app.command("lamp")
def fetch_lamp_cmd(
    task: int = typer.Option(..., help="LaMP task number: 1, 2, 3, 4, 5 or 7."),
    split: str = typer.Option(..., help="train or dev."),
    out: Path = typer.Option(..., help="Output directory."),
    split_kind: str = typer.Option("user", help="user-based or time-based split: user|time."),
    base_url: str | None = typer.Option(None, help="Mirror of the LaMP download root "
                                        "(default: $MTA_LAMP_URL, else the official host)."),
) -> None:
    """Download the official LaMP question and output files (resumable, atomic)."""
    with progress() as bar:
        bars = Bars(bar)
        paths = fetch_lamp(task, split, out, split_kind=split_kind, base=base_url,
                           progress=lambda name, done, total: bars(f"{name} bytes", done, total))
    for p in paths:
        console.print(f"ok {p}")


