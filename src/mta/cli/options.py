"""CLI options built from the config classes: each knob is defined once, in its config.

``@configured(BackboneConfig, AdaptConfig, ...)`` adds one option per config field to a
command (``--stack-lr``, ``--device``...), all defaulting to None ("the config's
default", shown in --help), builds the configs from what was given and passes them to
the command as ``cfg``. A flag shared by several configs (``--seed``, ``--retrieve-k``)
sets all of them. Errors that name config fields come back naming flags.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from mta import defaults
from mta.config import (
    AdaptConfig,
    BackboneConfig,
    BankConfig,
    BaselineConfig,
    EvalConfig,
    GenerateConfig,
    RunConfig,
    ServeConfig,
    flag_name,
)
from mta.errors import ConfigError, MtaError

SECTIONS: dict[type, tuple[str, str]] = {  # config -> (attribute on ``Configs``, --help panel)
    BackboneConfig: ("backbone", "Model and device"),
    BankConfig: ("bank", "Bank (stage 1)"),
    AdaptConfig: ("adapt", "Fusion and stacking (stages 2 and 3)"),
    GenerateConfig: ("generate", "Generation"),
    EvalConfig: ("eval", "Evaluation protocol"),
    BaselineConfig: ("baselines", "Baselines' budgets"),
    RunConfig: ("run", "Split"),
    ServeConfig: ("serve", "Server"),
}


@dataclass(frozen=True)
class Knob:
    flag: str                          # without the leading dashes
    targets: tuple[tuple[type, str], ...]
    cli_type: type
    help: str


def _cli_type(annotation: Any) -> tuple[type, str]:
    """The type the CLI parses for a field, and a note on accepted values."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _cli_type(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return _cli_type(args[0])
    if origin is Literal:
        return str, "one of: " + ", ".join(map(str, typing.get_args(annotation)))
    if origin is tuple:
        return str, "comma-separated"
    if annotation in (bool, int, float, str, Path):
        return annotation, ""
    raise TypeError(f"no CLI type for {annotation!r}")


def _help(cls: type, name: str, note: str) -> str:
    """The field's description as a sentence, what it accepts, and its default."""
    f = cls.model_fields[name]
    desc = f.description or name.replace("_", " ")
    parts = [desc[0].upper() + desc[1:] + "."]
    if note and note.lower() not in desc.lower():
        parts.append(note[0].upper() + note[1:] + ".")
    d = f.get_default(call_default_factory=True)
    if d not in (None, ()) and "(default:" not in desc:  # (an empty list has no default to say)
        parts.append(f"Default: {','.join(map(str, d)) if isinstance(d, tuple) else d}.")
    return " ".join(parts)


def knobs(*configs: type) -> dict[str, Knob]:
    """flag -> Knob over ``configs``. Fields sharing a flag must share their default."""
    out: dict[str, Knob] = {}
    for cls in configs:
        for name, f in cls.model_fields.items():
            if (f.json_schema_extra or {}).get("cli") is False:  # set by the library, not typed
                continue
            flag = flag_name(cls, name)
            cli_type, note = _cli_type(f.annotation)
            if flag in out:
                other_cls, other = out[flag].targets[0]
                if other_cls.model_fields[other].get_default(call_default_factory=True) != f.get_default(
                        call_default_factory=True):
                    raise TypeError(f"--{flag}: {other_cls.__name__}.{other} and {cls.__name__}.{name} "
                                    "disagree on the default")
                out[flag] = Knob(flag, out[flag].targets + ((cls, name),), cli_type, out[flag].help)
                continue
            out[flag] = Knob(flag, ((cls, name),), cli_type, _help(cls, name, note))
    return out


def flag_of(field: str) -> str | None:
    """``"AdaptConfig.stack_lr"`` -> ``"--stack-lr"`` (None for an unknown field)."""
    cls_name, _, name = field.partition(".")
    for cls in SECTIONS:
        if cls.__name__ == cls_name and name in cls.model_fields:
            return "--" + flag_name(cls, name)
    return None


class Configs:
    """The configs a command was given, as attributes (``cfg.adapt``, ``cfg.backbone``...)."""

    def __init__(self, built: dict[type, Any], given: frozenset[str] = frozenset()):
        self._built, self.given = built, given  # given: the flags set on the command line
        for cls, obj in built.items():
            setattr(self, SECTIONS[cls][0], obj)

    def dump(self) -> dict:
        return {SECTIONS[cls][0]: obj.dump() for cls, obj in self._built.items()}

    @classmethod
    def load(cls, dumped: dict) -> Configs:
        """The inverse of ``dump`` (resolved configs sent to another process, e.g. a Ray replica)."""
        by_name = {v[0]: k for k, v in SECTIONS.items()}
        return cls({by_name[name]: by_name[name].build(values) for name, values in dumped.items()})

    def layer(self, values: dict[str, dict], source: str = "") -> Configs:
        """A copy where config fields (``{"bank": {"lr": ...}}``, by section) whose flag was
        not given take these values; their flags then count as given. For a command's own
        defaults (``mta demo``); recipes are resolved by the library (``resolved``)."""
        built, given = dict(self._built), set(self.given)
        for cls, obj in self._built.items():
            section = SECTIONS[cls][0]
            update = {}
            for name, value in (values.get(section) or {}).items():
                if name not in cls.model_fields:
                    raise MtaError(f"{source or 'recipe'}: {section} has no setting {name!r}")
                if flag_name(cls, name) not in self.given:
                    update[name] = value
            if update:
                built[cls] = cls.build({**obj.dump(), **update})
                given |= {flag_name(cls, n) for n in update}
        return Configs(built, frozenset(given))


    def resolved(self, under) -> Configs:
        """A copy where the bank, adapt and baselines settings not typed are resolved by
        the library (``mta.defaults.resolve``) over the layers ``under``, highest first;
        the settings a layer gave then count as given."""
        built, given = dict(self._built), set(self.given)
        for cls, obj in self._built.items():
            if SECTIONS[cls][0] in defaults.SECTIONS:
                came = defaults.sources(obj, under)
                built[cls] = defaults.resolve(obj, under)
                given |= {flag_name(cls, n) for n, src in came.items()
                          if src not in (defaults.PRECEDENCE[0], defaults.PRECEDENCE[-1])}
        return Configs(built, frozenset(given))


def configured(*configs: type):
    """Decorate a command whose last parameter is ``cfg: Configs`` (see the module doc)."""
    table = knobs(*configs)

    def deco(fn):
        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn, include_extras=True)
        own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()
               if p.name != "cfg"]
        taken = {p.name for p in own}
        generated = []
        for knob in table.values():
            py = knob.flag.replace("-", "_")
            if py in taken:
                raise TypeError(f"{fn.__name__}: its parameter {py} clashes with the option --{knob.flag}")
            panel = SECTIONS[knob.targets[0][0]][1]
            names = f"--{knob.flag}/--no-{knob.flag}" if knob.cli_type is bool else f"--{knob.flag}"
            opt = typer.Option(names, help=knob.help, show_default=False, rich_help_panel=panel)
            generated.append(inspect.Parameter(py, inspect.Parameter.KEYWORD_ONLY, default=None,
                                               annotation=Annotated[knob.cli_type | None, opt]))

        @functools.wraps(fn)
        def wrapper(**kwargs):
            values: dict[type, dict] = {cls: {} for cls in configs}
            given = set()
            for knob in table.values():
                value = kwargs.pop(knob.flag.replace("-", "_"))
                if value is not None:
                    given.add(knob.flag)
                    for cls, name in knob.targets:
                        values[cls][name] = value
            built = {}
            for cls in configs:
                try:
                    built[cls] = cls.make(**values[cls])
                except ConfigError as e:
                    raise ConfigError(_with_flags(str(e), e.fields), e.fields) from None
            return fn(**kwargs, cfg=Configs(built, frozenset(given)))

        del wrapper.__wrapped__  # typer must read the new signature, not fn's
        params = own + generated
        wrapper.__signature__ = sig.replace(parameters=params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return deco


def _with_flags(message: str, fields: tuple[str, ...]) -> str:
    """Rewrite ``invalid BankConfig: `lr` ...`` into the CLI's words (``--bank-lr ...``)."""
    for field in fields:
        cls_name, _, name = field.partition(".")
        flag = flag_of(field)
        if flag:
            message = message.replace(f"`{name}`", flag)
    return message.replace("invalid ", "invalid options for ", 1) if message.startswith("invalid ") else message


def cli_message(err: MtaError) -> str:
    """The one line the CLI prints for ``err``: the library's message, plus the flags it is about."""
    if isinstance(err, ConfigError) or not err.fields:
        return str(err)
    flags = [f for f in (flag_of(x) for x in err.fields) if f]
    return f"{err} ({', '.join(flags)})" if flags else str(err)


# Paths and names several commands take, each declared once.
DataPath = Annotated[Path, typer.Option("--data", help="Users' data: a file or directory in any supported layout.")]
OptionalData = Annotated[Path | None, typer.Option("--data", help="Users' data, for their history "
                                                   "(retrieval and fusion of users not in the store).")]
BankPath = Annotated[Path, typer.Option("--bank", help="A bank directory (built by `mta bank build`).")]
StorePath = Annotated[Path, typer.Option("--store", help="A user store directory (written by `mta adapt`).")]
OutDir = Annotated[Path, typer.Option("--out", help="Output directory.")]
TaskName = Annotated[str | None, typer.Option("--task", help="Task name (default: detected from the data, "
                                              "or the bank's).")]
RecipeFile = Annotated[Path | None, typer.Option("--recipe", help="A recipe from `mta tune`: its settings "
                                                "are the defaults here (flags still win).")]
UserIds = Annotated[str | None, typer.Option("--users", help="Comma-separated user ids, or @FILE with one id "
                                             "per line (default: all users of the data).")]
