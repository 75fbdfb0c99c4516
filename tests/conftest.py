"""Shared pytest setup: CPU only, deterministic, small thread count, repo root importable."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import convmae_det  # noqa: E402,F401  (applies compatibility fixes)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def tiny_convvit_kwargs(**overrides):
    """A ConvViT small enough for CPU tests; same structure as Base."""
    kwargs = dict(embed_dims=(32, 48, 64), depths=(1, 1, 3), num_heads=4)
    kwargs.update(overrides)
    return kwargs
