"""Tests never write into the user's caches: conftest points every cache into a folder of the session."""
import uuid
from pathlib import Path

from conftest import TEST_CACHE, USER_CACHES


def test_every_cache_points_into_the_session_folder():
    import huggingface_hub.constants
    import torch.hub

    from simfeatup.cache import cache_root

    for cache in (cache_root(), huggingface_hub.constants.HF_HUB_CACHE, torch.hub.get_dir()):
        assert Path(cache).resolve().is_relative_to(TEST_CACHE.resolve()), cache


def test_a_cache_write_of_a_test_lands_in_the_session_folder_not_the_users(onnx_dir):
    """The default path of `segment --onnx`: query embeddings cached on disk (keyed by the text graph)."""
    from simfeatup.runtime import OnnxSegmenter

    word = f"cache probe {uuid.uuid4().hex}"  # never cached before, anywhere
    segmenter = OnnxSegmenter(onnx_dir)
    segmenter.encode_queries([word])
    entry = segmenter.cache._file(word)
    assert entry.is_file() and entry.resolve().is_relative_to(TEST_CACHE.resolve())
    # the same entry in the user's cache would mean a test wrote there
    assert not (USER_CACHES["simfeatup"] / entry.relative_to(TEST_CACHE / "simfeatup")).exists()
