"""Shared fixtures of the algorithm tests."""

import pytest
import torch


@pytest.fixture
def float64():
    """Gradients are compared in float64."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
