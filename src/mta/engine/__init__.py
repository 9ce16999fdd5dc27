"""The adapter engine: one frozen base model, a stacked bank of anchor LoRAs mixed per
row, per-user stacked adapters, one-pass training of many adapters, PEFT files.

Import from the submodules (``mta.engine.engine``, ``.train``, ``.layer``, ...): this
package imports nothing itself, so ``mta.engine.config`` loads without torch."""
