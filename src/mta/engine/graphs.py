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

With the adapter engine, run it inside ``AdapterEngine.pinned(rows, batch, width)`` (the
layers read their per-row factors from fixed buffers) or ``AdapterEngine.dense(rows,
batch)`` (every table as the columns of two dense matmuls, each row's coefficients over
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

import contextlib
import inspect
import logging
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, StaticCache
from transformers.integrations import sdpa_attention
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from mta.engine.layer import weight_moves

log = logging.getLogger(__name__)
GQA_DECODE = "mta_gqa_decode"
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")  # inductor modes the decoder can capture


def gqa_decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
    """SDPA for one new token per row without copying the cache. With a mask, the SDPA path
    of transformers before ``pack_gqa`` (5.17, the GPU image's version) repeats every
    key/value head for its query heads (``repeat_kv``): a copy of the whole cache per layer
    per step, ~0.23 ms each, 64 per step, on the H200 at 8B shape with B=64
    (docs/performance.md). Here a key/value head's query heads become that many query
    positions of one head (a step's single token has nothing causal to mask among them;
    the mask says which cache slots each row sees), so the cache is read in place.
    Prompts (more than one new token) take transformers' SDPA."""
    b, h, q, d = query.shape
    kvh = key.shape[1]
    if q != 1 or h == kvh or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kw)
    mask = attention_mask[:, :, :, : key.shape[-2]] if attention_mask is not None else None
    out = F.scaled_dot_product_attention(query.reshape(b, kvh, h // kvh, d), key, value, attn_mask=mask,
                                         scale=scaling)  # (b, kv heads, query heads per kv head, d)
    return out.reshape(b, h, 1, d).transpose(1, 2), None


AttentionInterface.register(GQA_DECODE, gqa_decode_attention)


def allow_recompiles(n: int) -> None:
    """Raise dynamo's recompile limit to at least ``n`` graphs per compiled function (past
    it, dynamo runs the function eagerly without a word); torch renamed the setting."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), n))


@contextlib.contextmanager
def decode_attention(model: nn.Module):
    """The model's attention through `gqa_decode_attention` while inside: SDPA models, on a
    transformers whose SDPA path does not pack grouped heads itself (``pack_gqa``, 5.24)."""
    cfg = model.config
    old = getattr(cfg, "_attn_implementation", None)
    if old != "sdpa" or hasattr(sdpa_attention, "pack_gqa"):
        yield
        return
    cfg._attn_implementation = GQA_DECODE
    try:
        yield
    finally:
        cfg._attn_implementation = old


def cache_kwarg(model: nn.Module) -> str:
    """transformers 5.24 names the cache argument ``cache``, earlier 5.x ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class GraphDecoder:
    def __init__(self, model: nn.Module, batch: int, max_len: int, graph: bool | None = None,
                 buffers: Sequence[torch.Tensor] = (), compile: bool | str = False,
                 compile_mode: str | None = None):
        """``buffers``: tensors the captured step reads that others may reallocate (the
        engine's pin buffers, see ``pinned_buffers``); a change of any of them re-captures.
        ``compile``: True for inductor, or a dynamo backend's name; ``compile_mode``: an
        inductor mode without CUDA graphs of its own (module docstring)."""
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
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        z = dict(dtype=torch.long, device=dev)
        self.tok = torch.zeros(batch, 1, **z)        # the next input token of each row
        self.pos = torch.zeros(batch, 1, **z)        # its position id
        self.cpos = torch.zeros(1, **z)              # its cache slot (the same for every row)
        # the decode steps' attention mask, 4D and additive (0 attend, dtype min never): a
        # prepared 4D mask is used as given, where a 2D one makes transformers read its values
        # on the host (to skip the mask when nothing is padded), which a graph cannot capture
        dtype = next(model.parameters()).dtype
        self.neg = torch.finfo(dtype).min
        self.bias = torch.full((batch, 1, 1, max_len), self.neg, dtype=dtype, device=dev)
        self.out = torch.zeros(batch, max_len, **z)  # tokens decoded so far
        self.step_i = torch.zeros(1, **z)            # how many
        self.buffers = list(buffers)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._ptrs: list[int] = []
        self._moves = -1  # weight_moves() at capture
        self.captures = 0
        self.kw = cache_kwarg(model)
        self._inner = self._step_inner
        self.compiling = compile is not False  # until the first step has run (and compiled)
        if compile is not False:
            # every decoder shape (a pool's buckets, the layouts) is a graph of its own for
            # dynamo, which past its recompile limit (8 by default) runs the step eagerly
            # without a word: room for a pool's buckets times its layouts
            allow_recompiles(64)
            # dynamic=False: a decoder's shapes never change; inductor's own CUDA graphs stay
            # off (default mode), the decoder captures the compiled step itself
            self._inner = torch.compile(self._step_inner, dynamic=False, mode=compile_mode,
                                        backend="inductor" if compile is True else compile)

    @torch.no_grad()
    def _step(self) -> None:
        t = time.perf_counter()
        if self.compiling:  # long and silent otherwise: say so (the server's first requests wait on it)
            log.info("compiling the decode step for %d rows x %d positions (torch.compile; a minute or two at "
                     "8B shape)", self.batch, self.max_len)
        with decode_attention(self.model):
            self._inner()
        if self.compiling:
            self.compiling = False
            log.info("decode step compiled in %.0f s", time.perf_counter() - t)

    def _step_inner(self) -> None:
        self.bias.index_fill_(3, self.cpos, 0.0)  # the slot this step writes joins what it attends to
        logits = self.model(input_ids=self.tok, attention_mask=self.bias, position_ids=self.pos,
                            cache_position=self.cpos, use_cache=True, **{self.kw: self.cache}).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        self.out.index_copy_(1, self.step_i, nxt)
        self.tok.copy_(nxt)
        self.pos.add_(1)
        self.cpos.add_(1)
        self.step_i.add_(1)

    def _counters(self) -> list[torch.Tensor]:
        """What a step advances: our buffers, and the cache layers' own write position where
        they keep one as a tensor (transformers 5.24 writes at that counter rather than
        at ``cache_position``)."""
        own = [self.tok, self.pos, self.cpos, self.out, self.step_i, self.bias]
        return own + [c for layer in getattr(self.cache, "layers", [])
                      if isinstance(c := getattr(layer, "cumulative_length", None), torch.Tensor)]

    def _state(self) -> list[torch.Tensor]:
        return [t.clone() for t in self._counters()]

    def _restore(self, saved: list[torch.Tensor]) -> None:
        for t, s in zip(self._counters(), saved):
            t.copy_(s)

    def _capture(self) -> None:
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
        self._graph = graph
        self._ptrs = [b.data_ptr() for b in self.buffers]
        self._moves = weight_moves()
        self.captures += 1

    def stale(self) -> bool:
        """Whether the captured step reads memory that moved since: an adapter buffer
        reallocated, or a base weight moved (the engine's dense layout moves the base weights
        into a larger matrix when it folds the adapters' A columns into them)."""
        return (self._graph is None or weight_moves() != self._moves
                or [b.data_ptr() for b in self.buffers] != self._ptrs)

    def advance(self) -> None:
        """One decode step: replayed from the captured graph (captured first, or again when
        the adapter buffers or the weights it reads were reallocated), or run eagerly
        without graphs."""
        if not self.graph_on:
            self._step()
            return
        if self.stale():
            self._capture()
        self._graph.replay()

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


def pinned_buffers(engine) -> list[torch.Tensor]:
    """The buffers a captured step reads for the adapters: those of the engine's dense
    routing while it is on, else its pin buffers."""
    if any(layer.dense_on for layer in engine.layers.values()):
        return [t for layer in engine.layers.values() for t in (layer.dense_A, layer.dense_B, layer.dense_W)]
    return [t for layer in engine.layers.values() for t in (layer.pin_A, layer.pin_B)]


class DecoderPool:
    """GraphDecoders by bucket: a batch is padded to the next row bucket (dummy rows: one
    token, no adapters; past the largest bucket, the next power of two) and its prompt +
    new tokens to the next multiple of ``len_step``, so a handful of captures serve
    batches of every size. The least recently used decoder goes when more than
    ``max_decoders`` are held (each holds its KV cache)."""

    def __init__(self, model: nn.Module, row_buckets: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128),
                 len_step: int = 128, max_decoders: int = 4, graph: bool | None = None,
                 compile: bool | str = False):
        if not row_buckets or any(b < 1 for b in row_buckets) or len_step < 2 or max_decoders < 1:
            raise ValueError("row buckets must be positive, len_step at least 2 and max_decoders at least 1")
        self.model, self.row_buckets, self.len_step = model, sorted(row_buckets), len_step
        self.max_decoders, self.graph, self.compile = max_decoders, graph, compile
        self.decoders: dict[tuple[int, int], GraphDecoder] = {}

    def bucket(self, rows: int, length: int) -> tuple[int, int]:
        fit = [b for b in self.row_buckets if b >= rows] or [1 << (rows - 1).bit_length()]
        return fit[0], -(-length // self.len_step) * self.len_step

    def decoder(self, rows: int, length: int) -> GraphDecoder:
        key = self.bucket(rows, length)
        dec = self.decoders.pop(key, None) or GraphDecoder(self.model, key[0], key[1], graph=self.graph,
                                                           compile=self.compile)
        self.decoders[key] = dec  # most recently used last
        while len(self.decoders) > self.max_decoders:
            self.decoders.pop(next(iter(self.decoders)))
        return dec

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int = 0,
                 engine=None, rows: Sequence | None = None, width: int | None = None) -> torch.Tensor:
        """Greedy tokens for a left-padded batch of any size (``generate``'s layout). With
        ``engine`` and ``rows``, every row through its own adapters (pinned routing, the
        dummy rows inactive), in the fixed layout that reads fewer bytes (``fixed_layout``);
        ``width`` asks for the pinned layout with that many rank directions (default: what
        the rows need, rounded up to a multiple of 8, so later batches tend to reuse the
        capture)."""
        n, p = input_ids.shape
        dec = self.decoder(n, p + max_new_tokens)
        extra = dec.batch - n
        if extra:  # dummy rows: one real token each
            ids = torch.full((extra, p), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
            mask = torch.zeros((extra, p), dtype=attention_mask.dtype, device=attention_mask.device)
            mask[:, -1] = 1
            input_ids, attention_mask = torch.cat([input_ids, ids]), torch.cat([attention_mask, mask])
        if engine is None:
            out = dec.generate(input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id)
            return out[:n]
        from mta.engine.engine import Row

        full = list(rows) + [Row(active=False)] * extra
        rt = engine.routing(full)  # built once for the layout's choice and the fill
        layout = engine.fixed_layout(full, dec.batch, routing=rt) if width is None else "pinned"
        fixed = engine.dense(full, batch=dec.batch, routing=rt) if layout == "dense" else \
            engine.pinned(full, batch=dec.batch, width=width, multiple=8, routing=rt)
        with fixed:
            dec.buffers = pinned_buffers(engine)
            out = dec.generate(input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id)
        return out[:n]
