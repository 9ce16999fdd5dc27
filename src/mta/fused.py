"""Fused kernels for the base model's elementwise passes (``--fused-kernels``).

``liger``: Liger Kernel's Triton kernels for the decoder blocks' RMSNorm, SwiGLU and
rotary embedding, patched into the loaded model (its norms' and MLPs' forwards) and into
transformers' rotary function of the model's family (process-wide). The loss kernels
are left out: training computes logits only at the target tokens
(``mta.engine.train.target_token_loss``). On an H100 the eager build of a 50-anchor bank
at Llama-3-8B's shape ran 24.6% faster with them (docs/performance.md, the bank row, run
AB). The adapted linear layers are untouched: Liger's MLP forward calls the block's own
projections, which the engine routes as before. Its parity test
(`tests/test_gpu.py::test_liger_fused_kernels_on_cuda_track_the_plain_blocks`) passed for
Llama blocks on an H100 (run AC); its Qwen2 case, a timed run of the product's commands
and the compiled and captured decoders with it have not run on a GPU, so it stays off
by default. At Qwen2.5-1.5B's shape the same benchmark's bank build was 9.9% faster with
it (run AC), where the 8B shape gained 24.6%.
"""
from __future__ import annotations

from importlib.metadata import version

import torch

from mta.errors import MtaError

FUSED_KERNELS = ("none", "liger")
LIGER_KERNELS = ("rms_norm", "swiglu", "rope")
# transformers' model_type -> Liger's patch for that family (the registry's models: Llama
# blocks for SmolLM2, Qwen2 blocks for Qwen2.5-Coder)
LIGER_PATCHES = {"llama": "apply_liger_kernel_to_llama", "qwen2": "apply_liger_kernel_to_qwen2"}
FIELD = ("BackboneConfig.fused_kernels",)


def check_fused_kernels(kind: str, device: torch.device):
    """Liger's patches module for ``kind`` on ``device`` (None for ``none``), refused in one
    line off CUDA or without the package: what can be said before a model is loaded."""
    if kind == "none":
        return None
    if kind not in FUSED_KERNELS:
        raise MtaError(f"--fused-kernels must be one of {', '.join(FUSED_KERNELS)}, not {kind!r}", FIELD)
    if device.type != "cuda":
        raise MtaError("--fused-kernels liger runs on CUDA only (Liger's kernels are Triton kernels)", FIELD)
    try:
        import liger_kernel.transformers as liger
    except ImportError as e:
        raise MtaError(f"--fused-kernels liger needs the liger-kernel package (pip install 'mta[liger]'): {e}",
                       FIELD) from None
    return liger


def apply_fused_kernels(model: torch.nn.Module, kind: str, device: torch.device) -> dict | None:
    """Patch ``kind``'s kernels into ``model`` (on ``device``); returns what was applied
    ({"library", "version", "kernels"}), None for ``none``. Refused in one line off CUDA,
    without the package (`check_fused_kernels`), or for a model family Liger has no patch
    for here."""
    liger = check_fused_kernels(kind, device)
    if liger is None:
        return None
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    patch = LIGER_PATCHES.get(model_type)
    if patch is None:
        raise MtaError(f"--fused-kernels liger has no patch for {model_type!r} models (it has "
                       f"{', '.join(LIGER_PATCHES)})", FIELD)
    getattr(liger, patch)(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                          fused_linear_cross_entropy=False, model=model)
    return {"library": "liger-kernel", "version": version("liger-kernel"), "kernels": list(LIGER_KERNELS)}
