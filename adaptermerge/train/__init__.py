"""Training entry points: LoRA/QLoRA adapters on transformers' Trainer + PEFT (DDP/FSDP via torchrun/accelerate)."""

from adaptermerge.train.config import TrainConfig
from adaptermerge.train.run import TrainResult, train_adapter

__all__ = ["TrainConfig", "TrainResult", "train_adapter"]
