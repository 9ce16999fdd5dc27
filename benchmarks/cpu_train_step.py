"""Training throughput of the engine on CPU with a real model, fp32 against bf16, in one run.

Times forward+backward of one adapter over leave-one-out examples of synthetic users
(target positions only, as `train_jobs` does), after one warm-up step per dtype, and
prints tokens/s and the bf16/fp32 time ratio. This is the measurement behind the
fp32 default of the CLI and the CPU cost estimate in docs/evaluation.md.

    .venv/bin/python benchmarks/cpu_train_step.py [--model smollm2-135m] [--rows 8] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mta.data.synth import synth_users  # noqa: E402
from mta.engine.engine import AdapterEngine, EngineSpec, Row  # noqa: E402
from mta.engine.train import pad_batch, target_token_loss  # noqa: E402
from mta.examples import loo_examples  # noqa: E402
from mta.models import load_llm  # noqa: E402
from mta.tasks import get_task  # noqa: E402


def step_seconds(model_name: str, dtype: torch.dtype, rows: int) -> tuple[float, int]:
    model, tok = load_llm(model_name, dtype=dtype)
    examples = loo_examples(get_task("synth"), synth_users(1)[0], tok, 1, 512)[:rows]
    ids, mask, labels = pad_batch(examples, tok.pad_token_id, "cpu")
    eng = AdapterEngine(model, EngineSpec(n_anchors=1, rank=8, alpha=16))
    eng.init_bank()
    eng.trainable("bank")
    model.train()

    def step() -> float:
        t = time.perf_counter()
        with eng.route([Row([0], [1.0])] * len(examples)):
            target_token_loss(model, ids, mask, labels).sum().backward()
        for p in eng.bank_parameters():
            p.grad = None
        return time.perf_counter() - t

    step()
    return step(), int(mask.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/cpu_train_step.json"))
    a = ap.parse_args()
    res = {"model": a.model, "rows": a.rows, "threads": torch.get_num_threads(), "torch": torch.__version__}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        sec, tokens = step_seconds(a.model, dt, a.rows)
        res[name] = {"seconds_per_step": sec, "tokens": tokens, "tokens_per_s": tokens / sec}
        print(f"{name}: {sec:8.2f} s per step, {tokens} tokens, {tokens / sec:8.1f} tokens/s", flush=True)
    res["bf16_over_fp32_time"] = res["bf16"]["seconds_per_step"] / res["fp32"]["seconds_per_step"]
    print(f"bf16 / fp32 time: {res['bf16_over_fp32_time']:.1f}x")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
