"""The trainer integration: checkpoint files and manifest, the event callback, and `LoR2CTrainer`."""

from .callback import LoR2CCallback
from .checkpoints import CheckpointError
from .trainer import LoR2CTrainer

__all__ = ["CheckpointError", "LoR2CCallback", "LoR2CTrainer"]
