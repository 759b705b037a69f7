"""File formats: PEFT adapter folders, checkpoint headers, atomic output folders."""

from adaptermerge.io.adapter import load_adapter, save_adapter
from adaptermerge.io.checkpoint import Checkpoint, open_checkpoint

__all__ = ["Checkpoint", "load_adapter", "open_checkpoint", "save_adapter"]
