"""Adapters as files in PEFT's format, and a user exported as ONE ordinary PEFT LoRA.

A directory holds ``adapter_config.json`` (written by ``peft.LoraConfig``) and
``adapter_model.safetensors`` with PEFT's key names
(``base_model.model.<module>.lora_A.weight`` (r x in), ``...lora_B.weight`` (out x r)).
Our extras ride in the safetensors metadata, which PEFT ignores: the base-model
fingerprint and what the adapter is (anchor, stacked user, exported user). Only
safetensors is ever read: nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mta.engine.engine import AdapterEngine, block_index, check_finite, device_to_host
from mta.engine.fingerprint import check_fingerprint
from mta.errors import MtaError, ResourceError
from mta.fusion import concat_delta, merge_factor, merge_svd
from mta.paths import atomic_path

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
Tensors = dict[str, tuple[torch.Tensor, torch.Tensor]]

# ranks vLLM accepts for LoRA adapters (max_lora_rank choices)
SERVING_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _key(module: str, which: str) -> str:
    return f"base_model.model.{module}.lora_{which}.weight"


def save_adapter(out: Path, tensors: Tensors, rank: int, alpha: float, fingerprint: dict,
                 kind: str, base_model: str | None = None, extra: dict | None = None,
                 layers: list[int] | None = None) -> Path:
    """Write one LoRA adapter directory atomically (PEFT layout + our metadata).

    ``layers``: the blocks the adapter covers when it is not all of them (PEFT's
    ``layers_to_transform``), so that PEFT injects exactly the modules the file holds.
    """
    if not tensors:
        raise MtaError("cannot save an adapter with no modules")
    for module, (a, b) in tensors.items():
        if a.shape[0] != rank or b.shape[1] != rank:
            raise MtaError(f"{module}: factors of rank {a.shape[0]}/{b.shape[1]} but the config says {rank}")
    # on the host in one copy, then checked there at once (a check or copy a factor on the
    # device each waits for it)
    flat = iter(device_to_host([t for ab in tensors.values() for t in ab]))
    host = {module: (next(flat), next(flat)) for module in tensors}
    check_finite(host, "refusing to save NaN or inf weights")
    state = {_key(module, part): t for module, ab in host.items() for part, t in zip("AB", ab)}
    targets = sorted({m.rsplit(".", 1)[-1] for m in tensors})
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                     bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_model,
                     layers_to_transform=layers, layers_pattern="layers" if layers else None)
    meta = {"mta_kind": kind, "mta_fingerprint": json.dumps(fingerprint, sort_keys=True),
            "mta_extra": json.dumps(extra or {}, sort_keys=True)}
    with atomic_path(Path(out)) as tmp:
        tmp.mkdir()
        cfg.save_pretrained(str(tmp))
        try:
            save_file(state, str(tmp / WEIGHTS), metadata=meta)
        except SafetensorError as e:  # safetensors reports the OS's errors as its own
            if "No space left" in str(e) or "StorageFull" in str(e) or "os error 28" in str(e):
                raise ResourceError(f"{out}: no space left on device (writing the adapter)") from None
            if "Permission denied" in str(e) or "os error 13" in str(e):
                raise ResourceError(f"{out}: permission denied (writing the adapter)") from None
            raise
    return Path(out)


def load_adapter(path: Path, fingerprint: dict | None = None) -> tuple[Tensors, dict, dict]:
    """Read an adapter directory: (module -> (A, B), adapter config, our metadata).

    With ``fingerprint``, refuse an adapter trained on another base model.
    """
    path = Path(path)
    cfg_file, w_file = path / CONFIG, path / WEIGHTS
    if not cfg_file.exists() or not w_file.exists():
        have = ", ".join(sorted(p.name for p in path.iterdir())) if path.is_dir() else "no such directory"
        raise MtaError(f"{path}: not a PEFT adapter (needs {CONFIG} and {WEIGHTS}; "
                       f"found: {have or 'nothing'})")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise MtaError(f"{cfg_file}: not valid JSON ({e.msg})") from None
    try:
        state = load_file(str(w_file))
        from safetensors import safe_open

        with safe_open(str(w_file), "pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise MtaError(f"{w_file}: corrupt or unreadable safetensors file ({e})") from None
    tensors: Tensors = {}
    for key, t in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len("base_model.model."):-len(".lora_A.weight")]
        bkey = _key(module, "B")
        if bkey not in state:
            raise MtaError(f"{w_file}: {module} has lora_A but no lora_B")
        tensors[module] = (t, state[bkey])
    if not tensors:
        raise MtaError(f"{w_file}: no LoRA weights inside")
    rank = int(config.get("r", 0))
    for module, (a, b) in tensors.items():
        if a.shape[0] != rank or b.shape[1] != rank:
            raise MtaError(f"{w_file}: {module} has rank {a.shape[0]} but {CONFIG} says r={rank}")
    try:  # every factor at once (a check a factor is two host calls each, 392 at 1.5B)
        check_finite(tensors, "holds NaN or inf weights")
    except MtaError as e:
        raise MtaError(f"{w_file}: {e}") from None
    ours = {"kind": meta.get("mta_kind"),
            "fingerprint": json.loads(meta["mta_fingerprint"]) if "mta_fingerprint" in meta else None,
            "extra": json.loads(meta.get("mta_extra", "{}"))}
    if fingerprint is not None:
        check_fingerprint(ours["fingerprint"], fingerprint, f"adapter {path}")
    return tensors, config, ours


def is_export(path: Path) -> bool:
    """Whether ``path`` is an adapter directory `mta export` wrote (safe to replace)."""
    w = Path(path) / WEIGHTS
    if not w.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(w), "pt") as fh:
            return (fh.metadata() or {}).get("mta_kind") == "export"
    except (SafetensorError, OSError, ValueError):
        return False


def is_vllm_export(path: Path) -> bool:
    """Whether ``path`` is a directory `mta export --all --format vllm` wrote (safe to
    replace): its manifest.json says so, and it holds nothing but the adapters the
    manifest lists, each one our export, and our own temporary names."""
    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        names = {e["lora_name"] for e in manifest["users"]}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return False
    if not isinstance(manifest, dict) or manifest.get("format") != "vllm-lora":
        return False
    for p in path.iterdir():
        if p.name == "manifest.json" or (p.name.startswith(".") and p.name.endswith((".tmp", ".old"))):
            continue
        if p.name not in names or not is_export(p):
            return False
    return True


def save_anchor(engine: AdapterEngine, slot: int, out: Path, base_model: str | None = None,
                extra: dict | None = None) -> Path:
    return save_adapter(out, engine.anchor_tensors(slot), engine.spec.rank, engine.spec.alpha,
                        engine.fingerprint, "anchor", base_model, extra)


def load_anchor(engine: AdapterEngine, slot: int, path: Path) -> dict:
    tensors, config, ours = load_adapter(path, engine.fingerprint)
    if int(config["r"]) != engine.spec.rank or float(config["lora_alpha"]) != float(engine.spec.alpha):
        raise MtaError(f"{path}: rank/alpha {config['r']}/{config['lora_alpha']} do not match the bank's "
                       f"{engine.spec.rank}/{engine.spec.alpha}")
    engine.load_anchor(slot, tensors)
    return ours


def save_user(engine: AdapterEngine, slot: int, out: Path, base_model: str | None = None,
              extra: dict | None = None) -> Path:
    """A stack slot as a PEFT LoRA of the slot's own rank and alpha."""
    blocks = {block_index(n) for n in engine.stack_layers}
    subset = sorted(blocks) if None not in blocks and blocks != {block_index(n) for n in engine.layers} else None
    rank, alpha = engine.slot_lora[slot]
    return save_adapter(out, engine.user_tensors(slot), rank, alpha,
                        engine.fingerprint, "stack", base_model, extra, layers=subset)


def load_user(engine: AdapterEngine, slot: int, path: Path) -> dict:
    """Load a stacked adapter file into stack slot ``slot`` (zero-padded to the table's rank)."""
    tensors, config, ours = load_adapter(path, engine.fingerprint)
    engine.load_user(slot, tensors, alpha=float(config["lora_alpha"]))
    return ours


def user_factors(engine: AdapterEngine, anchors: list[int], weights: list[float], mode: str = "delta",
                 user: int | None = None, svd_rank: int | None = None) -> tuple[Tensors, int]:
    """One user's whole update per module as plain LoRA factors with scaling 1.

    delta: concatenation, rank k*r (+ r_s); factor: rank r (+ r_s); svd: rank svd_rank (+ r_s).
    The per-direction coefficients (w_i alpha/r, alpha_s/r_s) are folded into A.
    """
    w = torch.tensor(weights, dtype=torch.float64)
    out: Tensors = {}
    for name, layer in engine.layers.items():
        if not layer.bank_A.shape[0] and not (user is not None and layer.stack_A.shape[0]):
            continue  # neither a bank nor a stack here: nothing to export
        if not layer.bank_A.shape[0]:
            anchors_here: list[int] = []
        else:
            anchors_here = anchors
        a_bank = layer.bank_A[anchors_here].detach().double()
        b_bank = layer.bank_B[anchors_here].detach().double()
        w_here = w if anchors_here else w[:0]
        if not anchors_here:
            a, b = a_bank.new_zeros(0, layer.in_features), b_bank.new_zeros(layer.out_features, 0)
        elif mode == "delta":
            a, b = concat_delta(a_bank, b_bank, w_here)
        elif mode == "factor":
            a, b = merge_factor(a_bank, b_bank, w_here)
        elif mode == "svd":
            if not svd_rank:
                raise ValueError("svd export needs svd_rank")
            a, b = merge_svd(a_bank, b_bank, w_here, svd_rank)
        else:
            raise ValueError(f"unknown merge mode {mode!r}")
        a = a * layer.scale
        if user is not None and layer.stack_A.shape[0]:
            r_u, alpha_u = engine.slot_lora[user]
            a_s = layer.stack_A[user, :r_u].detach().double() * (alpha_u / r_u)
            a = torch.cat([a, a_s])
            b = torch.cat([b, layer.stack_B[user, :, :r_u].detach().double()], dim=1)
        out[name] = (a.to(layer.bank_A.dtype), b.to(layer.bank_A.dtype))
    # layers without a stacked adapter get zero directions so that one rank fits all
    rank = max(a.shape[0] for a, _ in out.values())
    return {n: (torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])]),
                torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1))
            for n, (a, b) in out.items()}, rank


def export_user(engine: AdapterEngine, anchors: list[int], weights: list[float], out: Path,
                mode: str = "delta", user: int | None = None, svd_rank: int | None = None,
                pad_to: int | str | None = None, base_model: str | None = None) -> Path:
    """Export a user (fused + stacked) as one PEFT LoRA; optionally zero-pad the rank
    (``pad_to`` an int, or "serving" for the next rank vLLM accepts)."""
    tensors, rank = user_factors(engine, anchors, weights, mode, user, svd_rank)
    target = rank
    if pad_to == "serving":
        target = next((r for r in SERVING_RANKS if r >= rank), None)
        if target is None:
            raise MtaError(f"rank {rank} exceeds every serving rank {SERVING_RANKS}")
    elif pad_to is not None:
        target = int(pad_to)
        if target < rank:
            raise MtaError(f"cannot pad to rank {target}: the exported rank is already {rank}")
    if target > rank:
        tensors = {n: (torch.cat([a, a.new_zeros(target - rank, a.shape[1])]),
                       torch.cat([b, b.new_zeros(b.shape[0], target - rank)], dim=1))
                   for n, (a, b) in tensors.items()}
    # lora_alpha = r makes PEFT's scaling alpha/r exactly 1: the coefficients live in A.
    return save_adapter(out, tensors, target, float(target), engine.fingerprint, "export",
                        base_model, {"anchors": anchors, "weights": weights, "mode": mode,
                                     "rank_used": rank})
