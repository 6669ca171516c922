"""Shared fixtures: tiny randomly initialised open_clip models, offline, CPU."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

# A 2-block ViT-B/16-shaped CLIP (patch 16, 224 input, 14x14 grid) small enough for CPU tests.
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture
def tiny_clip_cfg():
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY_CLIP.items()}
