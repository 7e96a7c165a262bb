"""Shared fixtures: tiny random decoder models of the supported families."""

from __future__ import annotations

import os

import torch

# Without a GPU the Triton kernels run under Triton's interpreter. Triton reads this once, when it
# is first imported, so it is set here, before any test imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from .helpers import tiny_model


@pytest.fixture
def llama():
    return tiny_model("llama")
