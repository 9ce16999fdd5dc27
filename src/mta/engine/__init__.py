"""The adapter engine: one frozen base model, a stacked bank of anchor LoRAs mixed per
row, per-user stacked adapters, one-pass training of many adapters, PEFT files."""

from mta.engine.engine import LLAMA_TARGETS, AdapterEngine, EngineSpec, Row
from mta.engine.layer import BankLoRALinear, Routing
from mta.engine.train import Example, Job, TrainConfig, encode_example, train_jobs

__all__ = ["LLAMA_TARGETS", "AdapterEngine", "BankLoRALinear", "EngineSpec", "Example", "Job",
           "Routing", "Row", "TrainConfig", "encode_example", "train_jobs"]
