from gptlab.training.module import LanguageModel, OptimConfig

__all__ = ["LanguageModel", "OptimConfig"]
