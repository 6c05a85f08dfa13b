from gptlab.training.module import LanguageModel
from gptlab.training.optim import OptimConfig

__all__ = ["LanguageModel", "OptimConfig"]
