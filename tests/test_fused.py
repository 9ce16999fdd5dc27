"""``--fused-kernels`` (mta.fused): what is refused in one line and what is handed to Liger
Kernel's patch, with a stand-in for the package (its kernels are Triton kernels: they run
in ``tests/test_gpu.py::test_liger_fused_kernels_on_cuda_track_the_plain_blocks``)."""

from __future__ import annotations

import re
import sys
import types

import pytest
import torch

from mta.cli.main import main
from mta.errors import MtaError
from mta.fused import apply_fused_kernels

CUDA = torch.device("cuda")  # a device name only: nothing here touches a GPU


def _model(model_type: str):
    return types.SimpleNamespace(config=types.SimpleNamespace(model_type=model_type))


@pytest.fixture
def liger(monkeypatch):
    """A stand-in liger_kernel.transformers recording each patch call: [(patch, kwargs)]."""
    calls = []
    fake = types.ModuleType("liger_kernel.transformers")
    for family in ("llama", "qwen2", "gemma"):
        name = f"apply_liger_kernel_to_{family}"
        setattr(fake, name, lambda name=name, **kw: calls.append((name, kw)))
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    monkeypatch.setattr("mta.fused.version", lambda name: {"liger-kernel": "9.9"}[name])
    return calls


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_liger_patches_the_blocks_of_the_model_s_family_and_not_its_loss(liger, family):
    model = _model(family)
    assert apply_fused_kernels(model, "liger", CUDA) == {"library": "liger-kernel", "version": "9.9",
                                                          "kernels": ["rms_norm", "swiglu", "rope"]}
    assert liger == [(f"apply_liger_kernel_to_{family}", {"rope": True, "rms_norm": True, "swiglu": True,
                                                          "cross_entropy": False,
                                                          "fused_linear_cross_entropy": False, "model": model})]


def test_none_leaves_the_model_alone_and_the_rest_is_refused_in_one_line(liger, monkeypatch):
    assert apply_fused_kernels(_model("llama"), "none", torch.device("cpu")) is None
    assert liger == []
    cases = [(_model("llama"), "liger", torch.device("cpu"), "runs on CUDA only"),
             (_model("gemma"), "liger", CUDA, "has no patch for 'gemma' models (it has llama, qwen2)"),
             (_model("llama"), "triton", CUDA, "must be one of none, liger, not 'triton'")]
    for model, kind, device, message in cases:
        with pytest.raises(MtaError, match=re.escape(message)) as e:
            apply_fused_kernels(model, kind, device)
        assert e.value.fields == ("BackboneConfig.fused_kernels",) and "\n" not in str(e.value)
    assert liger == []
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)  # not installed
    with pytest.raises(MtaError, match=r"needs the liger-kernel package \(pip install 'mta\[liger\]'\)"):
        apply_fused_kernels(_model("llama"), "liger", CUDA)


def test_the_cli_refuses_liger_on_the_cpu_before_loading_a_model(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--users", "6", "--queries", "1"]) == 0

    def no_load(*a, **kw):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("mta.models.load_llm", no_load)
    out = tmp_path / "bank"
    rc = main(["bank", "build", "--data", str(data), "--out", str(out), "--anchors", "2", "--device", "cpu",
               "--fused-kernels", "liger"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1, err
    assert "runs on CUDA only" in err[0] and "(--fused-kernels)" in err[0]
    assert not out.exists() or not any(out.iterdir())
