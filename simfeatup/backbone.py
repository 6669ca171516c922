"""Which CLIP runs, with which weights and how: the :class:`Backbone` record (SPEC 2.3, 8).

One record describes a backbone wherever simfeatup writes or reads one: the upsampler
artefact's "backbone" section (training, convert-weights), the ONNX manifest's "model"
section, the text-embedding cache key and ``DenseCLIP.backbone`` (what actually runs).
:func:`resolve` turns user choices and an artefact's record into the record to build.
Torch-free: nothing here builds a model (only :meth:`Backbone.architecture` asks open_clip's
registry, lazily).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from .constants import DEFAULT_MODEL, DEFAULT_PRETRAINED
from .model_folder import sha256  # the one file checksum (torch-free)

logger = logging.getLogger(__name__)

# How the replaced last block mixes tokens (SPEC 2.3; the others are the paper's ablations).
ATTENTION_MODES = ("segearth", "clearclip", "sclip", "maskclip", "vanilla")
# Which features an upsampler learns (SPEC 8): the modified last block's output, or its input.
FEATURE_SOURCES = ("final", "penultimate")
DEFAULT_ATTENTION = "segearth"


CHECKPOINT_KEY = "simfeatup_backbone"  # the Backbone record inside every training checkpoint

class BackboneError(ValueError):
    """A backbone that cannot be described or resolved as given; the message says how to fix it."""


class WeightsUnavailableError(BackboneError):
    """CLIP weights could not be found, fetched or read; the message says how to fix it."""


@dataclass(frozen=True)
class Backbone:
    """A frozen CLIP backbone as simfeatup records it.

    model: open_clip model name, or None when ``config`` gives the architecture.
    config: an open_clip model config ({"embed_dim", "vision_cfg", "text_cfg", optional
        "quick_gelu"}), for models open_clip has no name for (custom or random test models).
    pretrained: open_clip weights tag ("openai"), or the NAME of a local weights file, never
        its path; None: random weights.
    weights_sha256: sha256 of that local file (None for tags and random weights).
    attention: last-block mode (SPEC 2.3). feature_source: the features an upsampler is
        trained on (SPEC 8). patch_size, quick_gelu: what the built model has (None: not known
        yet; a quick_gelu given to a build is applied, None there follows the weights).
    """

    model: str | None = None
    config: dict | None = field(default=None, hash=False)
    pretrained: str | None = None
    weights_sha256: str | None = None
    attention: str = DEFAULT_ATTENTION
    feature_source: str = "final"
    patch_size: int | None = None
    quick_gelu: bool | None = None

    def __post_init__(self):
        if self.model is not None and self.config is not None:
            raise BackboneError(f"a backbone is an open_clip model name ({self.model!r}) or a model config, not both")
        if self.attention not in ATTENTION_MODES:
            raise BackboneError(f"attention={self.attention!r} is not one of {ATTENTION_MODES}")
        if self.feature_source not in FEATURE_SOURCES:
            raise BackboneError(f"feature_source={self.feature_source!r} must be one of {FEATURE_SOURCES}")

    # ------------------------------------------------------------------ reading and writing
    def to_dict(self) -> dict:
        """JSON-safe dict with every field (the artefact and manifest format)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "Backbone":
        """Read a record, including older ones ("clip_config", "model": "config", weights paths)."""
        data = dict(data or {})
        config = data.pop("config", None) or data.pop("clip_config", None)
        model = data.pop("model", None)
        if config is not None or model == "config":  # older records named config models "config"
            model = None
        if model is not None and "pretrained" not in data:  # a name alone meant its default weights
            data["pretrained"] = DEFAULT_PRETRAINED
        known = {f.name for f in dataclasses.fields(cls)}
        ignored = sorted(set(data) - known)
        if ignored:  # e.g. "embed_dim" of older training artefacts: the built model has it
            logger.debug("backbone record: ignoring %s", ignored)
        values = {k: v for k, v in data.items() if k in known and v is not None}
        return cls(model=model, config=config, **values)

    # ------------------------------------------------------------------ derived
    def describe(self) -> str:
        """Short human name, e.g. "ViT-B-16/openai" or "config(embed_dim=32)/w.safetensors"."""
        arch = self.model or (f"config(embed_dim={self.config.get('embed_dim')})" if self.config else "unknown model")
        return f"{arch}/{self.pretrained or 'random weights'}"

    def cache_identity(self) -> str | None:
        """Key of the text-embedding cache, or None when the weights are not reproducible.

        Changes whenever the text tower can: architecture, weights (tag, or file content) and
        activation. Random weights and files without a checksum are never cached on disk.
        """
        if self.pretrained is None:
            return None
        if self.weights_sha256:
            weights = f"sha256:{self.weights_sha256}"
        elif looks_like_file(self.pretrained):
            return None
        else:
            weights = self.pretrained
        arch = self.model if self.config is None else f"config:{_json_digest(self.config)}"
        return f"{arch}|{weights}|quick_gelu={self.quick_gelu}"

    def architecture(self) -> dict:
        """The open_clip model config: ``config``, or open_clip's registered one for ``model``."""
        if self.config is not None:
            return self.config
        import open_clip  # the registry lives in open_clip (needs simfeatup[torch])

        config = open_clip.get_model_config(self.model)
        if config is None:
            known = open_clip.list_models()
            close = difflib.get_close_matches(self.model, known, n=5, cutoff=0.5)
            raise BackboneError(
                f"unknown open_clip model {self.model!r}; close matches: {close or known[:10]} "
                "(or give a model config .json)"
            )
        return config

    def native_patch_size(self) -> int:
        """The ViT's patch size from its model config (what convert-weights records)."""
        patch = self.architecture().get("vision_cfg", {}).get("patch_size", 16)  # open_clip's default
        if isinstance(patch, (list, tuple)):
            if len(set(patch)) != 1:
                raise BackboneError(f"non-square patches {tuple(patch)} are not supported")
            patch = patch[0]
        return int(patch)


# ---------------------------------------------------------------------- resolution
def resolve(
    artefact: Backbone | None = None,
    *,
    model: str | os.PathLike | None = None,
    pretrained: str | os.PathLike | None = None,
    config: dict | None = None,
    attention: str | None = None,
    feature_source: str | None = None,
    artefact_dir: str | os.PathLike | None = None,
) -> tuple[Backbone, Path | None]:
    """User choices over an artefact's record over the defaults -> (record to build, weights file).

    model: an open_clip name or a model-config .json file (open_clip's model_configs format);
    config: the same as a dict. pretrained: an open_clip tag or a local weights file. What is not
    given comes from ``artefact`` (the backbone an upsampler was trained for), else ViT-B-16 /
    openai; a model config without weights is random. attention defaults to the artefact's, else
    SegEarth-OV's; feature_source to "final" (a choice of the run, not of the weights).
    A weights file the artefact names is looked for as given, then in ``artefact_dir``. The
    record keeps the file's name and sha256; the returned path (None for tags and random
    weights) is where it is on this machine.
    """
    if model is not None and is_config_file(model):
        if config is not None:
            raise BackboneError(f"model={model} is a model config file, and a config was given too: pass one")
        model, config = None, read_config(model)
    if model is not None and config is not None:
        raise BackboneError(f"give an open_clip model name ({model!r}) or a model config, not both")
    base = artefact or Backbone()
    own_arch = model is None and config is None
    if own_arch:
        model, config = base.model, base.config
        if model is None and config is None:
            model = DEFAULT_MODEL
    else:
        model = str(model).replace("/", "-") if model is not None else None  # open_clip's "ViT-B/16" spelling

    from_artefact = pretrained is None and base.pretrained is not None
    if pretrained is None:
        pretrained = base.pretrained if base.pretrained is not None else (DEFAULT_PRETRAINED if model else None)
    pretrained = None if pretrained is None else str(pretrained)

    path = None
    if pretrained is not None:
        path = _find_weights(pretrained, artefact_dir if from_artefact else None)
        if path is None and from_artefact and (looks_like_file(pretrained) or base.weights_sha256):
            raise WeightsUnavailableError(_missing_artefact_weights(pretrained, base.weights_sha256, artefact_dir))
        if path is None and config is not None:
            why = (
                "no such file" if looks_like_file(pretrained)
                else "open_clip tags belong to model names, a config takes a file"
            )
            raise WeightsUnavailableError(
                f"CLIP weights {pretrained!r} for a model config: {why}. Fix: pass the config's weights file "
                "(an open_clip state dict, .bin/.pt/.safetensors) as --pretrained."
            )
    chosen = Backbone(
        model=model,
        config=config,
        pretrained=path.name if path is not None else pretrained,
        weights_sha256=file_sha256(path) if path is not None else None,
        attention=attention or base.attention,
        feature_source=feature_source or "final",
        # the activation the artefact's backbone ran with, as long as it is the same backbone
        quick_gelu=base.quick_gelu if own_arch and from_artefact else None,
    )
    record = "the upsampler's record"
    logger.debug(
        "backbone %s (architecture from %s, weights from %s), weights file %s, attention %s",
        chosen.describe(),
        "the flags" if not own_arch else record if artefact is not None else "the default",
        record if from_artefact else "the flags or the default" if pretrained is not None else "nowhere (random)",
        path.resolve() if path is not None else "none (an open_clip tag, or random weights)",
        chosen.attention,
    )
    if artefact is not None:
        _warn_if_other(artefact, chosen)
    elif config is not None and pretrained is None:
        logger.warning(
            "a model config without weights: the CLIP is randomly initialised (pass --pretrained FILE for real weights)"
        )
    return chosen, path


def warn_if_trained_on_random(record: "Backbone | None", upsampler) -> None:
    """One warning when ``upsampler`` (an artefact or model folder) was trained on a CLIP with random weights.

    Its features carry no meaning, so neither do its label maps: the offline demo's artefact
    (configs/train/tiny.yaml) is for checking that the commands work, nothing more.
    """
    if record is not None and record.pretrained is None:
        logger.warning(
            "%s was trained on a CLIP with random weights (%s): its results are meaningless, fine for a demo "
            "or a pipeline check only (train on real weights: python train/fit.py)",
            upsampler,
            record.describe(),
        )


def warn_if_folder_trained_on_random(manifest: dict, model_dir) -> None:
    """:func:`warn_if_trained_on_random` for a model folder (any kind), from its manifest's upsampler record."""
    upsampler = manifest.get("upsampler") or {}
    if upsampler.get("backbone"):  # the record of the artefact the folder was exported from
        warn_if_trained_on_random(Backbone.from_dict(upsampler["backbone"]), f"the upsampler of {model_dir}")


def is_config_file(model: str | os.PathLike) -> bool:
    """``--model`` names a model-config JSON file rather than an open_clip model."""
    return str(model).lower().endswith(".json")


def read_config(path: str | os.PathLike) -> dict:
    """An open_clip model config from a JSON file: {"embed_dim", "vision_cfg", "text_cfg", ...}.

    Also takes the Hugging Face hub's ``open_clip_config.json`` ({"model_cfg": {...}}).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise BackboneError(
            f"model config {path}: no such file (--model takes an open_clip model name or a model config .json)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BackboneError(f"model config {path}: not valid JSON ({err})") from None
    if isinstance(data, dict) and isinstance(data.get("model_cfg"), dict):
        data = data["model_cfg"]
    if not isinstance(data, dict):
        raise BackboneError(f"model config {path}: expected a JSON object like open_clip's model_configs/*.json")
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in data]
    if missing:
        raise BackboneError(
            f"model config {path}: missing {', '.join(missing)}; expected open_clip's model_configs format "
            '{"embed_dim": ..., "vision_cfg": {...}, "text_cfg": {...}}'
        )
    return data


def looks_like_file(pretrained: str) -> bool:
    """A weights value that is a file name or path, not an open_clip tag (tags have no '.' or '/')."""
    return bool(Path(pretrained).suffix) or any(sep in pretrained for sep in ("/", os.sep))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file; remembered per (path, size, mtime) within a process."""
    path = Path(path).resolve()
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256(Path(path))  # size and mtime only key the memo


def _json_digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _find_weights(pretrained: str, artefact_dir) -> Path | None:
    given = Path(pretrained).expanduser()
    if given.is_file():
        return given
    if artefact_dir is not None:
        beside = Path(artefact_dir) / given.name
        if beside.is_file():
            return beside
    return None


def _missing_artefact_weights(pretrained: str, sha256: str | None, artefact_dir) -> str:
    name = Path(pretrained).name
    where = f"as given or beside the artefact in {artefact_dir}" if artefact_dir is not None else "as given"
    checksum = f" (sha256 {sha256[:12]}...)" if sha256 else ""
    return (
        f"the upsampler was trained on CLIP weights {name}{checksum}, not found {where}. "
        f"Fix: pass that file with --pretrained /path/to/{name}."
    )


def _warn_if_other(artefact: Backbone, chosen: Backbone) -> None:
    other_arch = (artefact.model, artefact.config) != (chosen.model, chosen.config)
    other_name = Path(artefact.pretrained or "").name != Path(chosen.pretrained or "").name
    other_weights = bool(
        artefact.weights_sha256 and chosen.weights_sha256 and artefact.weights_sha256 != chosen.weights_sha256
    )
    if other_arch or other_name or other_weights:
        trained = artefact.describe() + (f" (sha256 {artefact.weights_sha256[:12]}...)" if other_weights else "")
        runs = chosen.describe() + (f" (sha256 {chosen.weights_sha256[:12]}...)" if other_weights else "")
        logger.warning("the upsampler was trained for %s but runs on %s", trained, runs)


__all__ = [
    "ATTENTION_MODES",
    "FEATURE_SOURCES",
    "Backbone",
    "BackboneError",
    "WeightsUnavailableError",
    "file_sha256",
    "read_config",
    "resolve",
    "warn_if_trained_on_random",
]
