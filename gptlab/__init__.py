"""gptlab: train, sweep and sample GPT language models with PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
