"""Finding and loading CLIP weights: open_clip tags, local state dicts, a model config + a file.

Every failure is a :class:`~simfeatup.backbone.WeightsUnavailableError` whose one line says
what failed, why, and the flag that fixes it.
"""
from __future__ import annotations

import logging
import os
import pickle
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import open_clip
import torch
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.pretrained import has_hf_hub
from open_clip.transformer import QuickGELU
from safetensors import SafetensorError

from simfeatup import safe_load
from simfeatup.backbone import Backbone, WeightsUnavailableError, file_sha256
from simfeatup.constants import CLIP_MEAN, CLIP_STD

logger = logging.getLogger(__name__)

PROBE_TIMEOUT = 3.0  # seconds for the one request that tells whether weights can be downloaded at all
OFFLINE_DEMO = "python train/fit.py --config configs/train/tiny.yaml"  # trains without any download


def build_clip(backbone: Backbone, weights_path=None, *, seed: int = 0, cache_dir=None):
    """The open_clip model ``backbone`` describes, weights loaded -> (clip, the record of what runs).

    See :meth:`simfeatup.encoder.DenseCLIP.from_backbone` for the rules.
    """
    config = backbone.architecture()  # unknown names end here, with close matches
    label = backbone.model or "the model config"
    checkpoint, tag_cfg = None, {}
    if weights_path is not None:
        checkpoint = Path(weights_path)
    elif backbone.pretrained is not None and backbone.config is not None:
        checkpoint = Path(backbone.pretrained).expanduser()
        if not checkpoint.is_file():
            raise WeightsUnavailableError(_weights_message(label, backbone.pretrained, "no such file", local=True))
    elif backbone.pretrained is not None:
        checkpoint, tag_cfg = _resolve_weights(backbone.model, backbone.pretrained, cache_dir)
    quick_gelu = backbone.quick_gelu
    if quick_gelu is None and backbone.config is None and checkpoint is not None:
        # open_clip's create_model only warns when an OpenAI tag meets a GELU config: a
        # plain "ViT-B-16" with nn.GELU would silently give slightly wrong features.
        ref_cfg = tag_cfg or open_clip.get_pretrained_cfg(backbone.model, "openai")
        quick_gelu = bool(ref_cfg.get("quick_gelu", False)) or None  # None: the config's own
        if not tag_cfg:
            logger.info(
                "local weights %s: assuming %s's OpenAI activation (quick_gelu=%s); set quick_gelu to override",
                checkpoint.name,
                backbone.model,
                bool(quick_gelu),
            )
    if tag_cfg and (
        tuple(tag_cfg.get("mean", CLIP_MEAN)) != CLIP_MEAN or tuple(tag_cfg.get("std", CLIP_STD)) != CLIP_STD
    ):
        logger.warning(
            "%s/%s was trained with mean/std %s/%s, but simfeatup normalises with CLIP's",
            backbone.model,
            backbone.pretrained,
            tag_cfg.get("mean"),
            tag_cfg.get("std"),
        )
    if checkpoint is not None and _is_torchscript(checkpoint):
        why = "a TorchScript archive (OpenAI's original .pt), which we do not execute"
        openai = open_clip.get_pretrained_cfg(backbone.model, "openai") if backbone.model else {}
        raise WeightsUnavailableError(_weights_message(label, backbone.pretrained, why, openai))

    config = dict(config)
    if quick_gelu is not None:
        config["quick_gelu"] = quick_gelu
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = _clip_from_config(config)
    if checkpoint is not None:
        started = time.perf_counter()
        _load_weights(clip, checkpoint, label, backbone.pretrained, tag_cfg)
        logger.debug(
            "CLIP (%s): weights %s (%.0f MB) loaded in %.1f s, quick_gelu=%s",
            label, checkpoint, checkpoint.stat().st_size / 1e6, time.perf_counter() - started, runs_quick_gelu(clip),
        )
    else:
        logger.debug("CLIP (%s): random weights (seed %d), quick_gelu=%s", label, seed, runs_quick_gelu(clip))
    local = checkpoint is not None and not tag_cfg
    record = replace(
        backbone,
        pretrained=checkpoint.name if local else backbone.pretrained,
        weights_sha256=file_sha256(checkpoint) if local else None,
    )
    return clip, record


def _clip_from_config(config: dict):
    """open_clip's CLIP (or CustomTextCLIP) for a model config, randomly initialised."""
    config = dict(config)
    if "multimodal_cfg" in config:
        raise ValueError("CoCa models (multimodal_cfg) are not supported: DenseCLIP needs a CLIP ViT")
    hf_text = "hf_model_name" in config.get("text_cfg", {})
    if hf_text:  # random init here, then the whole checkpoint: no download of the text tower's own weights
        config["text_cfg"] = {**config["text_cfg"], "hf_model_pretrained": False}
    cls = open_clip.CustomTextCLIP if config.pop("custom_text", False) or hf_text else open_clip.CLIP  # as create_model
    try:
        return cls(**config)
    except TypeError as err:  # a key open_clip does not know
        raise ValueError(f"model config not understood by open_clip: {_short(err)}") from None


def _load_weights(clip, checkpoint: Path, label: str, pretrained: str | None, tag_cfg: dict) -> None:
    """open_clip's own loader (the one create_model uses): strict keys and shapes, weights_only=True.

    A torch.save file is first read by `safe_load.load`, so one that is damaged or holds code is
    refused in our words, and open_clip never reaches its fallback of loading without weights_only.
    """
    local = not tag_cfg
    try:
        if checkpoint.suffix not in (".safetensors", ".npz", ".npy"):  # what open_clip reads without torch.load
            safe_load.load(checkpoint, fix="" if local else "delete it from the cache to download it again")
        with safe_load.quiet():
            open_clip.load_checkpoint(clip, str(checkpoint), strict=True, weights_only=True)
    except safe_load.TorchFileError as err:
        why = f"{checkpoint.name}: {str(err).removeprefix(f'{checkpoint}: ')}"
        raise WeightsUnavailableError(_weights_message(label, pretrained, why, tag_cfg, local=local)) from None
    except (RuntimeError, OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError, SafetensorError) as err:
        # garbled safetensors files, and key or shape mismatches (another model's file)
        why = f"cannot read {checkpoint.name}: {_short(err)}"
        raise WeightsUnavailableError(_weights_message(label, pretrained, why, tag_cfg, local=local)) from err


def runs_quick_gelu(clip) -> bool:
    """Whether the model's MLPs use QuickGELU (OpenAI's activation): read off the built modules."""
    return any(isinstance(m, QuickGELU) for m in clip.modules())


def _resolve_weights(model: str, pretrained: str, cache_dir) -> tuple[Path, dict]:
    """Tag or file -> (local checkpoint path, tag registry entry or {})."""
    tag_cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if tag_cfg:
        cached = _hub_cache_hit(tag_cfg, cache_dir)
        if cached is not None:  # no network at all: not even the hub client's freshness check
            logger.debug("CLIP weights %s/%s from the Hugging Face cache: %s", model, pretrained, cached)
            return cached, tag_cfg
        source = _download_source(tag_cfg, cache_dir)
        if source is not None:  # to be fetched: fail at once, never in the hub client's retry loop
            why = _offline_reason() or _unreachable(source)
            if why:
                raise WeightsUnavailableError(_weights_message(model, pretrained, why, tag_cfg))
        try:
            path = open_clip.download_pretrained(tag_cfg, cache_dir=cache_dir)
        except (OSError, RuntimeError, ValueError) as err:  # HTTP errors, missing hub file, a dropped connection
            raise WeightsUnavailableError(_weights_message(model, pretrained, _fetch_reason(err), tag_cfg)) from err
        if not path:
            raise WeightsUnavailableError(
                _weights_message(model, pretrained, "open_clip gave no download location", tag_cfg)
            )
        logger.debug("CLIP weights %s/%s downloaded to %s", model, pretrained, path)
        return Path(path), tag_cfg
    path = Path(pretrained).expanduser()
    if path.is_file():
        logger.debug("CLIP weights %s: local file %s", model, path.resolve())
        return path, {}
    tags = open_clip.list_pretrained_tags_by_model(model)
    why = f"no such file, and not an open_clip tag for {model} (tags: {', '.join(tags) or 'none'})"
    raise WeightsUnavailableError(
        _weights_message(model, pretrained, why, open_clip.get_pretrained_cfg(model, "openai"))
    )


def _is_torchscript(path: Path) -> bool:
    # torch.jit.save archives carry constants.pkl; plain torch.save zips do not.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.endswith("/constants.pkl") for name in zf.namelist())


def _hub_file(tag_cfg: dict) -> tuple[str, list[str]] | None:
    """(repo, file names open_clip tries in order) of a tag that open_clip fetches from the hub."""
    hub = tag_cfg.get("hf_hub", "")
    if not hub or tag_cfg.get("file") or not has_hf_hub():
        return None
    # open_clip's convention: "org/repo/" means the default file, "org/repo/file.pt" names one;
    # a .safetensors twin is preferred when the hub has one (open_clip.pretrained).
    repo, filename = os.path.split(hub)
    filename = filename or HF_WEIGHTS_NAME
    if filename == HF_WEIGHTS_NAME:
        return repo, [HF_SAFE_WEIGHTS_NAME, filename]
    if filename.endswith((".bin", ".pth")):
        return repo, [filename[:-4] + ".safetensors", filename]
    return repo, [filename]


def _hub_cache_hit(tag_cfg: dict, cache_dir) -> Path | None:
    """The tag's weights file when the Hugging Face cache already holds it (no network)."""
    from huggingface_hub import try_to_load_from_cache

    hub = _hub_file(tag_cfg)
    for name in hub[1] if hub else ():
        found = try_to_load_from_cache(hub[0], name, cache_dir=cache_dir)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def _download_source(tag_cfg: dict, cache_dir) -> str | None:
    """The URL open_clip would download the tag's weights from, or None when it needs no network."""
    if tag_cfg.get("file"):
        return None
    if _hub_file(tag_cfg):
        from huggingface_hub import constants

        return constants.ENDPOINT
    url = tag_cfg.get("url", "")
    target = Path(cache_dir or Path.home() / ".cache" / "clip") / os.path.basename(url)  # open_clip's location
    return url if url and not target.is_file() else None


def _offline_reason() -> str | None:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return f"not in the local cache ({_cache_location()}) and HF_HUB_OFFLINE=1 is set"
    return None


def _unreachable(url: str) -> str | None:
    """Why ``url``'s server cannot be reached, from one short request (None: it answered)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=PROBE_TIMEOUT):
            return None
    except urllib.error.HTTPError:  # any HTTP answer: the server is there, the download can start
        return None
    except (OSError, ValueError) as err:  # refused, no route, DNS, timeout (URLError is an OSError)
        reason = getattr(err, "reason", err)
        return (
            f"not in the local cache ({_cache_location()}) and {url} cannot be reached "
            f"({_short(reason if isinstance(reason, Exception) else err, 80)})"
        )


def _cache_location() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _fetch_reason(err: Exception) -> str:
    return _offline_reason() or f"download failed ({_short(err)})"


def _weights_message(model: str, pretrained: str, why: str, tag_cfg: dict | None = None, local: bool = False) -> str:
    """One line: what failed, why, and how to fix it."""
    head = f"CLIP weights for {model} (pretrained={pretrained!r}) unavailable: {why}."
    if local:
        return f"{head} Fix: pass an open_clip state dict for {model} (.bin/.pt/.safetensors) as --pretrained."
    where = ""
    hub = (tag_cfg or {}).get("hf_hub", "")
    if hub:
        # open_clip's convention: "org/repo/" means the default file, "org/repo/file.pt" names one.
        repo, filename = os.path.split(hub)
        filename = filename or "open_clip_pytorch_model.bin"
        from huggingface_hub import constants

        where = f" (open_clip fetches {filename} from {constants.ENDPOINT}/{repo} into the Hugging Face cache)"
    elif (tag_cfg or {}).get("url"):
        where = f" (open_clip downloads {tag_cfg['url']} into ~/.cache/clip)"
    fix = (
        f"pass a local weights file with --pretrained FILE, e.g. /path/to/{model}.bin{where}; or run once with "
        "network access (afterwards HF_HUB_OFFLINE=1 uses the cached weights without trying the network); "
        f"or try the offline demo, {OFFLINE_DEMO} (a random backbone: its results are meaningless)"
    )
    return f"{head} Fix: {fix}."


def _short(err: Exception, limit: int = 160) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
