"""Shared pytest setup: the repository root on sys.path (for ``examples``), one torch
thread, and the example models built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MOBILENET_RESOLUTION = 224


@pytest.fixture(scope="session")
def gpt2_model():
    """(GPT-2-style decoder, small config, int64 token ids [1, seq])."""
    import torch

    from examples.models import gpt2_config, gpt2_decoder, gpt2_inputs

    torch.set_num_threads(1)
    cfg = gpt2_config("test")
    return gpt2_decoder(**cfg), gpt2_inputs(**cfg)


@pytest.fixture(scope="session")
def mobilenet_model():
    """(MobileNetV2 in eval mode, float32 images [1, 3, R, R])."""
    import torch

    from examples.models import mobilenet_inputs, mobilenet_v2

    torch.set_num_threads(1)
    r = MOBILENET_RESOLUTION
    return mobilenet_v2(resolution=r), mobilenet_inputs(r)


@pytest.fixture(scope="session")
def minilm_model():
    """(the trained all-MiniLM-L6-v2, its tokenizer, int64 inputs of 3 sentences x 128)."""
    import torch

    from examples.models import minilm, minilm_inputs

    torch.set_num_threads(1)
    model, tokenizer = minilm()
    return model, tokenizer, minilm_inputs(tokenizer, seq=128)
