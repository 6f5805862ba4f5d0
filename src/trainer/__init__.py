"""trainer: a command-line training and experiment runner built on PyTorch."""

__version__ = "0.1.0"
