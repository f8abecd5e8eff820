"""Shared fixtures. Tests never reach a network: the hub is switched to offline mode."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property tests: derandomized under `make test` and CI (HYPOTHESIS_PROFILE=ci: the same examples on
# every run and machine), freshly random in a plain local `pytest` (the "dev" profile) to explore.
settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Without CUDA, the Triton kernels (tests/test_kernels.py) run in Triton's interpreter on CPU
# tensors. Triton reads this when a kernel is defined, so it is set before any test imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def default_model():
    """The embedded SmolLM2-135M-Instruct, loaded once per test session."""
    from lqlib.evaluation import models

    return models.load()
