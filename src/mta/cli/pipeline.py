"""``mta bank build``, ``mta adapt``, ``mta store``, ``mta generate`` and ``mta export``:
the three stages and their use, from the CLI. Each command loads one backbone and, where
it needs one, opens the bank on it once."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from mta.backbone import DEFAULT_MODEL
from mta.bank import build_bank, check_out, check_resume, read_index
from mta.cli.common import Bars, console, err_console, progress, run_log, with_recipes
from mta.cli.loading import load_backbone, write_config
from mta.cli.options import (
    BankPath,
    Configs,
    DataPath,
    OptionalData,
    OutDir,
    RecipeFile,
    StorePath,
    TaskName,
    UserIds,
    configured,
)
from mta.config import AdaptConfig, BackboneConfig, BankConfig, GenerateConfig
from mta.data.readers import jsonl_lines, load_dataset
from mta.data.schema import User
from mta.distributed import ray_adapt, ray_build_bank
from mta.engine.peft_io import is_export, is_vllm_export
from mta.errors import MtaError
from mta.loaded_bank import LoadedBank, Request
from mta.store import UserStore
from mta.tasks import get_task

bank_app = typer.Typer(help="Stage 1: the meta-LoRA bank.", no_args_is_help=True)
store_app = typer.Typer(help="The per-user store: list and delete users.", no_args_is_help=True)


def select_users(users: list[User], spec: str | None) -> list[User]:
    """The users named by ``spec`` ("a,b,c" or "@FILE", one id per line); all when None."""
    if not spec:
        return users
    if spec.startswith("@"):
        path = Path(spec[1:])
        if not path.is_file():
            raise MtaError(f"{path}: no such file of user ids")
        wanted = [x.strip() for x in jsonl_lines(_text(path)) if x.strip()]
    else:
        wanted = [x.strip() for x in spec.split(",") if x.strip()]
    by_id = {u.user_id: u for u in users}
    unknown = [w for w in wanted if w not in by_id]
    if unknown:
        raise MtaError(f"unknown user(s) {unknown[:5]} (the data has {len(users)} users, e.g. "
                       f"{', '.join(list(by_id)[:3])})")
    if not wanted:
        raise MtaError("the list of user ids is empty")
    return [by_id[w] for w in dict.fromkeys(wanted)]


def _bank_record(bank: Path):
    return read_index(bank)


@bank_app.command("build")
@configured(BackboneConfig, BankConfig)
def bank_build(data: DataPath, out: OutDir, task: TaskName = None, users: UserIds = None,
               recipe: RecipeFile = None,
               ray: str | None = typer.Option(None, "--ray", help="Train the anchor groups on Ray: 'local' or the "
                                              "address of a running cluster (docs/scale.md)."),
               ray_workers: int | None = typer.Option(None, min=1, help="Ray workers (default: one per GPU, or per "
                                                      "CPU when there is no GPU)."),
               *, cfg: Configs) -> None:
    """Stage 1: cluster users, pick anchors, train one meta-LoRA per anchor (one pass per group)."""
    check_out(out)
    ds = load_dataset(data, task)
    pool = select_users(ds.users, users)
    cfg, adapt_recipe = with_recipes(cfg, recipe, cfg.backbone.model or DEFAULT_MODEL, task=ds.task)
    if ray is not None:
        with run_log(out), progress() as bar:
            rec = ray_build_bank(ray, cfg.backbone, pool, ds.task, cfg.bank, out, ray_workers, Bars(bar),
                                 adapt_recipe)
            write_config(out, "bank build", cfg, None, data=str(ds.path), task=ds.task, ray=ray)
        console.print(f"bank with {len(rec.anchors)} anchors in {escape(str(out))} (trained on Ray)")
        return
    backbone = load_backbone(cfg.backbone)
    check_resume(out, backbone, get_task(ds.task), cfg.bank, pool)
    with run_log(out), progress() as bar:
        write_config(out, "bank build", cfg, backbone, data=str(ds.path), task=ds.task)
        rec = build_bank(backbone, pool, get_task(ds.task), cfg.bank, out, Bars(bar), recipe=adapt_recipe)
    for n in rec.notes:
        err_console.print(f"[yellow]notice:[/yellow] {escape(n)}")
    console.print(f"bank with {len(rec.anchors)} anchors in {escape(str(out))}")


@store_app.command("list")
def store_list(store: Path = typer.Argument(..., help="A user store directory.")) -> None:
    """Show stored users, their anchors and bytes per user; unreadable users as corrupt."""
    st = UserStore(store)
    entries = st.entries()
    if not entries:
        raise MtaError(f"{store}: no users stored here")
    good = [e for e in entries if e.record]
    table = Table(title=f"{escape(str(store))}: {len(good)} users" + (f", {len(entries) - len(good)} corrupt"
                                                                       if len(good) < len(entries) else ""))
    for col in ("user", "anchors (weight)", "merge", "stack rank", "stack steps", "bytes"):
        table.add_column(col)
    total = 0
    for e in entries:
        b = st.bytes_of(e.record.user_id) if e.record else 0
        total += b
        if e.record is None:
            table.add_row(f"[red]corrupt[/red] users/{e.key}", escape(e.problem or ""), "-", "-", "-", "-")
            continue
        m = e.record
        mix = ", ".join(f"{a} ({w:.2f})" for a, w in zip(m.anchor_users, m.weights))
        table.add_row(escape(repr(m.user_id)[1:-1]), escape(mix) or "-", m.merge,
                      str(m.stack.rank) if m.stack else "-", _stack_steps(m.stack), f"{b:,}")
    console.print(table)
    if good:
        console.print(f"{total / len(good):,.0f} bytes per user on average")


def _stack_steps(stack) -> str:
    """The stack's optimiser steps; with early stopping, the step kept of them (refit: the
    steps chosen on the held-out item, then trained again on every item)."""
    if stack is None:
        return "-"
    if stack.refit:
        return f"refit, {stack.kept_steps}"
    return f"kept {stack.kept_steps} of {len(stack.losses)}" if stack.stopped_at is not None else str(stack.kept_steps)


@store_app.command("delete")
def store_delete(store: Path = typer.Argument(...), user: str = typer.Argument(...)) -> None:
    """Remove everything stored for one user."""
    st = UserStore(store)
    with st.writing():
        st.delete(user)
    console.print(f"deleted user {escape(user)} from {escape(str(store))}")


def _open_bank(bank: Path, cfg: Configs, task: str | None = None):
    """Load the backbone the bank was built on (unless told otherwise) and open the bank on it."""
    rec = _bank_record(bank)
    backbone = load_backbone(cfg.backbone, rec.model, rec.embedder)
    return backbone, LoadedBank(backbone, bank, get_task(task) if task else None)


@configured(BackboneConfig, AdaptConfig)
def adapt_cmd(bank: BankPath, data: DataPath, out: OutDir, task: TaskName = None, users: UserIds = None,
              recipe: RecipeFile = None,
              ray: str | None = typer.Option(None, "--ray", help="Shard over Ray: 'local' (a local instance) or "
                                             "the address of a running cluster (docs/scale.md)."),
              ray_workers: int | None = typer.Option(None, min=1, help="Ray workers (default: one per GPU, or per "
                                                     "CPU when there is no GPU)."),
              force: bool = typer.Option(False, "--force", help="Adapt every user again, even those stored with "
                                         "the same history and settings (damaged users are adapted again anyway)."),
              *, cfg: Configs) -> None:
    """Stages 2+3: fuse each user's nearest anchors and train their stacked adapter."""
    rec = _bank_record(bank)
    cfg, _ = with_recipes(cfg, recipe, cfg.backbone.model or rec.model, rec)
    ds = load_dataset(data, task or rec.task)
    sel = select_users(ds.users, users)
    store = UserStore(out, create=True)  # before anything is written: refuse a directory that is not a store
    if ray is not None:
        _adapt_on_ray(ray, ray_workers, bank, rec, ds, sel, store, out, cfg, force)
        return
    backbone, loaded = _open_bank(bank, cfg, ds.task)
    loaded.check(sel, cfg.adapt)
    with run_log(out), progress() as bar:
        write_config(out, "adapt", cfg, backbone, bank=str(bank), data=str(ds.path), task=ds.task)
        stats = loaded.adapt(sel, cfg.adapt, store, Bars(bar), force=force)
    b = list(stats["bytes_per_user"].values())
    console.print(f"adapted {stats['adapted']} user(s), {stats['skipped']} unchanged; "
                  f"{stats['trainable_params_per_user']:,} trainable parameters and "
                  f"{sum(b) / max(1, len(b)):,.0f} bytes per user; {stats['seconds_per_user']:.2f} s per user")


def _adapt_on_ray(address, workers, bank, rec, ds, sel, store, out, cfg, force: bool = False) -> None:
    if not rec.complete:
        raise MtaError(f"bank {bank} is incomplete; rerun the same bank build to resume it")
    if rec.task != ds.task:
        raise MtaError(f"bank {bank} was built for task {rec.task}, not {ds.task}")
    if rec.kind == "bank" and cfg.adapt.top_k > len(rec.anchors):
        raise MtaError(f"top_k {cfg.adapt.top_k} is more than the {len(rec.anchors)} anchors of bank {bank}",
                       ("AdaptConfig.top_k",))
    if any(not u.history for u in sel):
        raise MtaError("every user needs at least 1 history item")
    with run_log(out), progress() as bar:
        write_config(out, "adapt", cfg, None, bank=str(bank), data=str(ds.path), task=ds.task, ray=address)
        stats = ray_adapt(address, cfg.backbone, bank, sel, cfg.adapt, store, workers, Bars(bar), force=force)
    console.print(f"adapted {stats['adapted']} user(s) in {stats['shards']} shard(s) on {stats['workers']} Ray "
                  f"worker(s), {stats['skipped']} unchanged")


def _requests(user: str | None, input: str | None, input_file: Path | None) -> list[tuple[str, str]]:
    if (input_file is None) == (input is None):
        raise MtaError("give either --input (with --user) or --input-file")
    if input is not None:
        if not user:
            raise MtaError("--input needs --user")
        if not input.strip():
            raise MtaError("--input is empty")
        return [(user, input)]
    if not input_file.is_file():
        raise MtaError(f"{input_file}: no such file" + (" (it is a directory)" if input_file.is_dir() else ""))
    pairs = []
    for n, line in enumerate(jsonl_lines(_text(input_file)), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            pairs.append((str(rec["user_id"]), str(rec["input"])))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise MtaError(f"{input_file}: line {n}: expected {{\"user_id\": ..., \"input\": ...}}") from None
        if not pairs[-1][1].strip():
            raise MtaError(f"{input_file}: line {n}: the input is empty")
    if not pairs:
        raise MtaError(f"{input_file}: no requests in the file")
    return pairs


def _text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise MtaError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


@configured(BackboneConfig, GenerateConfig)
def generate_cmd(
    bank: BankPath,
    store: Path | None = typer.Option(None, help="User store (users not in it get fusion only)."),
    data: OptionalData = None,
    user: str | None = typer.Option(None, help="User id."),
    input: str | None = typer.Option(None, "--input", help="The query text."),
    input_file: Path | None = typer.Option(None, help="JSONL of {user_id, input} pairs, batched."),
    *, cfg: Configs,
) -> None:
    """Personalised answers; one --user/--input, or many users batched from --input-file.
    Prints one JSON object per answer and line: user_id, route, output, parsed."""
    pairs = _requests(user, input, input_file)
    rec = _bank_record(bank)
    users = {u.user_id: u for u in load_dataset(data, rec.task).users} if data else {}
    st = UserStore(store) if store else None  # a mistyped store is an error, not an empty store
    backbone, loaded = _open_bank(bank, cfg)
    gen = cfg.generate
    if gen.max_new_tokens is None and users:
        gen = gen.model_copy(update={"max_new_tokens": loaded.task.answer_tokens(backbone.tokenizer, users.values())})
    answers = loaded.answer([Request(u, i, users.get(u)) for u, i in pairs], gen, st)
    for a in answers:
        if a.notice:
            err_console.print(f"[yellow]notice:[/yellow] {escape(a.notice)}")
        # one JSON object per line (JSONL), for pipes
        print(json.dumps({"user_id": a.user_id, "route": a.route, "output": a.output, "parsed": a.parsed},
                         ensure_ascii=False), flush=True)


@configured(BackboneConfig)
def export_cmd(
    bank: BankPath, store: StorePath,
    user: str | None = typer.Option(None, help="User id to export (or --all)."),
    all_users: bool = typer.Option(False, "--all", help="Export every stored user."),
    out: Path = typer.Option(..., help="Output: a PEFT adapter directory (one user), or a directory of "
                             "adapters and a manifest (--all)."),
    fmt: str = typer.Option("peft", "--format", help="peft (one user), or vllm (with --all: laid out for "
                            "vLLM's runtime adapter loading; docs/scale.md)."),
    served_model: str | None = typer.Option(None, help="vllm: the base model's name as vLLM serves it "
                                            "(adapters name it; default: the bank's model)."),
    pad_rank: str | None = typer.Option(None, help="Zero-pad the rank: an integer, or 'serving' for the "
                                        "next rank vLLM accepts (1, 8, 16, 32, 64, ...); vllm: always 'serving'."),
    *, cfg: Configs,
) -> None:
    """Write a user's fused + stacked adapter as ONE ordinary PEFT LoRA (fp32 factors), or
    every user's, for vLLM."""
    if fmt not in ("peft", "vllm"):
        raise MtaError(f"--format must be peft or vllm, got {fmt!r}")
    if (user is None) == (not all_users):
        raise MtaError("give either --user or --all")
    if fmt == "vllm" and not all_users:
        raise MtaError("--format vllm exports every user: add --all")
    if pad_rank is not None and pad_rank != "serving" and not pad_rank.isdigit():
        raise MtaError(f"--pad-rank must be an integer or 'serving', got {pad_rank!r}")
    st = UserStore(store)
    if all_users:
        if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or is_vllm_export(out))):
            raise MtaError(f"{out} exists and is not an export `mta export --all` wrote (or holds more than its "
                           "adapters and manifest); refusing to replace it: give a new path")
        rec = _bank_record(bank)
        _, loaded = _open_bank(bank, cfg)
        with progress() as bar:
            manifest = loaded.export_vllm(st, out, served_model or rec.model, Bars(bar))
        console.print(f"exported {len(manifest['users'])} users for vLLM to {escape(str(out))} (max rank "
                      f"{manifest['max_lora_rank']}; manifest.json)")
        return
    if out.exists() and not is_export(out):
        raise MtaError(f"{out} exists and is not an adapter `mta export` wrote; refusing to replace it: give a new "
                       "path")
    st.meta(user)  # an unknown user fails before the model loads
    _, loaded = _open_bank(bank, cfg)
    loaded.export(user, st, out, int(pad_rank) if pad_rank and pad_rank.isdigit() else pad_rank, served_model)
    r = json.loads((out / "adapter_config.json").read_text())["r"]
    console.print(f"exported {escape(user)} as a rank-{r} PEFT LoRA to {escape(str(out))}")
