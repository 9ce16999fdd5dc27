"""``mta bank build``, ``mta adapt``, ``mta store``, ``mta generate``, ``mta export``,
``mta run`` and ``mta demo``: the three stages and their use, from the CLI."""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import time
from pathlib import Path

import torch
import typer
from rich.markup import escape
from rich.table import Table

from mta import __version__
from mta.cli.common import console, err_console, progress
from mta.config import BankConfig, adapt_config
from mta.data.readers import load_dataset
from mta.data.schema import User
from mta.engine.peft_io import export_user
from mta.errors import MtaError
from mta.models import load_embedder, load_llm
from mta.paths import write_json_atomic, write_text_atomic
from mta.store import UserStore
from mta.tasks import get_task

bank_app = typer.Typer(help="Stage 1: the meta-LoRA bank.", no_args_is_help=True)
store_app = typer.Typer(help="The per-user store: list and delete users.", no_args_is_help=True)

# fp32 is the default: on CPU, a bf16 training step through SmolLM2 ran 25.6x slower than fp32
# (benchmarks/cpu_train_step.py; docs/evaluation.md), although bf16 inference is faster.
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _models(model: str, embedder: str, dtype: str):
    if dtype not in DTYPES:
        raise MtaError(f"--dtype must be bf16 or fp32, got {dtype!r}")
    with err_console.status(f"loading {model} and {embedder}"):
        llm, tok = load_llm(model, dtype=DTYPES[dtype])
        emb = load_embedder(embedder)
    return llm, tok, emb


class _Bars:
    """Maps library progress callbacks (stage, done, total) onto rich bars."""

    def __init__(self, bar):
        self.bar, self.ids = bar, {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.ids:
            self.ids[stage] = self.bar.add_task(stage, total=total)
        self.bar.update(self.ids[stage], total=total, completed=done if stage in ("anchors", "users", "steps")
                        else self.bar.tasks[self.ids[stage]].completed + done)


@contextlib.contextmanager
def _run_log(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger("mta")
    root.addHandler(handler)
    old = root.level
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old)
        handler.close()


def _select(users: list[User], ids: str | None, ids_file: Path | None) -> list[User]:
    wanted: list[str] = []
    if ids:
        wanted += [x.strip() for x in ids.split(",") if x.strip()]
    if ids_file:
        if not ids_file.exists():
            raise MtaError(f"{ids_file}: no such file")
        wanted += [x.strip() for x in ids_file.read_text().splitlines() if x.strip()]
    if not wanted:
        return users
    by_id = {u.user_id: u for u in users}
    unknown = [w for w in wanted if w not in by_id]
    if unknown:
        raise MtaError(f"unknown user(s) {unknown[:5]} (the data has {len(users)} users, e.g. "
                       f"{', '.join(list(by_id)[:3])})")
    return [by_id[w] for w in wanted]


@bank_app.command("build")
def bank_build(
    data: Path = typer.Option(..., help="Users to choose anchors from (any supported layout)."),
    out: Path = typer.Option(..., help="Bank directory (resumes when it exists with the same settings)."),
    task: str | None = typer.Option(None, help="Task name (default: detected)."),
    model: str = typer.Option("smollm2-135m", help="Registry LLM or local HF directory."),
    embedder: str = typer.Option("minilm-l6", help="Registry embedder or local sentence-transformers dir."),
    anchors: int = typer.Option(50, help="Anchors (k-means clusters)."),
    min_history: int = typer.Option(11, help="History items an anchor needs (reference: more than 10)."),
    rank: int = typer.Option(8, help="Meta-LoRA rank."),
    epochs: int | None = typer.Option(None, min=1, help="Meta-LoRA epochs (default: docs/defaults.md)."),
    lr: float | None = typer.Option(None, help="Meta-LoRA learning rate, cosine with 10% warm-up "
                                    "(default: docs/defaults.md)."),
    max_items: int | None = typer.Option(None, min=1, help="Anchors train on their latest N history items "
                                         "(default: all)."),
    batch_size: int = typer.Option(8, help="Examples per anchor per step."),
    group_size: int = typer.Option(8, help="Anchors trained together in one pass."),
    users: Path | None = typer.Option(None, help="File of user ids (one per line) to draw anchors from."),
    seed: int = typer.Option(0, help="Seed for k-means, init and shuffling."),
    dtype: str = typer.Option("fp32", help="Base model dtype: fp32, or bf16 (slow backward on CPU)."),
) -> None:
    """Stage 1: cluster users, pick anchors, train one meta-LoRA per anchor (one pass per group)."""
    cfg = BankConfig.make(anchors=anchors, min_history=min_history, rank=rank, epochs=epochs, lr=lr,
                          batch_size=batch_size, group_size=group_size, seed=seed, max_items=max_items)
    ds = load_dataset(data, task)
    pool = _select(ds.users, None, users)
    llm, tok, emb = _models(model, embedder, dtype)
    with _run_log(out), progress() as bar:
        idx = _build(pool, ds, llm, tok, emb, model, embedder, cfg, out, _Bars(bar))
    for n in idx.data.get("notes", []):
        err_console.print(f"[yellow]notice:[/yellow] {escape(n)}")
    console.print(f"bank with {len(idx.anchor_ids)} anchors in {out}")


def _build(pool, ds, llm, tok, emb, model, embedder, cfg, out, bars):
    from mta.bank import build_bank

    return build_bank(pool, get_task(ds.task), llm, tok, emb, embedder, model, cfg, out, bars)


@store_app.command("list")
def store_list(store: Path = typer.Argument(..., help="A user store directory.")) -> None:
    """Show stored users, their anchors and bytes per user."""
    st = UserStore(store)
    ids = st.user_ids()
    if not ids:
        raise MtaError(f"{store}: no users stored here")
    table = Table(title=f"{escape(str(store))}: {len(ids)} users")
    for col in ("user", "anchors (weight)", "merge", "stack rank", "bytes"):
        table.add_column(col)
    total = 0
    for u in ids:
        m = st.meta(u)
        b = st.bytes_of(u)
        total += b
        mix = ", ".join(f"{a} ({w:.2f})" for a, w in zip(m["anchor_users"], m["weights"]))
        table.add_row(escape(u), escape(mix), m["merge"], str(m["stack"]["rank"]) if m.get("stack") else "-",
                      f"{b:,}")
    console.print(table)
    console.print(f"{total / len(ids):,.0f} bytes per user on average")


@store_app.command("delete")
def store_delete(store: Path = typer.Argument(...), user: str = typer.Argument(...)) -> None:
    """Remove everything stored for one user."""
    UserStore(store).delete(user)
    console.print(f"deleted user {escape(user)} from {escape(str(store))}")


def adapt_cmd(
    bank: Path = typer.Option(..., help="A built bank directory."),
    data: Path = typer.Option(..., help="Target users' data."),
    out: Path = typer.Option(..., help="User store directory."),
    task: str | None = typer.Option(None, help="Task name (default: detected)."),
    users: str | None = typer.Option(None, help="Comma-separated user ids (default: all)."),
    preset: str = typer.Option("default", help="default, or reference (the authors' settings)."),
    top_k: int | None = typer.Option(None, help="Anchors mixed per user."),
    merge: str | None = typer.Option(None, help="delta (exact), factor (reference) or svd."),
    weighting: str | None = typer.Option(None, help="linear (similarity-proportional) or softmax."),
    stack_rank: int | None = typer.Option(None, help="Rank of the stacked adapter."),
    stack_layers: int | None = typer.Option(None, min=0, help="Stack only in the last N transformer blocks "
                                            "(0 = all; default: docs/defaults.md)."),
    stack_epochs: int | None = typer.Option(None, help="Epochs of stacking (0 = fusion only)."),
    stack_lr: float | None = typer.Option(None, help="Learning rate of stacking."),
    seed: int | None = typer.Option(None, help="Seed."),
    model: str = typer.Option("smollm2-135m", help="The bank's base model."),
    embedder: str = typer.Option("minilm-l6", help="The bank's embedder."),
    dtype: str = typer.Option("fp32", help="fp32, or bf16 (fast for inference, very slow backward on CPU)."),
) -> None:
    """Stages 2+3: fuse each user's nearest anchors and train their stacked adapter."""
    from mta.stacking import adapt_users

    cfg = adapt_config(preset, top_k=top_k, merge=merge, weighting=weighting, stack_rank=stack_rank,
                       stack_layers=stack_layers,
                       stack_epochs=stack_epochs, stack_lr=stack_lr, seed=seed)
    ds = load_dataset(data, task)
    sel = _select(ds.users, users, None)
    llm, tok, emb = _models(model, embedder, dtype)
    with _run_log(out), progress() as bar:
        stats = adapt_users(llm, tok, emb, embedder, bank, sel, get_task(ds.task), cfg, UserStore(out),
                            _Bars(bar))
    write_json_atomic(out / "adapt_config.json", json.loads(cfg.model_dump_json()))
    b = list(stats["bytes_per_user"].values())
    console.print(f"adapted {stats['adapted']} user(s), {stats['skipped']} unchanged; "
                  f"{stats['trainable_params_per_user']:,} trainable parameters and "
                  f"{sum(b) / max(1, len(b)):,.0f} bytes per user; {stats['seconds_per_user']:.2f} s per user")


def generate_cmd(
    bank: Path = typer.Option(..., help="A built bank directory."),
    store: Path | None = typer.Option(None, help="User store (users not in it get fusion only)."),
    data: Path | None = typer.Option(None, help="Users' data, for their history (retrieval, fusion)."),
    user: str | None = typer.Option(None, help="User id."),
    input: str | None = typer.Option(None, "--input", help="The query text."),
    input_file: Path | None = typer.Option(None, help="JSONL of {user_id, input} pairs, batched."),
    task: str | None = typer.Option(None, help="Task (default: the bank's)."),
    retrieve_k: int = typer.Option(1, min=0, help="BM25 history items in the prompt (0 disables)."),
    max_new_tokens: int = typer.Option(24, min=1),
    batch_size: int = typer.Option(8, min=1),
    model: str = typer.Option("smollm2-135m"),
    embedder: str = typer.Option("minilm-l6"),
    dtype: str = typer.Option("fp32", help="fp32 or bf16."),
) -> None:
    """Personalised answers; one --user/--input, or many users batched from --input-file."""
    from mta.bank import read_index
    from mta.personalize import Personalizer, Request

    if (input_file is None) == (input is None):
        raise MtaError("give either --input (with --user) or --input-file")
    pairs: list[tuple[str, str]] = []
    if input is not None:
        if not user:
            raise MtaError("--input needs --user")
        pairs = [(user, input)]
    else:
        if not input_file.exists():
            raise MtaError(f"{input_file}: no such file")
        for n, line in enumerate(input_file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                pairs.append((str(rec["user_id"]), str(rec["input"])))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise MtaError(f"{input_file}: line {n}: expected {{\"user_id\": ..., \"input\": ...}}") from None
    idx = read_index(bank)
    t = get_task(task or idx.data["task"])
    users = {u.user_id: u for u in load_dataset(data, t.name).users} if data else {}
    llm, tok, emb = _models(model, embedder, dtype)
    pz = Personalizer(llm, tok, emb, embedder, bank, t, store)
    try:
        answers = pz.answer([Request(u, i, users.get(u)) for u, i in pairs], retrieve_k, max_new_tokens,
                            batch_size)
    finally:
        pz.close()
    for a in answers:
        if a.notice:
            err_console.print(f"[yellow]notice:[/yellow] {escape(a.notice)}")
        console.print_json(json.dumps({"user_id": a.user_id, "route": a.route, "output": a.output,
                                       "parsed": a.parsed}))


def export_cmd(
    bank: Path = typer.Option(..., help="A built bank directory."),
    store: Path = typer.Option(..., help="The user store."),
    user: str = typer.Option(..., help="User id to export."),
    out: Path = typer.Option(..., help="Output PEFT adapter directory."),
    pad_rank: str | None = typer.Option(None, help="Zero-pad the rank: an integer, or 'serving' for the "
                                        "next rank vLLM accepts (1, 8, 16, 32, 64, ...)."),
    model: str = typer.Option("smollm2-135m"),
    dtype: str = typer.Option("fp32", help="fp32 keeps the exported factors exact."),
) -> None:
    """Write one ordinary PEFT LoRA equal to the user's fused + stacked adapter."""
    from mta.bank import load_bank
    from mta.engine.peft_io import load_adapter

    st = UserStore(store)
    meta = st.meta(user)
    if pad_rank is not None and pad_rank != "serving" and not pad_rank.isdigit():
        raise MtaError(f"--pad-rank must be an integer or 'serving', got {pad_rank!r}")
    llm, _ = load_llm(model, dtype=DTYPES.get(dtype, torch.float32))
    engine, idx = load_bank(llm, bank)
    try:
        slot = None
        if meta.get("stack"):
            engine.add_users(1, meta["stack"]["rank"], meta["stack"]["alpha"], modules=meta["stack"].get("targets"),
                             last_layers=meta["stack"].get("layers"))
            tensors, _, _ = load_adapter(st.user_dir(user) / "stack", idx.data["fingerprint"])
            engine.load_user(0, tensors)
            slot = 0
        export_user(engine, meta["anchors"], meta["weights"], out, mode=meta["merge"], user=slot,
                    svd_rank=meta.get("svd_rank"), pad_to=int(pad_rank) if pad_rank and pad_rank.isdigit()
                    else pad_rank, base_model=idx.data["model"])
    finally:
        engine.remove()
    cfg = json.loads((out / "adapter_config.json").read_text())
    console.print(f"exported {escape(user)} as a rank-{cfg['r']} PEFT LoRA to {escape(str(out))}")


def run_cmd(
    data: Path = typer.Option(..., help="Dataset (any supported layout)."),
    out: Path = typer.Option(..., help="Run directory."),
    task: str | None = typer.Option(None, help="Task (default: detected)."),
    anchors: int = typer.Option(8, help="Anchors in the bank."),
    targets_fraction: float = typer.Option(0.5, help="Share of users held out as targets."),
    min_history: int = typer.Option(11, help="History items an anchor needs."),
    bank_epochs: int | None = typer.Option(None, min=1, help="Meta-LoRA epochs (default: docs/defaults.md)."),
    bank_lr: float | None = typer.Option(None, help="Meta-LoRA learning rate (default: docs/defaults.md)."),
    preset: str = typer.Option("default", help="default or reference."),
    merge: str | None = typer.Option(None, help="delta, factor or svd."),
    top_k: int | None = typer.Option(None, help="Anchors mixed per user."),
    stack_rank: int | None = typer.Option(None),
    stack_epochs: int | None = typer.Option(None),
    stack_lr: float | None = typer.Option(None),
    seed: int = typer.Option(0),
    model: str = typer.Option("smollm2-135m"),
    embedder: str = typer.Option("minilm-l6"),
    dtype: str = typer.Option("fp32", help="fp32 or bf16."),
    max_new_tokens: int = typer.Option(12, min=1),
) -> None:
    """The whole method: split users, build the bank, adapt targets, score base vs RAG vs MTA."""
    _run(data, out, task, anchors, targets_fraction, min_history, bank_epochs, bank_lr, preset, merge, top_k,
         stack_rank, stack_epochs, stack_lr, seed, model, embedder, dtype, max_new_tokens)


def demo_cmd(
    out: Path = typer.Option(Path("runs/demo"), help="Directory for the synthetic data and the run."),
    users: int = typer.Option(24, min=4, help="Synthetic users (half become held-out targets)."),
    seed: int = typer.Option(0),
    model: str = typer.Option("smollm2-135m"),
    embedder: str = typer.Option("minilm-l6"),
) -> None:
    """`mta run` on built-in SYNTHETIC data (4 taste groups) with the default models."""
    from mta.data.readers import write_jsonl
    from mta.data.synth import synth_users

    write_jsonl(synth_users(users, seed=seed, queries=2), out / "data" / "users.jsonl")
    console.print(f"wrote {users} synthetic users to {escape(str(out / 'data'))}")
    _run(out / "data", out / "run", None, anchors=4, targets_fraction=0.5, min_history=11, bank_epochs=None,
         bank_lr=None, preset="default", merge=None, top_k=None, stack_rank=None, stack_epochs=None,
         stack_lr=None, seed=seed, model=model, embedder=embedder, dtype="fp32", max_new_tokens=8)


def _run(data, out, task, anchors, targets_fraction, min_history, bank_epochs, bank_lr, preset, merge, top_k,
         stack_rank, stack_epochs, stack_lr, seed, model, embedder, dtype, max_new_tokens) -> None:
    from mta.pipeline import run_pipeline

    bank_cfg = BankConfig.make(anchors=anchors, min_history=min_history, epochs=bank_epochs, lr=bank_lr,
                               seed=seed)
    adapt_cfg = adapt_config(preset, merge=merge, top_k=top_k, stack_rank=stack_rank,
                             stack_epochs=stack_epochs, stack_lr=stack_lr, seed=seed)
    ds = load_dataset(data, task)
    t = get_task(ds.task)
    llm, tok, emb = _models(model, embedder, dtype)
    config = {"data": str(ds.path), "synthetic": ds.synthetic, "task": t.name, "model": model,
              "embedder": embedder, "dtype": dtype, "targets_fraction": targets_fraction, "seed": seed,
              "preset": preset, "bank": json.loads(bank_cfg.model_dump_json()),
              "adapt": json.loads(adapt_cfg.model_dump_json()), "mta_version": __version__,
              "torch": torch.__version__, "python": platform.python_version()}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", config)
    t0 = time.perf_counter()
    with _run_log(out), progress() as bar:
        res = run_pipeline(ds, out, llm, tok, emb, model, embedder, bank_cfg, adapt_cfg, targets_fraction,
                           seed, max_new_tokens=max_new_tokens, progress=_Bars(bar))
    res["summary"]["wall_seconds"] = time.perf_counter() - t0
    tag = "synthetic " if ds.synthetic else ""
    title = (f"mta run: {t.title}, {res['summary']['targets']} held-out {tag}target users, "
             f"{res['summary']['anchors']} anchors, model {model}, seed {seed}")
    write_json_atomic(out / "metrics.json", {"title": title, "synthetic": ds.synthetic,
                                             "results": res["results"]})
    write_json_atomic(out / "summary.json", res["summary"])
    write_text_atomic(out / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in res["predictions"]))
    m1, m2 = t.metric_names
    md = [f"# {title}", "", f"| method | {m1} | {m2} | queries |", "|---|---|---|---|"]
    table = Table(title=escape(title))
    for col in ("method", m1, m2, "queries", "s/user (inference)"):
        table.add_column(col)
    for r in res["results"]:
        mm = r["metrics"]
        md.append(f"| {r['method']} | {mm[m1]:.4f} | {mm[m2]:.4f} | {r['scored']} |")
        table.add_row(r["method"], f"{mm[m1]:.3f}", f"{mm[m2]:.3f}", str(r["scored"]),
                      f"{r['seconds_per_user_inference']:.2f}")
    s = res["summary"]
    md += ["", f"bank {s['bank_seconds']:.0f} s, adaptation {s['adapt_seconds']:.0f} s "
           f"({s['adapt_seconds_per_user']:.2f} s/user), inference {s['inference_seconds']:.0f} s; "
           f"{s['trainable_params_per_user']:,} trainable parameters and {s['bytes_per_user_mean']:,.0f} "
           "bytes stored per user"]
    write_text_atomic(out / "results.md", "\n".join(md) + "\n")
    for n in s["anchor_notes"]:
        err_console.print(f"[yellow]notice:[/yellow] {escape(n)}")
    console.print(table)
    console.print(md[-1])
    console.print(f"wrote {escape(str(out))}/metrics.json, results.md, summary.json, run.log")
