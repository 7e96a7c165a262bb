"""Shared fixtures: tiny random decoder models of the supported families."""

from __future__ import annotations

import pytest

from .helpers import tiny_model


@pytest.fixture
def llama():
    return tiny_model("llama")
