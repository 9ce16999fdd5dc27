"""Walk counts of docs/architecture.md: how much of the code one path goes through, on
the tiny random model on the CPU (the counts do not depend on the model).

- ``serve``: one chat request for a stored user through the HTTP app (in process, from
  the handler to the answer), every thread traced;
- ``adapt``: ``mta adapt`` for one user, from the command to the stored record;
- ``knob``: ``--stack-lr`` from the command to where the optimiser takes it: the chain of
  calls on the stack when the stack's optimiser is built.

For ``serve`` and ``adapt``, *stops* are the distinct functions of ``mta`` that ran,
*files* their distinct source files, *returns* the distinct return points (function and
line) that were left (comprehensions and lambdas count as part of their function); for
``knob`` they are the frames of ``mta`` on the chain, their files, and 0.

    .venv/bin/python scripts/walk.py [serve adapt knob] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
from pathlib import Path

import mta

SRC = str(Path(mta.__file__).resolve().parent)
TINY = ["--model", "tiny-random-llama", "--embedder", "hashing-embedder", "--dtype", "fp32", "--device", "cpu"]


class Tracer:
    """Functions, files and return points of mta code run while active (all threads)."""

    def __init__(self, on: bool = True):
        self.functions: set[tuple[str, str]] = set()
        self.returns: set[tuple[str, str, int]] = set()
        self.lock = threading.Lock()
        self.on = on  # hooks installed before threads start record only while this is set

    def __call__(self, frame, event, arg):
        f = frame.f_code.co_filename
        if not self.on or not f.startswith(SRC) or frame.f_code.co_name.startswith("<"):
            return  # not ours, or a comprehension or lambda (part of the function it is in)
        key = (f, frame.f_code.co_qualname)
        with self.lock:
            if event == "call":
                self.functions.add(key)
            elif event == "return":
                self.returns.add((*key, frame.f_lineno))

    def __enter__(self):
        threading.setprofile(self)
        sys.setprofile(self)
        return self

    def __exit__(self, *exc):
        sys.setprofile(None)
        threading.setprofile(None)

    def counts(self) -> dict:
        return {"stops": len(self.functions), "files": len({f for f, _ in self.functions}),
                "returns": len(self.returns)}


def _world(d: Path) -> tuple[Path, Path, Path, str]:
    from mta.cli.main import main

    assert main(["data", "synth", "--out", str(d / "data"), "--users", "8", "--queries", "1"]) == 0
    assert main(["--quiet", "bank", "build", "--data", str(d / "data"), "--out", str(d / "bank"), "--anchors", "2",
                 "--min-history", "1", *TINY]) == 0
    return d / "data", d / "bank", d / "store", "synth-0000"


def walk_adapt(d: Path) -> dict:
    from mta.cli.main import main

    data, bank, store, user = _world(d)
    with Tracer() as t:
        assert main(["--quiet", "adapt", "--bank", str(bank), "--data", str(data), "--out", str(store),
                     "--users", user, *TINY[4:]]) == 0
    return t.counts()


def walk_serve(d: Path) -> dict:
    from fastapi.testclient import TestClient

    from mta.backbone import Backbone
    from mta.cli.main import main
    from mta.config import BackboneConfig, GenerateConfig, ServeConfig
    from mta.data.readers import load_dataset
    from mta.loaded_bank import LoadedBank
    from mta.serving.app import build_app
    from mta.serving.security import Keys, add_key
    from mta.store import UserStore

    data, bank, store, user = _world(d)
    assert main(["--quiet", "adapt", "--bank", str(bank), "--data", str(data), "--out", str(store), "--users", user,
                 *TINY[4:]]) == 0
    key = add_key(d / "keys.json", "admin", None, "walk")
    backbone = Backbone.load(BackboneConfig(model="tiny-random-llama", embedder="hashing-embedder", dtype="fp32",
                                            device="cpu"))
    loaded = LoadedBank(backbone, bank)
    app = build_app(loaded, UserStore(store), Keys.read(d / "keys.json"), ServeConfig(),
                    GenerateConfig(max_new_tokens=2), load_dataset(data).users)
    body = {"model": "mta", "user": user, "messages": [{"role": "user", "content": "a film"}], "max_tokens": 2}
    headers = {"Authorization": f"Bearer {key}"}
    with Tracer(on=False) as t, TestClient(app) as client:  # hooks in before the app's threads start
        assert client.post("/v1/chat/completions", json=body, headers=headers).status_code == 200  # warm
        t.on = True
        r = client.post("/v1/chat/completions", json=body, headers=headers)
        t.on = False
        assert r.status_code == 200, r.text
    return t.counts()


def walk_knob(d: Path) -> dict:
    from mta.cli.main import main
    from mta.engine.optim import SlotAdamW

    data, bank, store, user = _world(d)
    chain: list[tuple[str, str]] = []
    real = SlotAdamW.__init__

    def spy(self, *a, **kw):
        if not chain:
            f = sys._getframe(1)
            while f is not None:
                if f.f_code.co_filename.startswith(SRC):
                    chain.append((f.f_code.co_filename, f.f_code.co_qualname))
                f = f.f_back
        real(self, *a, **kw)

    SlotAdamW.__init__ = spy
    try:
        assert main(["--quiet", "adapt", "--bank", str(bank), "--data", str(data), "--out", str(store),
                     "--users", user, "--stack-lr", "1e-3", *TINY[4:]]) == 0
    finally:
        SlotAdamW.__init__ = real
    if not chain:
        raise SystemExit("knob: the stack's optimiser was never built (is it still mta.engine.optim.SlotAdamW?)")
    return {"stops": len(chain), "files": len({f for f, _ in chain}), "returns": 0,
            "chain": [q for _, q in reversed(chain)]}


WALKS = {"serve": walk_serve, "adapt": walk_adapt, "knob": walk_knob}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("walks", nargs="*", choices=[*WALKS, []], help="Default: all three.")
    ap.add_argument("--json", type=Path, help="Also write the counts here.")
    args = ap.parse_args()
    res = {}
    for name in args.walks or list(WALKS):
        with tempfile.TemporaryDirectory() as d:
            res[name] = WALKS[name](Path(d))
    print(f"{'walk':8} {'stops':>6} {'files':>6} {'returns':>8}")
    for name, c in res.items():
        print(f"{name:8} {c['stops']:>6} {c['files']:>6} {c['returns']:>8}")
    if "knob" in res:
        print("knob chain: " + " > ".join(res["knob"]["chain"]))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
