"""`mta serve` for real on loopback with the tiny model: the world it serves (a bank, a
store, data and keys), a server process, and request helpers; shared by the serving tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx

from mta.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny-random-llama", "--embedder", "hashing-embedder"]
STORED = ["synth-0000", "synth-0001", "synth-0002"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_world(d: Path) -> tuple[Path, dict]:
    """A bank, a store with three adapted users, the users' data, and two keys."""
    assert main(["data", "synth", "--out", str(d / "data"), "--users", "8", "--queries", "1"]) == 0
    assert main(["--quiet", "bank", "build", "--data", str(d / "data"), "--out", str(d / "bank"), "--anchors", "2",
                 "--min-history", "1", *TINY]) == 0
    assert main(["--quiet", "adapt", "--bank", str(d / "bank"), "--data", str(d / "data"), "--out", str(d / "store"),
                 "--users", ",".join(STORED)]) == 0
    keys = {}
    for role, user in (("admin", None), ("user", "synth-0001")):
        r = subprocess.run([sys.executable, "-m", "mta", "keys", "add", "--keys", str(d / "keys.json"), "--role", role,
                            *(["--user", user] if user else [])], capture_output=True, text=True, cwd=ROOT, check=True)
        keys[role] = r.stdout.strip()
    assert keys["admin"] not in (d / "keys.json").read_text()  # only hashes are kept
    return d, keys


class Server:
    def __init__(self, d: Path, *extra: str, env: dict | None = None, start_s: float = 120):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (d / f"serve-{self.port}.log").open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "mta", "serve", "--bank", str(d / "bank"), "--store",
                                      str(d / "store"), "--users", str(d / "data"), "--keys", str(d / "keys.json"),
                                      "--port", str(self.port), *extra], cwd=ROOT, stdout=self.log,
                                     stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + start_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("the server exited: " + (d / f"serve-{self.port}.log").read_text()[-2000:])
            time.sleep(0.3)
        raise RuntimeError("the server did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)
        self.log.close()


def _h(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


def chat(url: str, key: str, user: str | None, content: str, **kw) -> httpx.Response:
    body = {"model": kw.pop("model", "mta"), "messages": [{"role": "user", "content": content}], "max_tokens": 6,
            **({"user": user} if user else {}), **kw}
    return httpx.post(url + "/v1/chat/completions", json=body, headers=_h(key), timeout=120)
