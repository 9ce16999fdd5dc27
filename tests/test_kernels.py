"""The dense layout's Triton kernel (mta.engine.kernels) on the CPU, through Triton's
interpreter (a process of its own: TRITON_INTERPRET must be set before the kernel is
defined). On CUDA the `gpu` tests run it natively (tests/test_gpu.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_dense_mix_kernel_in_the_interpreter_equals_torch():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "tests.kernel_check"], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ok dense decode through the kernel" in r.stdout
    assert "ok the compiled dense step through the custom op equals generate" in r.stdout


def test_the_kernel_is_used_only_where_it_applies_and_checks_its_shapes(monkeypatch):
    import torch

    from mta.engine import kernels

    full, w, b = torch.randn(4, 10), torch.randn(4, 6), torch.randn(4, 6)
    assert kernels.ENABLED == (os.environ.get("MTA_DENSE_KERNEL") == "1")  # opt-in until run on a GPU
    monkeypatch.setattr(kernels, "ENABLED", False)
    assert not kernels.usable(full, w, b)
    monkeypatch.setattr(kernels, "ENABLED", True)
    assert kernels.usable(full, w, b) == (kernels.HAVE_TRITON and kernels.INTERPRET)
    assert not kernels.usable(full, w.double(), b)  # mixed dtypes: torch's ops
    assert not kernels.usable(torch.randn(kernels.MAX_ROWS + 1, 10), w, b)  # a prefill: cuBLAS
    kernels.check_shapes(full, w, b, 1)
    kernels.check_shapes(full, w[:2], b, 2)  # two tokens per row: rows 0-1 and 2-3 share a row of w
    for bad in ((full, w, torch.randn(5, 6), 1), (full, w[:1], b, 2), (full, torch.randn(4, 5), b, 1)):
        with pytest.raises(ValueError, match="do not fit together"):
            kernels.check_shapes(*bad)
