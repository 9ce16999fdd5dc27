"""What every CLI command shares: consoles, progress bars, logging set-up."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mta import defaults
from mta.paths import log_to_file
from mta.recipes import read_recipe

console = Console()
err_console = Console(stderr=True)


def setup_logging(verbose: bool = False) -> None:
    level = logging.INFO if verbose else logging.WARNING
    handler = RichHandler(console=err_console, show_path=False)
    # the handler filters too: run directories raise the "mta" logger to INFO for run.log
    handler.setLevel(level)
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)
    for noisy in ("transformers", "sentence_transformers", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


QUIET = {"on": False}  # set by `mta --quiet`


def progress():
    """Rich bars on a terminal; elsewhere (logs, CI) a context yielding None, for which
    ``Bars`` prints plain lines (their heartbeats stop when it ends); nothing with --quiet."""
    if QUIET["on"]:
        return contextlib.nullcontext(None)
    if not err_console.is_terminal:
        return _plain()
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=False,
    )


@contextlib.contextmanager
def _plain():
    try:
        yield None
    finally:
        for bars in list(Bars.beating):
            bars.close()


class Bars:
    """Maps library progress callbacks (stage, done, total) onto rich bars, or onto plain
    lines ("fold 0 bank steps: 12/45 (27%), 30 s, about 80 s left") when there is no
    terminal: one when a stage starts, then every ``EVERY`` seconds, and at its end. Stages
    that report a running count ("anchors", "users", "steps", "trials") set the count; the
    others report increments (prompts answered).

    A plain line's estimate comes from the rate observed since the stage's first report
    (work done before it is not counted as if it took no time), and only once that rate
    rests on ``SETTLE`` seconds of progress; until then no estimate is printed."""

    ABSOLUTE = ("anchors", "users", "steps", "trials", "bytes", "embedded")
    EVERY = 10.0
    SETTLE = 5.0
    beating: set[Bars] = set()  # plain Bars whose heartbeat runs (``progress()``'s end stops them)

    def __init__(self, bar: Progress | None):
        self.bar, self.ids = bar, {}
        self.plain: dict[str, list] = {}  # stage -> [done, total, first report, last printed, done at first]
        self.current: str | None = None  # the stage reported last
        self.printed = 0.0  # when a line was printed last (the first report always prints)
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.heart: threading.Thread | None = None
        self._part = ""  # the stage names' prefix of the current part (``part``)

    def part(self, name: str):
        """Progress of one part of a longer job (a tune's trial): its stages reported as
        "NAME: stage"; the stages of the part before it are dropped (their bars leave the
        terminal), so a long job shows its own bars and its current part's."""
        with self.lock:
            for stage in [st for st in {*self.ids, *self.plain} if st.startswith(self._part)] if self._part else []:
                if stage in self.ids and self.bar is not None:
                    self.bar.remove_task(self.ids.pop(stage))
                self.plain.pop(stage, None)
                if self.current == stage:
                    self.current = None
            self._part = f"{name}: "
        prefix = self._part
        return lambda stage, done, total: self(prefix + stage, done, total)

    def close(self) -> None:
        """Stop the heartbeat (the command's work is over)."""
        self.stopped.set()
        Bars.beating.discard(self)

    def _beat(self) -> None:
        """Outside a terminal, a stage with no report for ``EVERY`` seconds (one long
        optimiser step, a long save) still gets a line every ``EVERY`` seconds: the work is
        alive, and how long it has taken."""
        while not self.stopped.wait(self.EVERY / 2):
            with self.lock:
                st = self.plain.get(self.current) if self.current else None
                if st is None or (st[1] and st[0] >= st[1]) or time.monotonic() - self.printed < self.EVERY:
                    continue
                self._print(self.current, st, time.monotonic(), " (working)")

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if QUIET["on"]:
            return
        absolute = stage.split(" ")[-1] in self.ABSOLUTE
        if self.bar is not None:
            if stage not in self.ids:
                self.ids[stage] = self.bar.add_task(stage, total=total)
            task = self.ids[stage]
            self.bar.update(task, total=total, completed=done if absolute else self.bar.tasks[task].completed + done)
            return
        with self.lock:
            now = time.monotonic()
            first = stage not in self.plain
            st = self.plain.setdefault(stage, [0, total, now, now, done if absolute else 0])
            st[0] = done if absolute else st[0] + done
            st[1] = total
            self.current = stage
            if self.heart is None and not self.stopped.is_set():
                self.heart = threading.Thread(target=self._beat, name="mta-progress", daemon=True)
                Bars.beating.add(self)
                self.heart.start()
            finished = bool(total) and st[0] >= total
            if first or finished or now - st[3] >= self.EVERY:
                self._print(stage, st, now)

    def _print(self, stage: str, st: list, now: float, note: str = "") -> None:
        st[3] = self.printed = now
        elapsed, total = now - st[2], st[1]
        if not total:  # unknown total (a download without a length)
            err_console.print(f"{stage}: {st[0]}, {elapsed:.0f} s{note}", highlight=False, soft_wrap=True)
            return
        left = ""
        if st[0] < total and elapsed >= self.SETTLE and st[0] > st[4]:
            left = f", about {(total - st[0]) * elapsed / (st[0] - st[4]):.0f} s left"
        err_console.print(f"{stage}: {st[0]}/{total} ({100 * st[0] / total:.0f}%), {elapsed:.0f} s{left}{note}",
                          highlight=False, soft_wrap=True)


def run_log(out: Path):
    """Log the ``mta`` logger at INFO into OUT/run.log for the duration of a command."""
    return log_to_file(out / "run.log")


def with_recipes(cfg, recipe: Path | None, model_id: str, bank_record=None, task: str | None = None):
    """Resolve what was not typed the library's way (``mta.defaults``): a --recipe file,
    then the recipe the bank recorded, then the model's registered recipe for ``task``
    (the bank's task when a bank is given). Returns (configs, the adapt settings that came
    from recipes, for a bank to record)."""
    r = read_recipe(recipe) if recipe is not None else None
    if r is not None and r.model != model_id:
        err_console.print(f"[yellow]notice:[/yellow] recipe {recipe} was tuned for {r.model}, not {model_id}")
    task = task or (bank_record.task if bank_record is not None else None)
    under = defaults.layers(model_id, task, recipe=r, recipe_source=str(recipe),
                            bank_recipe=bank_record.recipe if bank_record is not None else None)
    adapt: dict = {}
    for layer in reversed(under):  # lowest first
        adapt.update(layer.values.get("adapt", {}))
    return cfg.resolved(under), adapt
