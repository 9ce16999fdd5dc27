"""The backbone: the base model, its tokenizer, the embedder, where they run and in which
dtype, loaded ONCE per process, with the adapter engine injected into the model once.

Every stage (bank building, adaptation, generation, export, evaluation, serving) works
on a ``Backbone``; banks are opened on it (``mta.loaded_bank.LoadedBank``) and replace
the engine's tables, never its layers.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass, field

import torch

from mta.config import BackboneConfig, gpu_memory_cap
from mta.decoding.slots import SlotDecoder
from mta.engine.budget import run_peak
from mta.engine.config import LLAMA_TARGETS
from mta.engine.engine import AdapterEngine, EngineSpec
from mta.errors import MtaError, ResourceError
from mta.fused import apply_fused_kernels, check_fused_kernels

log = logging.getLogger(__name__)
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_EMBEDDER = "minilm-l6"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CPU_MAX_ROWS = 16  # the CPU default micro-batch (rows); CUDA sizes micro-batches by memory
# --gpu-memory bounds the whole process, and torch's allocator is not all of it: the CUDA
# context, loaded kernels and libraries' own memory come on top (run S, an H100: two tunes
# under 24 GiB peaked at 24.7 and 24.2 GiB by nvidia-smi, docs/architecture.md). What this
# process holds outside the allocator is read from nvidia-smi when the cap is set; where it
# cannot be read, the context's usual size is assumed. Kernels loaded later (Triton's, a
# compile's) are given a margin. Both are estimates, not measurements of this process.
OUTSIDE_ASSUMED = 512 * 2 ** 20
OUTSIDE_MARGIN = 256 * 2 ** 20


def _compute_apps() -> str | None:
    """nvidia-smi's ``pid, used MiB`` lines of the processes on the GPUs (None where it is
    missing or fails)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        r = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


def outside_allocator(device: torch.device) -> int | None:
    """Bytes this process holds on the GPUs outside torch's caching allocator (nvidia-smi's
    per-process usage, summed over the GPUs, less what the allocator reserved on
    ``device``), or None where nvidia-smi is missing, fails or does not list this process
    (a container whose process ids the driver does not see)."""
    used = None
    for line in (_compute_apps() or "").splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 2 and parts[0] == str(os.getpid()) and parts[1].replace(".", "", 1).isdigit():
            used = (used or 0) + int(float(parts[1]) * 2 ** 20)
    return None if used is None else max(0, used - torch.cuda.memory_reserved(device))


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> the first CUDA device when there is one, else the CPU."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MtaError(f"device {spec!r} asked for, but this torch sees no CUDA device", ("BackboneConfig.device",))
        index = dev.index or 0
        if index >= torch.cuda.device_count():
            raise MtaError(f"device {spec!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist",
                           ("BackboneConfig.device",))
        return torch.device("cuda", index)
    return dev


def cap_memory(device: torch.device, spec: str) -> int | None:
    """Cap this process's CUDA caching allocator so that the whole process keeps within
    ``--gpu-memory spec`` (`gpu_memory_cap`), once the model is loaded (auto counts what it
    holds): the spec's bytes less what the process holds outside the allocator
    (`outside_allocator`, or `OUTSIDE_ASSUMED` where unread) and `OUTSIDE_MARGIN`. Returns
    the allocator's cap in bytes (None on the CPU), what a micro-batch budget plans into; a
    cap under what the process already holds is an error. Not isolation: memory loaded
    outside the allocator past the margin still counts against the device
    (docs/architecture.md, "Devices, dtypes and memory")."""
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    held = torch.cuda.memory_reserved(device)
    whole = gpu_memory_cap(spec, total, held)
    outside = outside_allocator(device)
    cap = whole - (OUTSIDE_ASSUMED if outside is None else outside) - OUTSIDE_MARGIN
    if cap < held:
        raise ResourceError(f"--gpu-memory {spec} allows {whole / 2**30:.1f} GiB but the model already holds "
                            f"{held / 2**30:.1f} GiB of the device's {total / 2**30:.1f} GiB and "
                            f"{(whole - cap) / 2**30:.1f} GiB go outside torch's allocator",
                            ("BackboneConfig.gpu_memory",))
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
    log.info("GPU memory cap %.1f GiB of %.1f GiB for the process (--gpu-memory %s): torch's allocator %.1f GiB "
             "(the model holds %.1f GiB), outside it %.2f GiB%s and a margin of %.2f", whole / 2**30,
             total / 2**30, spec, cap / 2**30, held / 2**30,
             (OUTSIDE_ASSUMED if outside is None else outside) / 2**30,
             " (assumed: nvidia-smi did not tell)" if outside is None else " (nvidia-smi)", OUTSIDE_MARGIN / 2**30)
    return cap


@dataclass
class Backbone:
    model: torch.nn.Module
    tokenizer: object
    embedder: object
    model_id: str
    embedder_id: str
    device: torch.device
    dtype: torch.dtype
    config: BackboneConfig
    engine: AdapterEngine = field(init=False)
    memory_cap: int | None = None  # bytes this process may use on its CUDA device (`cap_memory`)
    _slot_decoders: dict = field(init=False, default_factory=dict, repr=False)  # compile -> SlotDecoder

    def __post_init__(self) -> None:
        if self.config.compile_training and self.device.type != "cuda":
            raise MtaError("compiled training needs a CUDA device (on the CPU, torch's compiled gradient scatter "
                           "is wrong at small micro-batches: mta.engine.train.compiled_layers)",
                           ("BackboneConfig.compile_training",))
        # before the engine wraps the linear layers (Liger patches the norms and MLP forwards,
        # which call the block's projections: the engine's routing is unchanged)
        fused = apply_fused_kernels(self.model, self.config.fused_kernels, self.device)
        if fused:
            log.info("fused kernels: %s %s (%s)", fused["library"], fused["version"], ", ".join(fused["kernels"]))
        compute = self.config.adapter_compute
        compute_dtype = self.dtype if compute == "auto" else DTYPES[compute]
        # master weights stay fp32 whatever the base dtype; the engine hashes the base
        # weights once (the fingerprint every adapter is checked against)
        self.engine = AdapterEngine(self.model, EngineSpec(target_modules=self._linear_targets(),
                                                           dtype=torch.float32, compute_dtype=compute_dtype))

    def _linear_targets(self) -> tuple[str, ...]:
        names = {n.rsplit(".", 1)[-1] for n, m in self.model.named_modules() if isinstance(m, torch.nn.Linear)}
        return tuple(t for t in LLAMA_TARGETS if t in names) or LLAMA_TARGETS

    @classmethod
    def load(cls, cfg: BackboneConfig, default_model: str | None = None,
             default_embedder: str | None = None) -> Backbone:
        """Load the model and embedder of ``cfg`` (unset names fall back to the defaults
        given, e.g. a bank's, then to the registry defaults)."""
        from mta.models import load_embedder, load_llm

        device = resolve_device(cfg.device)
        dtype = DTYPES[cfg.dtype] if cfg.dtype != "auto" else (torch.bfloat16 if device.type == "cuda"
                                                                 else torch.float32)
        model_id = cfg.model or default_model or DEFAULT_MODEL
        embedder_id = cfg.embedder or default_embedder or DEFAULT_EMBEDDER
        check_fused_kernels(cfg.fused_kernels, device)  # refused before minutes of loading
        model, tok = load_llm(model_id, dtype=dtype, device=device)
        emb = load_embedder(embedder_id, device=str(device))
        log.info("loaded %s (%s) and %s on %s", model_id, dtype, embedder_id, device)
        return cls(model, tok, emb, model_id, embedder_id, device, dtype, cfg, cap_memory(device, cfg.gpu_memory))

    @classmethod
    def wrap(cls, model, tokenizer, embedder, model_id: str, embedder_id: str,
             cfg: BackboneConfig | None = None) -> Backbone:
        """A backbone around a model already loaded (tests, notebooks)."""
        p = next(model.parameters())
        return cls(model, tokenizer, embedder, model_id, embedder_id, p.device, p.dtype,
                   cfg or BackboneConfig(device=str(p.device.type)))

    @property
    def fingerprint(self) -> dict:
        return self.engine.fingerprint

    def train_resources(self) -> dict:
        """The micro-batch bounds and checkpointing that training on this device uses."""
        cuda = self.device.type == "cuda"
        return {"max_rows": self.config.max_rows or (None if cuda else CPU_MAX_ROWS),
                "token_budget": self.config.token_budget, "memory_cap": self.memory_cap,
                "gradient_checkpointing": self.config.gradient_checkpointing,
                "compile": self.config.compile_training}

    def recap_memory(self) -> None:
        """Apply ``--gpu-memory`` again once the process holds more for good (a server's static
        KV cache): auto then counts it as it counts the model, so the working room stays."""
        if self.memory_cap is not None:
            self.memory_cap = cap_memory(self.device, self.config.gpu_memory)

    def slot_decoder(self, slots: int, span: int, compile: bool = False):
        """The slot decoder of batch generation's ``--decoder graph`` (``compile``: of
        ``--decoder compiled``; mta.decoding.slots): ``slots`` rows of up to ``span`` tokens
        each. Kept while later calls fit it (a new one replaces it, with its cache, when
        they do not: a compiled one compiles again)."""
        dec = self._slot_decoders.get(compile)
        if dec is None or dec.n != slots or dec.span < span:
            old = self._slot_decoders.pop(compile, None)
            if old is not None:  # its cache goes before the next one is allocated
                old.close()
            dec = SlotDecoder(self, self.tokenizer.pad_token_id, slots=slots, span=span, compile=compile)
            self._slot_decoders[compile] = dec
        return dec

    def peak_memory(self) -> dict | None:
        """Peak bytes on the CUDA device in this process so far (None on the CPU): ``allocated``
        (tensors, the weights included), ``reserved`` (what torch's caching allocator held,
        what a job beside this one cannot have) and ``cap`` (``--gpu-memory``'s bytes)."""
        if self.device.type != "cuda":
            return None
        allocated, reserved = run_peak(self.device)
        return {"allocated": allocated, "reserved": reserved, "cap": self.memory_cap}

    def describe(self) -> dict:
        return {"model": self.model_id, "embedder": self.embedder_id, "device": str(self.device),
                "dtype": str(self.dtype).replace("torch.", ""),
                "adapter_compute": str(self.engine.spec.compute_dtype).replace("torch.", ""),
                "fingerprint": self.fingerprint}
