"""The recovery stage."""
from workbench.recovery.finetune import (
    FINETUNE_METHODS,
    SCHEDULES,
    STATE_FILE,
    FinetuneConfig,
    FinetuneResult,
    eval_loss,
    finetune,
    lora_targets,
    training_data,
)

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
