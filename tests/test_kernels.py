"""The dense layout's Triton kernel (mta.engine.kernels) on the CPU, through Triton's
interpreter (a process of its own: TRITON_INTERPRET must be set before the kernel is
defined). On CUDA the `gpu` tests run it natively (tests/test_gpu.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # subprocesses, servers, Ray, benchmarks: the integration tier

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
    assert kernels.ENABLED == (os.environ.get("MTA_DENSE_KERNEL", "1") != "0")  # on unless turned off
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


def test_the_kernel_times_its_tiles_per_bucket_of_rows_and_the_warm_up_times_them_all(monkeypatch):
    # Timed per exact rows x tokens, each prefill of a new size timed 6 configs at every layer
    # shape under requests (docs/serving.md, run S): the autotuner's key is the bucket
    pytest.importorskip("triton")
    import torch

    from mta.engine import _dense_mix_triton as tk
    from mta.engine import kernels

    assert [kernels.row_bucket(m) for m in (1, 16, 17, 64, 65, 200, 256, 257)] == [16, 16, 32, 64, 128, 256, 256, 512]
    assert list(tk.tuned.keys) == ["MB", "OUT", "COLS"]
    seen = []

    class Autotuned:  # stands in for tk.tuned (which times on CUDA only): what it is called with
        def __getitem__(self, grid):
            return lambda *args, **kw: seen.append(args)

    monkeypatch.setattr(tk, "tuned", Autotuned())
    monkeypatch.setattr(kernels, "INTERPRET", False)
    for m in (3, 9, 40, 256):
        kernels.launch(torch.randn(m, 10), torch.randn(m, 4), torch.randn(6, 4), 1)
    mb = tk.dense_mix_kernel.arg_names.index("MB")
    assert [a[mb] for a in seen] == [16, 16, 64, 256]
    assert [a[tk.dense_mix_kernel.arg_names.index("M")] for a in seen] == [3, 9, 40, 256]

    launched = []
    monkeypatch.setattr(kernels, "launch", lambda full, w, b, tokens, config=None:
                        launched.append((full.shape, w.shape, b.shape, tokens, full.dtype, config)))
    assert kernels.tune({(6, 4), (8, 4), (6, 4)}, torch.float32, torch.device("cpu")) == 0  # no CUDA: nothing
    monkeypatch.setattr(kernels, "usable", lambda full, w, b: True)
    monkeypatch.setattr(kernels, "_TUNED", set())
    assert kernels.tune([(6, 4), (8, 4), (6, 4)], torch.bfloat16, torch.device("cpu")) == 2 * len(kernels.BUCKETS)
    assert launched == [((m, o + 4), (m, 4), (o, 4), 1, torch.bfloat16, None) for o in (6, 8) for m in kernels.BUCKETS]
    # a second warm-up (the server warms mixed rows, then a base row) times only what is new
    assert kernels.tune([(8, 4), (6, 4)], torch.bfloat16, torch.device("cpu")) == 0
    assert kernels.tune([(8, 4), (5, 4)], torch.bfloat16, torch.device("cpu")) == len(kernels.BUCKETS)
    monkeypatch.setattr(kernels, "INTERPRET", True)  # the interpreter has no timer
    assert kernels.tune([(6, 4)], torch.float32, torch.device("cpu")) == 0


def test_the_kernel_check_reports_its_worst_config(monkeypatch):
    # kernels.worst_error, the check behind the tests and benchmarks/dense_mix.py: a config off
    # by 0.5 (or giving NaN) is the one reported, whichever configs around it are exact
    import math

    import torch

    from mta.engine import kernels

    g = torch.Generator().manual_seed(0)
    full, w, b = torch.randn(6, 12, generator=g), torch.randn(6, 4, generator=g), 0.1 * torch.randn(8, 4, generator=g)
    for bad, off in ((kernels.CONFIGS[2], 0.5), (None, float("nan"))):
        monkeypatch.setattr(kernels, "launch", lambda f, w_, b_, t, config=None, bad=bad, off=off:
                            kernels.dense_mix_reference(f, w_, b_, t) + (off if config == bad else 0.0))
        err, where = kernels.worst_error(full, w, b, 1)
        assert where == bad
        # 0.5 over max(|want|, 1): 0.5 where |want| <= 1 (some of the 48 outputs, at this seed)
        assert math.isnan(err) if math.isnan(off) else err == pytest.approx(off)
