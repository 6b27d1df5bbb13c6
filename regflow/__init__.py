"""regflow: deep-learning medical image registration in PyTorch."""

__version__ = "0.1.0"
