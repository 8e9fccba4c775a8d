"""Fine-tuning and distillation shared by the passes that change a model's structure or weights."""

from slimship.train.trainer import FinetuneConfig, FinetuneReport, finetune, to_tensor_out, training_data

__all__ = ["FinetuneConfig", "FinetuneReport", "finetune", "to_tensor_out", "training_data"]
