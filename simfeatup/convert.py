"""Import the authors' released Lightning checkpoint (SPEC 3.1) into our safetensors format.

The checkpoint's ``state_dict`` holds the upsampler under ``upsampler.``; our parameter names
are the same below that prefix, so conversion is a prefix strip plus checks. Both the SimFeatUp
layout (one shared ``up``) and FeatUp's JBUStack (``up1``..``up4``) are recognised.
"""
from __future__ import annotations

import hashlib
import logging
import math
import pickle
import re
import zipfile
from collections import Counter
from pathlib import Path

import torch

from simfeatup.upsampler import SimFeatUp, save_upsampler

log = logging.getLogger(__name__)

PREFIX = "upsampler."  # SPEC 3.1


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted: unreadable, unsafe, or not the expected layout."""


def _load_state_dict(src: Path) -> dict[str, torch.Tensor]:
    if not src.is_file():
        raise CheckpointError(f"{src}: no such file")
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower() or not zipfile.is_zipfile(src):
            raise CheckpointError(f"{src}: not a PyTorch checkpoint (unreadable by torch.load)") from None
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f" (e.g. {found.group(1)})" if found else ""
        raise CheckpointError(
            f"{src}: torch.load(weights_only=True) refused it: the file holds pickled Python objects beyond "
            f"tensors{what}, and loading those could run code; re-save its state_dict alone from a trusted session"
        ) from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{src}: not a PyTorch checkpoint ({first})") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{src}: no state_dict of tensors found (expected a Lightning checkpoint)")
    return state


def _infer_config(src: Path, ups: dict[str, torch.Tensor], patch_size: int) -> dict:
    """SimFeatUp config from the tensor shapes (prefix already stripped)."""
    if "up.range_temp" in ups:
        shared, first = True, "up."
    elif "up1.range_temp" in ups:
        shared, first = False, "up1."
    else:
        raise CheckpointError(
            f"{src}: no '{PREFIX}up.range_temp' (SimFeatUp) or '{PREFIX}up1.range_temp' (JBUStack) tensor; "
            "not a JBU upsampler checkpoint"
        )
    needed = [first + "fixup_proj.0.weight", first + "range_proj.0.weight", "fixup_proj.1.weight"]
    absent = [PREFIX + k for k in needed if k not in ups]
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


def convert_checkpoint(src, dst, *, backbone: dict | None = None, patch_size: int = 16) -> dict:
    """Convert a SimFeatUp/FeatUp Lightning checkpoint ``src`` to ``dst`` (.safetensors + .json).

    backbone: recorded in the output (which features the weights expect). patch_size: the
    backbone's, fixes the number of steps (not stored in the checkpoint). Returns the written
    description plus "ignored": {top-level prefix: tensor count} of non-upsampler tensors.
    """
    src, dst = Path(src), Path(dst)
    state = _load_state_dict(src)
    ups = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    if not ups:
        raise CheckpointError(f"{src}: no tensors under '{PREFIX}' in its state_dict")
    ignored = dict(Counter(k.split(".", 1)[0] for k in state if not k.startswith(PREFIX)))

    config = _infer_config(src, ups, patch_size)
    module = SimFeatUp(**config)
    expected = module.state_dict()
    missing = sorted(PREFIX + k for k in set(expected) - set(ups))
    unexpected = sorted(PREFIX + k for k in set(ups) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{src}: layout {config} does not match: missing {missing}, unexpected {unexpected}")
    for k, v in expected.items():
        if ups[k].shape != v.shape:
            raise CheckpointError(
                f"{src}: tensor '{PREFIX}{k}' has shape {tuple(ups[k].shape)}, layout {config} "
                f"expects {tuple(v.shape)}"
            )
    module.load_state_dict({k: v.float() for k, v in ups.items()})

    if ignored:
        log.info("%s: ignored training-only tensors %s", src, ignored)
    sha256 = hashlib.sha256(src.read_bytes()).hexdigest()
    source = {"file": src.name, "sha256": sha256, "layout": "SimFeatUp" if config["shared"] else "JBUStack"}
    save_upsampler(module, dst, backbone=backbone, extra={"converted_from": source})
    log.info("%s -> %s (%s, dim %d, radius %d)", src, dst, source["layout"], config["dim"], config["radius"])
    return {"weights": str(dst), "upsampler": config, "converted_from": source, "ignored": ignored}
