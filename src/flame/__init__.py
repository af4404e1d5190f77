"""flame: a lightweight, PyTorch-native scaffold for pretraining language models."""

__version__ = "0.1.0"
