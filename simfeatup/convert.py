"""Import a SimFeatUp upsampler (SPEC 3.1) into our safetensors artefact format.

The authors' released Lightning checkpoint holds the upsampler under ``upsampler.`` in its
``state_dict``; our parameter names are the same below that prefix, so conversion is a prefix
strip plus checks. Accepted too: a bare upsampler state dict (``up.range_temp``, ...), a plain
safetensors file of either, and our own artefact (to re-record its backbone). Both the SimFeatUp
layout (one shared ``up``) and FeatUp's JBUStack (``up1``..``up4``) are recognised.
"""
from __future__ import annotations

import logging
import math
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

from simfeatup import safe_load
from simfeatup.backbone import (
    CHECKPOINT_KEY,
    Backbone,
    WeightsUnavailableError,
    file_sha256,
    looks_like_file,
    resolve,
)
from simfeatup.upsampler import SimFeatUp, load_upsampler, save_upsampler

logger = logging.getLogger(__name__)

PREFIX = "upsampler."  # SPEC 3.1


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted: unreadable, unsafe, or not the expected layout."""


def _read_source(src: Path) -> tuple[dict[str, torch.Tensor], str, dict | None]:
    """-> (tensors, container, our artefact's description or None)."""
    if not src.is_file():
        raise CheckpointError(f"{src}: no such file")
    if src.suffix == ".json":
        module, info = load_upsampler(src)
        return module.state_dict(), "simfeatup artefact", info
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(src), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except SafetensorError:
        return _load_state_dict(src)
    if "simfeatup" in meta:  # our own artefact: load_upsampler checks it against its config
        module, info = load_upsampler(src)
        return module.state_dict(), "simfeatup artefact", info
    if not tensors:
        raise CheckpointError(f"{src}: a safetensors file without tensors")
    return tensors, "safetensors", None


def _load_state_dict(src: Path) -> tuple[dict[str, torch.Tensor], str, dict | None]:
    try:
        obj = safe_load.load(src, fix="convert a Lightning checkpoint or a state dict of the upsampler")
    except safe_load.TorchFileError as err:
        raise CheckpointError(str(err)) from None
    lightning = isinstance(obj, dict) and "state_dict" in obj
    state = obj["state_dict"] if lightning else obj
    # our own training checkpoints carry the record of the backbone they were trained for
    own = {"backbone": obj[CHECKPOINT_KEY]} if lightning and isinstance(obj.get(CHECKPOINT_KEY), dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"{src}: no state_dict of tensors found (expected a Lightning checkpoint or a state dict)"
        )
    return state, "lightning checkpoint" if lightning else "state dict", own


def _upsampler_tensors(src: Path, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str, dict]:
    """-> (tensors named as SimFeatUp names them, the prefix they had, {ignored prefix: count})."""
    if any(k.startswith(PREFIX) for k in state):
        ups = {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}
        ignored = dict(Counter(k.split(".", 1)[0] for k in state if not k.startswith(PREFIX)))
        return ups, PREFIX, ignored
    if "up.range_temp" in state or "up1.range_temp" in state:  # a bare upsampler state dict
        return dict(state), "", {}
    raise CheckpointError(
        f"{src}: no tensors under '{PREFIX}' in its state_dict, nor a bare upsampler state dict "
        "(up.range_temp, fixup_proj.1.weight, ...)"
    )


def _infer_config(src: Path, ups: dict[str, torch.Tensor], patch_size: int, prefix: str = PREFIX) -> dict:
    """SimFeatUp config from the tensor shapes (prefix already stripped)."""
    if "up.range_temp" in ups:
        shared, first = True, "up."
    elif "up1.range_temp" in ups:
        shared, first = False, "up1."
    else:
        raise CheckpointError(
            f"{src}: no '{prefix}up.range_temp' (SimFeatUp) or '{prefix}up1.range_temp' (JBUStack) tensor; "
            "not a JBU upsampler checkpoint"
        )
    needed = [first + "fixup_proj.0.weight", first + "range_proj.0.weight", "fixup_proj.1.weight"]
    absent = [prefix + k for k in needed if k not in ups]
    if absent:
        raise CheckpointError(f"{src}: missing tensors {absent}")
    n_offsets = ups[first + "fixup_proj.0.weight"].shape[0]
    diameter = math.isqrt(n_offsets)
    if diameter**2 != n_offsets or diameter % 2 == 0:
        raise CheckpointError(f"{src}: kernel fixup has {n_offsets} outputs, not an odd square (2r+1)^2")
    if not shared:
        n_modules = len({m.group(1) for k in ups if (m := re.match(r"(up\d+)\.", k))})
        if n_modules != math.ceil(math.log2(patch_size)):
            raise CheckpointError(
                f"{src}: JBUStack with {n_modules} steps does not fit patch_size={patch_size} "
                f"(needs ceil(log2({patch_size})) = {math.ceil(math.log2(patch_size))})"
            )
    return {
        "dim": ups["fixup_proj.1.weight"].shape[0],
        "patch_size": patch_size,
        "radius": diameter // 2,
        "key_dim": ups[first + "range_proj.0.weight"].shape[0],
        "shared": shared,
    }


def converted_backbone(
    model: str | None = None,
    pretrained: str | None = None,
    *,
    source: dict | None = None,
    source_dir: Path | None = None,
) -> Backbone:
    """The backbone record convert-weights writes, with the model config's patch size.

    model/pretrained: an open_clip name or model-config .json, and a tag or weights file (recorded
    by name and sha256). What they leave open comes from the source artefact's record (``source``:
    its description; its weights file is looked for beside it, in ``source_dir``), else ViT-B-16/openai.
    A foreign checkpoint is recorded with feature_source "penultimate":
    the authors trained on the last block's INPUT (SPEC 8; inference still uses the modified
    block's output, as theirs does).
    """
    own = Backbone.from_dict(source["backbone"]) if source and source.get("backbone") else None
    if own is not None and model is None and pretrained is None:
        patch = own.patch_size or (source.get("upsampler") or {}).get("patch_size") or own.native_patch_size()
        return replace(own, patch_size=patch)
    feature_source = own.feature_source if own is not None else "penultimate"
    backbone, weights = resolve(
        own, model=model, pretrained=pretrained, feature_source=feature_source, artefact_dir=source_dir
    )
    if weights is None and backbone.pretrained is not None and looks_like_file(backbone.pretrained):
        raise WeightsUnavailableError(
            f"CLIP weights file {backbone.pretrained}: no such file; convert-weights records its name and sha256, "
            "so give the file itself with --pretrained (or an open_clip tag)"
        )
    return replace(backbone, patch_size=backbone.native_patch_size())


def convert_checkpoint(src, dst, *, backbone: Backbone | dict | None = None, model=None, pretrained=None) -> dict:
    """Convert a SimFeatUp/FeatUp upsampler ``src`` to our artefact ``dst`` (.safetensors + .json).

    ``src``: a Lightning checkpoint (the upsampler under ``upsampler.``), a bare upsampler state
    dict, a plain safetensors file of either, or one of our artefacts. backbone: the record to
    store (which features the weights expect), else :func:`converted_backbone` of ``model`` and
    ``pretrained``. Its patch size fixes the number of steps (not stored in the checkpoint).
    Returns the written description plus "ignored": {top-level prefix: tensor count} of
    non-upsampler tensors.
    """
    src, dst = Path(src), Path(dst)
    state, container, info = _read_source(src)
    ups, prefix, ignored = _upsampler_tensors(src, state)
    if isinstance(backbone, dict):
        backbone = Backbone.from_dict(backbone)
    if backbone is None:
        backbone = converted_backbone(model, pretrained, source=info, source_dir=src.parent)
    elif backbone.patch_size is None:
        backbone = replace(backbone, patch_size=backbone.native_patch_size())

    config = _infer_config(src, ups, backbone.patch_size, prefix)
    module = SimFeatUp(**config)
    expected = module.state_dict()
    missing = sorted(prefix + k for k in set(expected) - set(ups))
    unexpected = sorted(prefix + k for k in set(ups) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{src}: layout {config} does not match: missing {missing}, unexpected {unexpected}")
    for k, v in expected.items():
        if ups[k].shape != v.shape:
            raise CheckpointError(
                f"{src}: tensor '{prefix}{k}' has shape {tuple(ups[k].shape)}, layout {config} expects {tuple(v.shape)}"
            )
    module.load_state_dict({k: v.float() for k, v in ups.items()})

    if ignored:
        logger.info("%s: ignored training-only tensors %s", src, ignored)
    weights_file = src.parent / info["weights"] if info is not None and src.suffix == ".json" else src
    source = {
        "file": weights_file.name,
        "sha256": file_sha256(weights_file),
        "container": container,
        "layout": "SimFeatUp" if config["shared"] else "JBUStack",
    }
    save_upsampler(module, dst, backbone=backbone.to_dict(), extra={"converted_from": source})
    logger.info(
        "%s -> %s (%s, dim %d, radius %d, for %s patch %d)",
        src,
        dst,
        source["layout"],
        config["dim"],
        config["radius"],
        backbone.describe(),
        backbone.patch_size,
    )
    return {
        "weights": str(dst),
        "upsampler": config,
        "backbone": backbone.to_dict(),
        "converted_from": source,
        "ignored": ignored,
    }
