"""Decoding: every way the product turns prompts into tokens, in one place.

- ``prompts``: the chat template around a task prompt, and the tokens a turn ends on.
- ``batch``: batch generation (``generate``, the evaluation's and the CLI's): transformers'
  ``generate`` with per-row routing (``hf_generate``), its static-cache loop
  (``static_generate``), or the slot decoder below (``SlotDecoder.run``).
- ``eager``: the server's decode loop that takes rows between steps (``Decoder``).
- ``slots``: the same interface on one static cache with the step captured (``SlotDecoder``):
  the server's loop and batch generation's captured one.
- ``step``: the captured / compiled decode step under it (``GraphDecoder``).
- ``fixed``: the fixed routing a captured step reads (the layout, the one fill, its buffers).
- ``attention``: attention for a decode step (grouped heads read in place).

Per-row adapters are applied by the engine's injected layers (``mta.engine.layer``); a
decoder only says which rows go through which adapters (``mta.engine.Row``).
"""
