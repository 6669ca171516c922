"""The Backbone record: reading old and new records, resolving choices, finding weights files."""
import json
import logging
from dataclasses import replace

import pytest

from simfeatup.backbone import Backbone, WeightsUnavailableError, file_sha256, read_config, resolve


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "run" / "clip.safetensors"
    path.parent.mkdir()
    path.write_bytes(b"stand-in for a weights file")
    return path


def test_round_trip_and_validation(tiny_clip_cfg):
    record = Backbone(config=tiny_clip_cfg, pretrained="w.safetensors", weights_sha256="0" * 64, attention="sclip",
                      feature_source="penultimate", patch_size=16, quick_gelu=True)
    assert Backbone.from_dict(json.loads(json.dumps(record.to_dict()))) == record
    assert set(record.to_dict()) == {"model", "config", "pretrained", "weights_sha256", "attention", "feature_source",
                                     "patch_size", "quick_gelu"}
    with pytest.raises(ValueError, match="not both"):
        Backbone(model="ViT-B-16", config=tiny_clip_cfg)
    with pytest.raises(ValueError, match="segearth"):
        Backbone(attention="qk")
    with pytest.raises(ValueError, match="penultimate"):
        Backbone(feature_source="middle")


def test_reads_the_records_of_older_artefacts(tiny_clip_cfg):
    # training artefacts of a random test backbone, before the record existed
    old_training = {"model": "config", "pretrained": None, "attention": "segearth", "feature_source": "final",
                    "patch_size": 16, "embed_dim": 32, "clip_config": tiny_clip_cfg}
    assert Backbone.from_dict(old_training) == Backbone(config=tiny_clip_cfg, patch_size=16)
    # convert-weights and hand-written ones: a path as typed, a name alone meaning its default weights
    assert Backbone.from_dict({"model": "m", "pretrained": "/data/w.bin"}).pretrained == "/data/w.bin"
    assert Backbone.from_dict({"model": "ViT-B-16"}) == Backbone(model="ViT-B-16", pretrained="openai")
    assert Backbone.from_dict({"model": "ViT-B-16", "pretrained": None}).pretrained is None  # random, said so


def test_defaults_and_choices_over_the_artefact(tiny_clip_cfg):
    assert resolve() == (Backbone(model="ViT-B-16", pretrained="openai"), None)
    artefact = Backbone(model="ViT-L-14", pretrained="openai", attention="sclip", feature_source="penultimate",
                        patch_size=14, quick_gelu=True)
    chosen, path = resolve(artefact)
    # what the artefact's backbone ran with is kept; the features used here are the final ones
    assert chosen == replace(artefact, feature_source="final", patch_size=None) and path is None
    chosen, _ = resolve(artefact, model="ViT/B-16", attention="vanilla")
    assert (chosen.model, chosen.pretrained, chosen.attention, chosen.quick_gelu) == (
        "ViT-B-16",
        "openai",
        "vanilla",
        None,
    )
    assert resolve(Backbone(config=tiny_clip_cfg))[0] == Backbone(config=tiny_clip_cfg)  # random stays random


def test_weights_file_is_recorded_by_name_and_checksum(weights):
    chosen, path = resolve(model="ViT-B-16", pretrained=str(weights))
    assert path == weights and chosen.pretrained == "clip.safetensors"
    assert chosen.weights_sha256 == file_sha256(weights) and str(weights.parent) not in json.dumps(chosen.to_dict())


def test_artefact_weights_are_looked_for_as_given_then_beside_the_artefact(weights, tmp_path, monkeypatch):
    artefact = Backbone(model="ViT-B-16", pretrained="clip.safetensors", weights_sha256=file_sha256(weights))
    monkeypatch.chdir(tmp_path)  # not found as given (relative to here) ...
    chosen, path = resolve(artefact, artefact_dir=weights.parent)  # ... but beside the artefact
    assert path == weights and chosen.weights_sha256 == artefact.weights_sha256
    legacy = Backbone(model="ViT-B-16", pretrained=str(weights))  # an absolute path from an older artefact
    assert resolve(legacy, artefact_dir=tmp_path)[1] == weights
    with pytest.raises(WeightsUnavailableError) as err:
        resolve(artefact, artefact_dir=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "clip.safetensors" in msg and "--pretrained /path/to/clip.safetensors" in msg


def test_other_weights_than_the_artefacts_are_not_silent(weights, tmp_path, caplog):
    artefact = Backbone(model="ViT-B-16", pretrained="clip.safetensors", weights_sha256="f" * 64)
    with caplog.at_level(logging.WARNING, logger="simfeatup.backbone"):
        resolve(artefact, artefact_dir=weights.parent)
    assert "trained for ViT-B-16/clip.safetensors (sha256 ffffffffffff" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="simfeatup.backbone"):
        resolve(Backbone(model="ViT-B-16", pretrained="openai"), model="ViT-L-14")
    assert "trained for ViT-B-16/openai but runs on ViT-L-14/openai" in caplog.text


def test_model_config_file(tiny_clip_cfg, weights, tmp_path):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({**tiny_clip_cfg, "quick_gelu": True}))
    chosen, path = resolve(model=cfg, pretrained=weights)
    assert chosen.model is None and chosen.config == {**tiny_clip_cfg, "quick_gelu": True} and path == weights
    hub = tmp_path / "open_clip_config.json"  # the Hugging Face hub's layout
    hub.write_text(json.dumps({"model_cfg": tiny_clip_cfg, "preprocess_cfg": {}}))
    assert read_config(hub) == tiny_clip_cfg
    with pytest.raises(WeightsUnavailableError, match="a config takes a file"):
        resolve(model=cfg, pretrained="openai")
    with pytest.raises(WeightsUnavailableError, match="no such file"):
        resolve(model=cfg, pretrained=tmp_path / "absent.safetensors")
    (tmp_path / "bad.json").write_text(json.dumps({"embed_dim": 8}))
    for name, message in (("bad.json", "missing vision_cfg, text_cfg"), ("absent.json", "no such file")):
        with pytest.raises(ValueError, match=message) as err:
            resolve(model=tmp_path / name)
        assert "\n" not in str(err.value)
