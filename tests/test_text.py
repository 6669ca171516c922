from dataclasses import replace

import numpy as np
import pytest
import torch

from simfeatup.backbone import Backbone
from simfeatup.cache import EmbeddingCache
from simfeatup.encoder import DenseCLIP
from simfeatup.templates import IMAGENET_TEMPLATES, prompts_for
from simfeatup.text import encode_queries


def test_templates_are_clips_80_imagenet_templates():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    assert len(IMAGENET_TEMPLATES) == 80
    assert prompts_for("roof") == [t("roof") for t in OPENAI_IMAGENET_TEMPLATES]


@pytest.fixture(scope="module")
def encoder():
    from conftest import TINY_CLIP

    return DenseCLIP.from_config(TINY_CLIP)


def test_query_embedding_is_normalised_mean_of_normalised_prompts(encoder):
    got = encode_queries(encoder, ["building", "water"], cache=False)
    assert got.shape == (2, encoder.embed_dim)
    with torch.no_grad():
        per_prompt = encoder.clip.encode_text(encoder.tokenize(prompts_for("water")))
    per_prompt = per_prompt / per_prompt.norm(dim=-1, keepdim=True)
    mean = per_prompt.mean(0)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got[1], (mean / mean.norm()).numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.ones(2), rtol=1e-6)


def test_cache_avoids_re_encoding(encoder, tmp_path, monkeypatch):
    calls = []
    original = encoder.encode_text
    monkeypatch.setattr(encoder, "encode_text", lambda tokens: calls.append(1) or original(tokens))
    cache = EmbeddingCache("some-model|some-weights", root=tmp_path)
    first = encode_queries(encoder, ["road", "tree"], cache=cache)
    assert len(calls) == 2
    again = encode_queries(encoder, ["tree", "road"], cache=EmbeddingCache("some-model|some-weights", root=tmp_path))
    assert len(calls) == 2  # served from disk by a fresh cache object
    np.testing.assert_array_equal(again, first[::-1])
    encode_queries(encoder, ["road"], cache=EmbeddingCache("other-model|weights", root=tmp_path))
    assert len(calls) == 3  # another model never reuses these vectors


def test_random_models_are_never_cached_on_disk(encoder):
    assert encoder.backbone.cache_identity() is None
    openai = Backbone(model="ViT-B-16", pretrained="openai", quick_gelu=True)
    assert openai.cache_identity() == "ViT-B-16|openai|quick_gelu=True"  # the key earlier versions used
    assert openai.cache_identity() != replace(openai, quick_gelu=False).cache_identity()
    # the text tower does not depend on the last-block attention
    assert openai.cache_identity() == replace(openai, attention="vanilla").cache_identity()


def test_weights_files_are_cached_by_content_not_by_name(tiny_clip_cfg):
    a = Backbone(config=tiny_clip_cfg, pretrained="w.safetensors", weights_sha256="a" * 64, quick_gelu=False)
    assert a.cache_identity() != replace(a, weights_sha256="b" * 64).cache_identity()
    assert a.cache_identity() == replace(a, pretrained="renamed.safetensors").cache_identity()
    assert a.cache_identity() != replace(a, config={**tiny_clip_cfg, "embed_dim": 64}).cache_identity()
    assert replace(a, weights_sha256=None).cache_identity() is None  # a file without checksum: never cached


def test_damaged_cache_entry_is_recomputed(encoder, tmp_path):
    cache = EmbeddingCache("m|w", root=tmp_path)
    first = encode_queries(encoder, ["road"], cache=cache)
    for f in tmp_path.rglob("*.npy"):
        f.write_bytes(b"garbage")
    again = encode_queries(encoder, ["road"], cache=EmbeddingCache("m|w", root=tmp_path))
    np.testing.assert_array_equal(again, first)
    assert isinstance(np.load(next(tmp_path.rglob("*.npy"))), np.ndarray)  # rewritten whole
