"""Importing the authors' Lightning checkpoint (SPEC 3.1) into safetensors."""
import json

import pytest
import torch

from simfeatup.backbone import Backbone
from simfeatup.convert import CheckpointError, convert_checkpoint
from simfeatup.upsampler import SimFeatUp, load_upsampler

# SPEC 3.1, verbatim: the tensors under `upsampler.` in xclip_jbu_one_million_aid.ckpt.
AUTHORS_SHAPES = {
    "up.range_temp": (),
    "up.sigma_spatial": (),
    "up.range_proj.0.weight": (32, 3, 1, 1),
    "up.range_proj.0.bias": (32,),
    "up.range_proj.3.weight": (32, 32, 1, 1),
    "up.range_proj.3.bias": (32,),
    "up.fixup_proj.0.weight": (121, 124, 1, 1),
    "up.fixup_proj.0.bias": (121,),
    "up.fixup_proj.3.weight": (121, 121, 1, 1),
    "up.fixup_proj.3.bias": (121,),
    "fixup_proj.1.weight": (512, 512, 1, 1),
    "fixup_proj.1.bias": (512,),
}


def lightning_ckpt(path, state, **extra):
    """A file shaped like a Lightning checkpoint, with training-only heads beside the upsampler."""
    state = {f"upsampler.{k}": v for k, v in state.items()}
    state["downsampler.w"] = torch.randn(14, 14)
    state["scale_net.net.weight"] = torch.randn(1, 512, 1, 1)
    state["projection_img.0.weight"] = torch.randn(512, 512, 1, 1)
    torch.save({"epoch": 1, "global_step": 100, "pytorch-lightning_version": "1.9.0", "state_dict": state,
                "optimizer_states": [{"state": {}, "param_groups": []}], **extra}, path)
    return path


def test_converts_authors_layout(tmp_path):
    state = {k: torch.randn(s) for k, s in AUTHORS_SHAPES.items()}
    src = lightning_ckpt(tmp_path / "xclip_jbu_one_million_aid.ckpt", state)
    report = convert_checkpoint(src, tmp_path / "up.safetensors", backbone={"model": "ViT-B-16"})
    assert report["upsampler"] == {"dim": 512, "patch_size": 16, "radius": 5, "key_dim": 32, "shared": True}
    assert report["ignored"] == {"downsampler": 1, "scale_net": 1, "projection_img": 1}
    module, info = load_upsampler(tmp_path / "up.json")
    assert info["backbone"] == Backbone(model="ViT-B-16", pretrained="openai", patch_size=16).to_dict()
    assert info["converted_from"]["file"] == "xclip_jbu_one_million_aid.ckpt"
    loaded = module.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_converts_featup_jbu_stack(tmp_path):
    ref = SimFeatUp(384, 16, radius=3, shared=False)
    state = {k: torch.randn_like(v) for k, v in ref.state_dict().items()}
    src = lightning_ckpt(tmp_path / "stack.ckpt", state)
    report = convert_checkpoint(src, tmp_path / "stack.safetensors")
    assert report["upsampler"] == {"dim": 384, "patch_size": 16, "radius": 3, "key_dim": 32, "shared": False}
    module, _ = load_upsampler(tmp_path / "stack.safetensors")
    assert all(torch.equal(module.state_dict()[k], v) for k, v in state.items())
    sidecar = json.loads((tmp_path / "stack.json").read_text())
    assert sidecar["converted_from"]["layout"] == "JBUStack"


def test_missing_and_misshapen_tensors(tmp_path):
    state = {k: torch.randn(s) for k, s in AUTHORS_SHAPES.items()}
    del state["up.range_proj.3.bias"]
    with pytest.raises(CheckpointError, match=r"missing \['upsampler.up.range_proj.3.bias'\]"):
        convert_checkpoint(lightning_ckpt(tmp_path / "a.ckpt", state), tmp_path / "a.safetensors")
    state = {k: torch.randn(s) for k, s in AUTHORS_SHAPES.items()}
    state["up.range_proj.3.weight"] = torch.randn(32, 16, 1, 1)
    with pytest.raises(CheckpointError, match=r"'upsampler.up.range_proj.3.weight' has shape \(32, 16, 1, 1\)"):
        convert_checkpoint(lightning_ckpt(tmp_path / "b.ckpt", state), tmp_path / "b.safetensors")
    assert not (tmp_path / "b.safetensors").exists()


def test_bad_files_give_one_line_errors(tmp_path):
    (tmp_path / "junk.ckpt").write_bytes(b"\x80\x02junk" * 50)
    torch.save({"state_dict": {"encoder.w": torch.zeros(1)}}, tmp_path / "other.ckpt")
    torch.save({"state_dict": {"upsampler.conv.weight": torch.zeros(1)}}, tmp_path / "carafe.ckpt")
    cases = {
        "junk.ckpt": "not a PyTorch checkpoint",
        "other.ckpt": "no tensors under 'upsampler.'",
        "carafe.ckpt": "not a JBU upsampler checkpoint",
        "absent.ckpt": "no such file",
    }
    for name, expected in cases.items():
        with pytest.raises(CheckpointError, match=expected) as e:
            convert_checkpoint(tmp_path / name, tmp_path / "out.safetensors")
        assert "\n" not in str(e.value) and isinstance(e.value, ValueError)


class Pickled:
    """A Python object that weights_only loading must refuse."""


def test_pickled_objects_are_refused_with_reason(tmp_path):
    state = {k: torch.randn(s) for k, s in AUTHORS_SHAPES.items()}
    src = lightning_ckpt(tmp_path / "unsafe.ckpt", state, hyper_parameters=Pickled())
    with pytest.raises(CheckpointError, match="refused: this file contains code .*Pickled") as e:
        convert_checkpoint(src, tmp_path / "out.safetensors")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("container", ["bare state dict", "safetensors", "prefixed safetensors"])
def test_converts_other_containers_of_the_same_tensors(tmp_path, container):
    from safetensors.torch import save_file

    from simfeatup.backbone import file_sha256

    ref = SimFeatUp(64, 16, radius=2)
    state = {k: torch.randn_like(v) for k, v in ref.state_dict().items()}  # up.range_temp, fixup_proj.1.weight, ...
    src = tmp_path / "src.bin"
    if container == "bare state dict":
        torch.save(state, src)
    else:
        prefix = "upsampler." if container.startswith("prefixed") else ""
        save_file({prefix + k: v.contiguous() for k, v in state.items()}, str(src))
    report = convert_checkpoint(src, tmp_path / "up.safetensors")
    module, info = load_upsampler(tmp_path / "up.safetensors")
    assert all(torch.equal(module.state_dict()[k], v) for k, v in state.items())
    assert info["converted_from"] == {"file": "src.bin", "sha256": file_sha256(src), "layout": "SimFeatUp",
                                      "container": "state dict" if container == "bare state dict" else "safetensors"}
    assert report["ignored"] == {} and str(tmp_path) not in json.dumps(info)  # names, never paths


def test_reconverting_our_artefact_keeps_or_replaces_its_backbone(tmp_path, tiny_clip_cfg):
    from safetensors.torch import save_file

    from simfeatup.backbone import file_sha256
    from simfeatup.upsampler import save_upsampler

    ref = SimFeatUp(32, 16)
    ours = tmp_path / "ours.safetensors"
    record = Backbone(config=tiny_clip_cfg, attention="sclip", patch_size=16).to_dict()
    save_upsampler(ref, ours, backbone=record, extra={"training": {"steps": 5}})
    convert_checkpoint(ours.with_suffix(".json"), tmp_path / "copy.safetensors")
    module, info = load_upsampler(tmp_path / "copy.safetensors")
    assert info["backbone"] == record
    assert all(torch.equal(module.state_dict()[k], v) for k, v in ref.state_dict().items())
    assert (
        info["converted_from"]["file"] == "ours.safetensors"
        and info["converted_from"]["container"] == "simfeatup artefact"
    )
    # a model config .json (patch 14) and its weights file, recorded by name and checksum
    cfg = {**tiny_clip_cfg, "vision_cfg": {**tiny_clip_cfg["vision_cfg"], "patch_size": 14}}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    save_file({"w": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    convert_checkpoint(
        ours, tmp_path / "p14.safetensors", model=str(tmp_path / "cfg.json"), pretrained=str(tmp_path / "w.safetensors")
    )
    _, info = load_upsampler(tmp_path / "p14.safetensors")
    assert info["upsampler"]["patch_size"] == 14 and info["backbone"]["config"] == cfg
    assert info["backbone"]["pretrained"] == "w.safetensors" and info["backbone"]["weights_sha256"] == file_sha256(
        tmp_path / "w.safetensors"
    )
    assert info["backbone"]["feature_source"] == "final"  # ours, not the authors' "penultimate"
    with pytest.raises(ValueError, match="absent.bin: no such file"):
        convert_checkpoint(ours, tmp_path / "x.safetensors", model="ViT-B-16", pretrained=str(tmp_path / "absent.bin"))


def test_authors_checkpoint_is_recorded_as_trained_on_penultimate_features(tmp_path):
    src = lightning_ckpt(tmp_path / "a.ckpt", {k: torch.randn(s) for k, s in AUTHORS_SHAPES.items()})
    convert_checkpoint(src, tmp_path / "a.safetensors", model="ViT-L-14")
    backbone = json.loads((tmp_path / "a.json").read_text())["backbone"]
    assert (
        backbone
        == Backbone(model="ViT-L-14", pretrained="openai", feature_source="penultimate", patch_size=14).to_dict()
    )
