"""Greedy decoding with the whole decode step captured once in a CUDA graph.

`GraphDecoder` owns a transformers ``StaticCache`` for ``batch`` rows of up to ``max_len``
positions and a handful of fixed buffers (the next input token, each row's position, the
cache position, a 4D attention mask, the tokens decoded so far and a step counter). One
decode step reads those buffers, runs the model for one token per row, takes the argmax
and advances every buffer in place, all on the GPU, so a step is one ``graph.replay()``
with no host work and no host-device sync: the loop runs at the speed of the kernels,
which is what brings a step near its memory floor (docs/performance.md).

Prefill runs eagerly (its length varies); it writes the prompt's keys and values into the
same cache tensors and resets the buffers in place, so one captured step serves every
later batch of the same size. Rows past their end of sequence keep decoding (a batch
never changes shape); their tokens after it are replaced by the pad id, as transformers'
``generate`` does. Every row is computed independently (rows never attend to each other),
so the result is token-for-token what ``generate`` gives with greedy decoding.

With the adapter engine, run it inside ``mta.decoding.fixed.pinned(engine, rows, batch,
width)`` (the layers read their per-row factors from fixed buffers) or ``fixed.dense(engine,
rows, batch)`` (every table as the columns of two dense matmuls, each row's coefficients over
them; fewer bytes per step when many rows share a bank): a new batch of users is a
refill of those buffers, not a new capture. The decoder checks that the buffers it
captured are still the ones in place (a pin with another shape reallocates them) and
captures again if not.

On a CPU (or with ``graph=False``) the same step runs eagerly: the tests compare it with
``generate`` there, and on CUDA (a ``gpu`` test) the captured step with the eager one.

``compile=True`` runs the step through ``torch.compile`` (inductor, no CUDA graphs of its
own) before it is captured: the captured graph then replays inductor's fused kernels
instead of the eager step's many small ones (a norm is one kernel instead of six, the
rotary embedding and the MLP's activation one each), which is what the captured eager
step spends most of its time over the memory floor on (docs/performance.md). Any other
string names a dynamo backend (the CPU tests use ``"aot_eager"``: the same tracing and
functionalisation, no code generation). The compile happens at the first capture, once per
decoder (minutes at 8B shape); a decoder's later batches reuse it. ``compile_mode`` passes
an inductor mode through: ``"max-autotune-no-cudagraphs"`` also times Triton templates
against cuBLAS for every matmul shape of the step and can fuse the dense layout's per-row
mixing and the residual add into the B side's matmul (longer compile; benchmarks/gpu.py
--autotune measures what it gives).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Sequence

import torch
from torch import nn
from transformers import StaticCache

from mta.decoding.attention import allow_recompiles, cache_kwarg, decode_attention, windows_possible
from mta.decoding.routing import weight_moves

log = logging.getLogger(__name__)
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")  # inductor modes the decoder can capture
MAX_GRAPHS = 32  # captured graphs a decoder keeps (windows x routing layouts; each holds its own memory pool)


class GraphDecoder:
    def __init__(self, model: nn.Module, batch: int, max_len: int, graph: bool | None = None,
                 buffers: Sequence[torch.Tensor] = (), compile: bool | str = False,
                 compile_mode: str | None = None, keep_logits: bool = False, windowed: bool = False,
                 min_window: int = 64):
        """``buffers``: tensors the captured step reads that others may reallocate (the
        engine's fixed-routing buffers, see ``mta.decoding.fixed.captured_buffers``); a change
        of any of them re-captures. ``compile``: True for inductor, or a dynamo backend's
        name; ``compile_mode``: an inductor mode without CUDA graphs of its own (module
        docstring). ``keep_logits``: the step keeps its float32 logits in ``logits`` (rows
        that sample) and records no tokens in ``out`` (the slot decoder's rows keep their own).
        ``windowed``: a step reads only the cache's first ``window`` positions (``set_window``;
        SDPA models, else the whole cache), one captured graph per window (powers of two from
        ``min_window``); the compiled step is compiled twice at most (the first window, then
        once with the window symbolic)."""
        if batch < 1 or max_len < 2:
            raise ValueError(f"a decoder needs at least 1 row and 2 positions, not {batch} x {max_len}")
        if compile is not False and not (compile is True or isinstance(compile, str) and compile):
            raise ValueError(f"compile must be True, False or a dynamo backend's name, not {compile!r}")
        if compile_mode is not None and (compile is not True or compile_mode not in COMPILE_MODES):
            raise ValueError(f"compile_mode must be one of {', '.join(COMPILE_MODES)} with compile=True (modes "
                             f"with inductor's own CUDA graphs do not nest in the decoder's), not {compile_mode!r}")
        self.model = model
        self.batch, self.max_len = batch, max_len
        dev = next(model.parameters()).device
        self.device = dev
        self.graph_on = dev.type == "cuda" if graph is None else graph
        if self.graph_on and dev.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA model")
        self.windowed = windowed and windows_possible(model)
        self.window, self.min_window = max_len, min_window
        # one spare position past the largest window: a window never spans the whole cache, so
        # dynamo's symbolic window is never specialised to the cache's length (a third compile)
        cache_len = max_len + 1 if self.windowed else max_len
        self.cache = StaticCache(config=model.config, max_cache_len=cache_len)
        z = dict(dtype=torch.long, device=dev)
        self.tok = torch.zeros(batch, 1, **z)        # the next input token of each row
        self.pos = torch.zeros(batch, 1, **z)        # its position id
        self.cpos = torch.zeros(1, **z)              # its cache slot (the same for every row)
        # the decode steps' attention mask, 4D and additive (0 attend, dtype min never): a
        # prepared 4D mask is used as given, where a 2D one makes transformers read its values
        # on the host (to skip the mask when nothing is padded), which a graph cannot capture
        dtype = next(model.parameters()).dtype
        self.neg = torch.finfo(dtype).min
        self.bias = torch.full((batch, 1, 1, cache_len), self.neg, dtype=dtype, device=dev)
        self.out = torch.zeros(batch, max_len, **z)  # tokens decoded so far
        self.step_i = torch.zeros(1, **z)            # how many
        self.keep_logits = keep_logits
        self.logits: torch.Tensor | None = None      # the last step's, with keep_logits
        head = model.get_output_embeddings() if keep_logits else None
        if isinstance(head, nn.Linear):  # allocated here, not in the step: one compile fewer
            self.logits = torch.empty(batch, head.out_features, dtype=torch.float32, device=dev)
        self.buffers = list(buffers)
        # (window, the buffers' addresses and shapes) -> (its graph, weight_moves() at capture):
        # a graph per window and per routing layout's buffers (the server switches between a
        # mixed-user and a base-only layout), the least recently used out past MAX_GRAPHS
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, int]] = {}
        self.captures = 0
        self.kw = cache_kwarg(model)
        # the compiled step, or None: the plain method is looked up at each step (a bound method kept
        # here would make a reference cycle, and the decoder's static cache would outlive its last
        # user until a full garbage collection)
        self._compiled = None
        self.compiling = compile is not False  # until the first step has run (and compiled)
        if compile is not False:
            # every decoder shape (a pool's buckets, the layouts) is a graph of its own for
            # dynamo, which past its recompile limit (8 by default) runs the step eagerly
            # without a word: room for a decoder's routing layouts and windows
            allow_recompiles(64)
            # dynamic=False: a decoder's shapes never change (a windowed one's window does:
            # dynamo's automatic dynamic shapes then compile once more, the window symbolic);
            # inductor's own CUDA graphs stay off (default mode), the decoder captures the
            # compiled step itself
            self._compiled = torch.compile(self._step_inner, dynamic=None if self.windowed else False,
                                           mode=compile_mode, backend="inductor" if compile is True else compile)

    @torch.no_grad()
    def _step(self) -> None:
        t = time.perf_counter()
        if self.compiling:  # long and silent otherwise: say so (the server's first requests wait on it)
            log.info("compiling the decode step for %d rows x %d positions (torch.compile; a minute or two at "
                     "8B shape)", self.batch, self.max_len)
        with decode_attention(self.model, self.windowed):
            (self._step_inner if self._compiled is None else self._compiled)()
        if self.compiling:
            self.compiling = False
            log.info("decode step compiled in %.0f s", time.perf_counter() - t)

    def _step_inner(self) -> None:
        self.bias.index_fill_(3, self.cpos, 0.0)  # the slot this step writes joins what it attends to
        mask = self.bias[..., :self.window] if self.windowed else self.bias
        logits = self.model(input_ids=self.tok, attention_mask=mask, position_ids=self.pos,
                            cache_position=self.cpos, use_cache=True, **{self.kw: self.cache}).logits[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        if self.keep_logits:
            if self.logits is None:  # first (eager) step: allocate; a captured step writes into it
                self.logits = torch.empty_like(logits, dtype=torch.float32)
            self.logits.copy_(logits)
        else:
            self.out.index_copy_(1, self.step_i, nxt)
        self.tok.copy_(nxt)
        self.pos.add_(1)
        self.cpos.add_(1)
        if not self.keep_logits:
            self.step_i.add_(1)

    def _cache_counters(self) -> list[torch.Tensor]:
        """The cache layers' own write position where they keep one as a tensor
        (transformers 5.24 writes at that counter rather than at ``cache_position``)."""
        return [c for layer in getattr(self.cache, "layers", [])
                if isinstance(c := getattr(layer, "cumulative_length", None), torch.Tensor)]

    def _counters(self) -> list[torch.Tensor]:
        """What a step advances: our buffers and the cache's counters."""
        return [self.tok, self.pos, self.cpos, self.out, self.step_i, self.bias, *self._cache_counters()]

    def window_for(self, positions: int) -> int:
        """The window a step that reads ``positions`` cache positions runs under: the next
        power of two from ``min_window``, at most ``max_len`` (a few windows, each a captured
        graph)."""
        if positions > self.max_len:
            raise ValueError(f"a step reading {positions} positions exceeds the decoder's {self.max_len}")
        return min(self.max_len, max(self.min_window, 1 << (positions - 1).bit_length()))

    def windows(self) -> list[int]:
        """Every window ``window_for`` can give (the server captures each before it is ready)."""
        if not self.windowed:
            return [self.max_len]
        out, w = [], self.window_for(1)
        while w < self.max_len:
            out.append(w)
            w = self.window_for(w + 1)
        return [*out, self.max_len]

    def set_window(self, window: int) -> None:
        """Steps read the cache's first ``window`` positions (a windowed decoder; the next
        step's position must lie inside)."""
        if self.windowed:
            if not 1 <= window <= self.max_len:
                raise ValueError(f"a window of {window} positions in a decoder of {self.max_len}")
            self.window = window

    def set_position(self, t: int) -> None:
        """The shared write position, in our buffer and in the cache layers' own counters."""
        self.cpos.fill_(t)
        for c in self._cache_counters():
            c.fill_(t)

    def _state(self) -> list[torch.Tensor]:
        return [t.clone() for t in self._counters()]

    def _restore(self, saved: list[torch.Tensor]) -> None:
        for t, s in zip(self._counters(), saved):
            t.copy_(s)

    def _capture(self, key: tuple) -> None:
        saved = self._state()
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up (allocations, lazy inits, autotuning) off the graph
            for _ in range(2):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._restore(saved)  # the warm-up's keys and values sit in slots the real steps overwrite
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        self._graphs.pop(key, None)
        self._graphs[key] = (graph, weight_moves())
        while len(self._graphs) > MAX_GRAPHS:
            self._graphs.pop(next(iter(self._graphs)))
        self.captures += 1

    def _key(self) -> tuple:
        """The current window and the buffers' addresses and shapes (a buffer freed and
        another allocated at its address with another shape is not taken for it)."""
        return self.window, tuple((b.data_ptr(), tuple(b.shape)) for b in self.buffers)

    def stale(self) -> bool:
        """Whether the current window's captured step is missing or reads memory that moved
        since: an adapter buffer reallocated, or a base weight moved (the engine's dense
        layout moves the base weights into a larger matrix when it folds the adapters' A
        columns into them)."""
        return self._stale(self._key())

    def _stale(self, key: tuple) -> bool:
        got = self._graphs.get(key)
        return got is None or weight_moves() != got[1]

    def advance(self) -> None:
        """One decode step: replayed from the captured graph (captured first, or again when
        the adapter buffers or the weights it reads were reallocated), or run eagerly
        without graphs."""
        if not self.graph_on:
            self._step()
            return
        key = self._key()  # once a step: it reads every buffer's address (hundreds at 8B)
        if self._stale(key):
            self._capture(key)
        else:
            self._graphs[key] = self._graphs.pop(key)  # most recently used last
        self._graphs[key][0].replay()

    def close(self) -> None:
        """Give the static cache and the captured graphs back now; the decoder cannot step
        after. A compiled step holds its decoder (through the method it compiled), and
        dynamo's trace of it the cache, in reference cycles that only a full garbage
        collection frees, which a long-lived process seldom runs: without this a replaced
        compiled decoder's cache (GBs at 8B) stays allocated beside its successor's. So a
        compiled decoder's close runs one (rare: a decoder is replaced, not made per batch)."""
        compiled = self._compiled is not None
        self._graphs.clear()
        self._compiled = None
        self.cache = None
        if compiled:
            gc.collect()

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Run the (left-padded) prompts into the cache; the first new token lands in
        ``out[:, 0]``."""
        b, p = input_ids.shape
        if b != self.batch:
            raise ValueError(f"a decoder of {self.batch} rows got {b} prompts; pad the batch to its size")
        if p >= self.max_len:
            raise ValueError(f"prompts of {p} tokens leave no room in {self.max_len} positions")
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device).long()
        self.bias.fill_(self.neg)
        self.bias[:, 0, 0, :p].masked_fill_(attention_mask.bool(), 0.0)
        pos = (attention_mask.cumsum(-1) - 1).clamp_(min=0)  # as generate numbers left-padded rows
        pos.masked_fill_(attention_mask == 0, 1)
        self.cache.reset()  # in place: the captured step keeps reading the same tensors
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                            cache_position=torch.arange(p, device=self.device), use_cache=True, logits_to_keep=1,
                            **{self.kw: self.cache}).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        self.out.zero_()
        self.out[:, :1].copy_(nxt)
        self.tok.copy_(nxt)
        self.pos.copy_(pos[:, -1:] + 1)
        self.cpos.fill_(p)
        self.step_i.fill_(1)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int = 0,
                 check_every: int = 16) -> torch.Tensor:
        """Greedy: the prompts followed by ``max_new_tokens`` new tokens per row (as
        ``generate`` returns them; after a row's end of sequence, pad). With an end of
        sequence the loop stops early once every row has one, checked every
        ``check_every`` steps (the only host-device syncs)."""
        p = input_ids.shape[1]
        if p + max_new_tokens > self.max_len:
            raise ValueError(f"{p} prompt + {max_new_tokens} new tokens exceed the decoder's {self.max_len}")
        self.prefill(input_ids, attention_mask)
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []),
                           dtype=torch.long, device=self.device)
        n = 1
        while n < max_new_tokens:
            self.advance()
            n += 1
            if len(eos) and n % check_every == 0 and bool(torch.isin(self.out[:, :n], eos).any(-1).all()):
                break
        new = self.out[:, :max_new_tokens].clone()
        if len(eos):
            hit = torch.isin(new, eos)
            after = (hit.cumsum(-1) - hit.long()) > 0  # strictly after the first end of sequence
            new.masked_fill_(after, pad_token_id)
            if n < max_new_tokens:  # stopped early: what was never decoded is padding too
                new[:, n:] = pad_token_id
        return torch.cat([input_ids.to(self.device), new], dim=1)
