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


TINY_NAME = "simfeatup-tiny-test"


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """The tiny config registered as an open_clip model + a weights file for it.

    Lets tests go through the real user path (`--model NAME --pretrained FILE`).
    """
    import json

    import open_clip
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("tiny_clip")
    (folder / f"{TINY_NAME}.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_NAME)
    weights = folder / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    return TINY_NAME, weights


@pytest.fixture(scope="session")
def artefacts(tiny_weights, tmp_path_factory):
    """A SimFeatUp artefact for the registered tiny model, and its verified ONNX export."""
    from simfeatup.export import export_onnx
    from simfeatup.upsampler import SimFeatUp, save_upsampler

    name, weights = tiny_weights
    folder = tmp_path_factory.mktemp("runtime")
    torch.manual_seed(5)
    up = SimFeatUp(32, 16)
    with torch.no_grad():
        for p in up.parameters():
            p.add_(0.3 * torch.randn_like(p))
    path = folder / "upsampler.safetensors"
    save_upsampler(up, path, backbone={"model": name, "pretrained": str(weights)})
    return path, export_onnx(folder / "onnx", upsampler=path)


@pytest.fixture(scope="session")
def onnx_dir(artefacts):
    return artefacts[1]
