"""Training memory: the micro-batches a step is split into (rows and padded tokens), the
token budget measured on CUDA from one probe micro-batch when not given, halved after an
out-of-memory step, and the process's peak memory across the probes' resets."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from mta.engine.config import TrainConfig
from mta.errors import ResourceError

log = logging.getLogger(__name__)


def micro_batches(lengths: Sequence[int], max_rows: int | None, token_budget: int | None) -> list[list[int]]:
    """Split row indices (already sorted longest first) into micro-batches of at most
    ``max_rows`` rows and ``token_budget`` padded tokens (rows x the first, longest
    row). A row longer than the budget goes alone."""
    out: list[list[int]] = []
    cur: list[int] = []
    for i, n in enumerate(lengths):
        width = lengths[cur[0]] if cur else n
        if cur and ((max_rows and len(cur) >= max_rows) or (token_budget and (len(cur) + 1) * width > token_budget)):
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


class Budget:
    """The micro-batch token budget, measured on CUDA when not given (see TrainConfig)."""

    PROBE_ROWS = 4
    # The share of the room a micro-batch's measured bytes may fill: the rest is for the
    # allocator's own overhead (segments split among activations of many sizes). At 0.8,
    # run U's Last.fm OPPU steps met a 17.2 GiB cap with 14.9 GiB in use: the planned
    # 7.4 GiB micro-batch needed at least 31% more reserved than in use (docs/architecture.md)
    HEADROOM = 0.7

    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.value = cfg.token_budget
        self.cap = cfg.memory_cap
        self.auto = cfg.token_budget is None and device.type == "cuda"
        self.device = device
        self.measured = not self.auto

    def next_size(self, lengths: list[int], max_rows: int | None) -> int:
        """How many of ``lengths`` (longest first) the next micro-batch takes."""
        if not self.measured:  # the probe: a few of the longest rows
            return min(self.PROBE_ROWS, max_rows or self.PROBE_ROWS, len(lengths))
        return len(micro_batches(lengths, max_rows, self.value)[0])

    def start_probe(self) -> int:
        reset_peak(self.device)
        return torch.cuda.memory_allocated(self.device)

    def end_probe(self, before: int, tokens: int) -> None:
        per_token = max(1, (torch.cuda.max_memory_allocated(self.device) - before) // max(1, tokens))
        # the cache's wholly free segments go back first: what stays reserved is segments in
        # use, whose free pieces a micro-batch's large activations mostly cannot take
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(self.device)
        held = torch.cuda.memory_allocated(self.device)
        reserved = torch.cuda.memory_reserved(self.device)
        room = free + reserved - held
        if self.cap is not None:
            # what this process may still take under its cap (the cap bounds what torch's
            # allocator reserves, not what it hands out: planning into cap - held met the cap
            # at the first full micro-batch in run S's tunes, docs/evaluation.md)
            room = min(room, self.cap - reserved)
        self.value = max(tokens, int(self.HEADROOM * max(0, room) / per_token))
        self.measured = True
        log.info("training micro-batch budget: %d padded tokens (%.0f KiB per token measured; room %.1f GiB, "
                 "%.1f GiB reserved, %.1f GiB in use)", self.value, per_token / 1024, room / 2**30,
                 reserved / 2**30, held / 2**30)

    def halve(self, longest: int) -> bool:
        """After an out-of-memory step: halve the budget; False when it cannot go lower."""
        if not self.auto or self.value is None or self.value // 2 < longest:
            return False
        self.value //= 2
        cuda = self.device.type == "cuda"
        log.warning("out of memory: retrying the step with micro-batches of %d padded tokens (at the error: "
                    "%.1f GiB reserved, %.1f GiB peak in use, cap %s)", self.value,
                    torch.cuda.memory_reserved(self.device) / 2**30 if cuda else 0.0,
                    torch.cuda.max_memory_allocated(self.device) / 2**30 if cuda else 0.0,
                    "none" if self.cap is None else f"{self.cap / 2**30:.1f} GiB")
        return True


# The process's peaks before the last reset of torch's counters (a probe resets them to
# measure one micro-batch): `run_peak` reports the whole run's, not the last probe's.
_PEAKS: dict[str, tuple[int, int]] = {}


def _current_peak(device: torch.device) -> tuple[int, int]:
    return int(torch.cuda.max_memory_allocated(device)), int(torch.cuda.max_memory_reserved(device))


def reset_peak(device: torch.device) -> None:
    """Reset torch's peak-memory counters of ``device``, keeping what they held for `run_peak`."""
    before, now = _PEAKS.get(str(device), (0, 0)), _current_peak(device)
    _PEAKS[str(device)] = (max(before[0], now[0]), max(before[1], now[1]))
    torch.cuda.reset_peak_memory_stats(device)


def run_peak(device: torch.device) -> tuple[int, int]:
    """Peak bytes (allocated, reserved by torch's caching allocator) on the CUDA ``device`` in
    this process so far, across `reset_peak`'s resets."""
    before, now = _PEAKS.get(str(device), (0, 0)), _current_peak(device)
    return max(before[0], now[0]), max(before[1], now[1])


def alloc_retries(device: torch.device) -> int:
    """How often, so far in this process, torch's CUDA caching allocator met the memory cap:
    a device allocation that failed, after which it freed its cached blocks and tried again
    (``num_alloc_retries``); 0 off CUDA. Each is a device synchronisation and a free of
    every cached block: many in one stage mean the stage ran at the cap."""
    if device.type != "cuda":
        return 0
    return int(torch.cuda.memory_stats(device).get("num_alloc_retries", 0))


def oom_error(device: torch.device, tokens: int, rows: int) -> ResourceError:
    peak = total = 0.0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
    return ResourceError(
        f"out of {device.type} memory training a micro-batch of {rows} rows and {tokens} padded tokens "
        f"(peak {peak:.1f} GiB of {total:.1f} GiB): lower the token budget or the example length, or turn on "
        "gradient checkpointing, or give it more with --gpu-memory",
        ("BackboneConfig.token_budget", "BackboneConfig.gpu_memory", "BankConfig.max_length",
         "BackboneConfig.gradient_checkpointing"))
