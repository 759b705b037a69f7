"""Model surgery: merge adapters into base checkpoints, resize, extract."""
