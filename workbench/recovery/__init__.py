"""The recovery stage."""
from workbench.recovery.finetune import FINETUNE_METHODS, SCHEDULES, STATE_FILE, FinetuneConfig, training_data, FinetuneResult, lora_targets, eval_loss, finetune

__all__ = [
    "FINETUNE_METHODS",
    "SCHEDULES",
    "STATE_FILE",
    "FinetuneConfig",
    "training_data",
    "FinetuneResult",
    "lora_targets",
    "eval_loss",
    "finetune",
]
