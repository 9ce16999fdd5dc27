"""AdamW over slot-stacked adapters: every slot (anchor or user) is its own optimiser.

No library offers this: torch's AdamW keeps one step count per tensor and moves every
element with non-zero momentum even when its gradient is zero, so a slot that sits out
a step would still drift. Here each slot has its own step count and learning rate and
only the slots named in ``step`` move, which makes training N adapters in one pass
give the same weights as training each alone with ``torch.optim.AdamW`` (tested).
The update is torch's AdamW, element for element (when every slot steps alike, in
multi-tensor calls: the same up to float rounding).
"""

from __future__ import annotations

import math

import torch


class SlotAdamW:
    def __init__(self, params: list[torch.nn.Parameter], n_slots: int, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        for p in params:
            if p.shape[0] != n_slots:
                raise ValueError(f"every parameter must have {n_slots} slots first, got {tuple(p.shape)}")
        self.params = params
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.steps = torch.zeros(n_slots, dtype=torch.long)
        # State exists only for the parameters handed in (the trainable adapters).
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.exp_avg + self.exp_avg_sq)

    @torch.no_grad()
    def step(self, slots: list[int], lrs: list[float]) -> None:
        if not slots:
            return
        b1, b2 = self.betas
        idx = torch.tensor(slots, dtype=torch.long)
        self.steps[idx] += 1
        t = self.steps[idx].to(torch.float64)
        bc1 = 1 - b1 ** t
        bc2_sqrt = (1 - b2 ** t).sqrt()
        lr = torch.tensor(lrs, dtype=torch.float64)
        # every slot, in order (a bank's anchors or a pass's users all stepping together):
        # the update runs on the tensors in place, without gathering and scattering slots
        whole = slots == list(range(len(self.steps)))
        live = [(p, m, v) for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq) if p.grad is not None]
        if whole and len(set(zip(lrs, self.steps.tolist()))) == 1:
            # every slot at the same step count and rate (a bank or a pass of users with the
            # same number of steps): the factors are scalars, and each of the update's
            # operations is one multi-tensor launch over every parameter of a device and
            # dtype instead of one a parameter (a bank of Llama-3-8B's shape has 448)
            self._step_uniform(live, float(lr[0]), float(bc1[0]), float(bc2_sqrt[0]))
            return
        factors: dict = {}  # per device and dtype: the per-slot factors, moved once
        for p, m, v in live:
            key = (p.device, p.dtype)
            if key not in factors:
                factors[key] = ((1 - lr * self.weight_decay).to(p.dtype).to(p.device),
                                bc2_sqrt.to(p.dtype).to(p.device), (lr / bc1).to(p.dtype).to(p.device),
                                idx.to(p.device))
            decay, bc2_d, step_d, dev_idx = factors[key]
            shape = (len(slots),) + (1,) * (p.dim() - 1)
            if whole:
                g, ps, ms, vs = p.grad, p.data, m, v
            else:
                g = p.grad.index_select(0, dev_idx)
                ps = p.data.index_select(0, dev_idx)
                ms = m.index_select(0, dev_idx)
                vs = v.index_select(0, dev_idx)
            if self.weight_decay:
                ps.mul_(decay.view(shape))
            ms.lerp_(g, 1 - b1)
            vs.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (vs.sqrt() / bc2_d.view(shape)).add_(self.eps)
            ps.sub_(step_d.view(shape) * ms / denom)
            if not whole:
                p.data.index_copy_(0, dev_idx, ps)
                m.index_copy_(0, dev_idx, ms)
                v.index_copy_(0, dev_idx, vs)

    def _step_uniform(self, live: list, lr: float, bc1: float, bc2_sqrt: float) -> None:
        """The per-tensor path's operations, in its order, each as one multi-tensor call per
        device and dtype, each factor rounded to the parameters' dtype first as that path's
        factor tensors are (a division by a scalar may round differently from one by a
        tensor: equal up to float rounding, tested against torch's AdamW)."""
        b1, b2 = self.betas
        groups: dict = {}
        for p, m, v in live:
            groups.setdefault((p.device, p.dtype), []).append((p, m, v))
        for (_, dtype), group in groups.items():
            rounded = _rounding(dtype)
            ps = [p.data for p, _, _ in group]
            gs = [p.grad for p, _, _ in group]
            ms = [m for _, m, _ in group]
            vs = [v for _, _, v in group]
            if self.weight_decay:
                torch._foreach_mul_(ps, rounded(1 - lr * self.weight_decay))
            torch._foreach_lerp_(ms, gs, 1 - b1)
            torch._foreach_mul_(vs, b2)
            torch._foreach_addcmul_(vs, gs, gs, value=1 - b2)
            denom = torch._foreach_sqrt(vs)
            torch._foreach_div_(denom, rounded(bc2_sqrt))
            torch._foreach_add_(denom, self.eps)
            upd = torch._foreach_mul(ms, rounded(lr / bc1))
            torch._foreach_div_(upd, denom)
            torch._foreach_sub_(ps, upd)


def _rounding(dtype: torch.dtype):
    """x -> x as a value of ``dtype`` (a float64 factor cast to the parameters' dtype)."""
    return lambda x: float(torch.tensor(x, dtype=torch.float64).to(dtype))


def lr_multiplier(step: int, total: int, warmup_ratio: float, schedule: str) -> float:
    """Learning-rate factor for optimiser step ``step`` (0-based) of ``total``.

    Linear warm-up over ceil(warmup_ratio * total) steps, reaching 1 on its last step
    (so no step runs at lr 0, which matters when a user has only 2 steps), then cosine
    (or linear) decay towards 0, or constant.
    """
    warm = math.ceil(warmup_ratio * total)
    if step < warm:
        return (step + 1) / warm
    if schedule == "constant":
        return 1.0
    span = max(1, total - warm)
    progress = (step - warm) / span
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))
