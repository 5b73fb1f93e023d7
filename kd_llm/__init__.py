"""kd_llm: knowledge distillation for causal language models on Hugging Face Transformers."""

from kd_llm.losses import kd_loss
from kd_llm.training import DistillationConfig, DistillationTrainer

__version__ = "0.1.0"
__all__ = ["DistillationConfig", "DistillationTrainer", "kd_loss", "__version__"]
