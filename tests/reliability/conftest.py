"""Fixtures shared with tests/test_serving.py: the tiny logged model."""

from tests.test_serving import tiny_model_uri  # noqa: F401
