from kd_llm.training.config import DistillationConfig
from kd_llm.training.schedules import TEMPERATURE_SCHEDULES, temperature_at
from kd_llm.training.trainer import DistillationTrainer

__all__ = ["DistillationConfig", "DistillationTrainer", "TEMPERATURE_SCHEDULES", "temperature_at"]
