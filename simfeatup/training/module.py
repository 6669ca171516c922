"""LightningModule for SimFeatUp's self-supervised training (SPEC 4).

Per batch of uint8 crops: frozen DenseCLIP features L; then, n_jitters times, H = up(L, img),
a random transform tau of image and H, L' = f(tau(img)), a fresh random projection, the
attention downsampler D(tau(H)), the uncertainty-weighted reconstruction loss and the image
reconstruction loss. Each jitter is back-propagated on its own (the reference does the same)
so only one jitter's high-res graph is alive at a time; gradients add up over the jitters.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from simfeatup.atomic import remove_stale_temporaries
from simfeatup.backbone import CHECKPOINT_KEY, resolve
from simfeatup.constants import CLIP_MEAN, CLIP_STD
from simfeatup.encoder import DenseCLIP
from simfeatup.training.downsampler import AttentionDownsampler
from simfeatup.training.jitter import MAX_PAD, MAX_ZOOM, apply_jitter, sample_jitter
from simfeatup.training.losses import (
    PROJ_DIM,
    ImageHead,
    UncertaintyHead,
    image_loss,
    project,
    random_projection,
    reconstruction_loss,
)
from simfeatup.training.preview import preview
from simfeatup.upsampler import SimFeatUp, save_upsampler
from simfeatup.visualize import save_atomic

logger = logging.getLogger(__name__)

# SPEC 4 -- 5 jitters, image-reconstruction weight 0.1, NAdam lr 1e-3, gradient-norm clip 1e-4
# during the first 10 optimizer steps.
N_JITTERS = 5
IMG_WEIGHT = 0.1
LR = 1e-3
CLIP_STEPS = 10
CLIP_NORM = 1e-4
ARTEFACT_NAME = "upsampler.safetensors"
PREVIEW_SUBDIR = "previews"
BACKBONE_KEY = CHECKPOINT_KEY


class SimFeatUpModule(L.LightningModule):
    """Trains a :class:`~simfeatup.upsampler.SimFeatUp` for a frozen DenseCLIP backbone.

    Args:
        model, pretrained: the backbone: an open_clip model name or a model config .json, and a
            weights tag or local file (default ViT-B-16 / openai; see simfeatup.backbone.resolve).
        clip_config: instead of ``model`` (which it replaces), an open_clip model config dict;
            random weights unless ``pretrained`` names a weights file (tests and CI: random).
        attention: DenseCLIP last-block mode (SPEC 2.3).
        feature_source: "final" learns the features used at inference (default, SPEC 8);
            "penultimate" the last block's input, as the authors trained their weights.
        radius, key_dim, shared: SimFeatUp architecture.
        n_jitters, proj_dim, lr, img_weight, clip_steps, clip_norm, max_pad, max_zoom: SPEC 4.
        preview_every_n_steps: this often (0: never), a preview of up to 4 samples of the batch (image |
            low-res | upsampled | bilinear features, see simfeatup.training.preview) as
            ``previews/step_NNNNNN.png`` in the run folder and in TensorBoard.
        val_seed: seed of the validation jitters and projections, so validation is comparable
            across steps and runs.
        artefact_dir: where ``upsampler.safetensors`` + ``.json`` go (default: the Trainer's
            ``default_root_dir``); written at every checkpoint and at the end of fit.
    """

    def __init__(
        self,
        model: str | None = None,
        pretrained: str | None = None,
        clip_config: dict | None = None,
        attention: str = "segearth",
        feature_source: Literal["final", "penultimate"] = "final",
        radius: int = 5,
        key_dim: int = 32,
        shared: bool = True,
        n_jitters: int = N_JITTERS,
        proj_dim: int = PROJ_DIM,
        lr: float = LR,
        img_weight: float = IMG_WEIGHT,
        clip_steps: int = CLIP_STEPS,
        clip_norm: float = CLIP_NORM,
        max_pad: int = MAX_PAD,
        max_zoom: float = MAX_ZOOM,
        preview_every_n_steps: int = 100,
        val_seed: int = 0,
        artefact_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        # clip_config replaces model: the default recipe (quickstart.yaml) under every config names one.
        record, weights = resolve(model=None if clip_config is not None else model, pretrained=pretrained,
                                  config=clip_config, attention=attention, feature_source=feature_source)
        self.backbone = DenseCLIP.from_backbone(record, weights)  # .backbone.backbone: the record of what runs
        dim, patch = self.backbone.embed_dim, self.backbone.patch_size
        self.upsampler = SimFeatUp(dim, patch, radius=radius, key_dim=key_dim, shared=shared)
        self.downsampler = AttentionDownsampler(dim, patch)
        self.uncertainty = UncertaintyHead(dim)
        self.image_head = ImageHead(dim)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).reshape(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).reshape(1, 3, 1, 1) * 255, persistent=False)
        # Jitters are back-propagated one by one (memory), so the optimizer step is ours.
        self.automatic_optimization = False
        self._swept: set[Path] = set()  # artefact folders already cleared of stale temporaries
        self._written: dict[Path, int] = {}  # artefact folder -> the step whose weights it holds

    # ------------------------------------------------------------------ pieces
    def train(self, mode: bool = True):
        """The backbone stays in eval mode whatever Lightning asks of the module."""
        super().train(mode)
        self.backbone.eval()
        return self

    def normalise(self, batch: Tensor) -> Tensor:
        """uint8 (B, 3, H, W) RGB -> float32 CLIP-normalised, on the batch's device."""
        return (batch.float() - self.mean) / self.std

    @torch.no_grad()
    def features(self, img: Tensor) -> Tensor:
        """Frozen backbone features (B, C, H/p, W/p) in float32 (under the Trainer's autocast)."""
        feats, _ = self.backbone(img, source=self.hparams.feature_source)
        return feats.float()

    def jitter_losses(
        self, high: Tensor, img: Tensor, *, generator: torch.Generator | None = None, bilinear: Tensor | None = None
    ) -> dict[str, Tensor]:
        """SPEC 4 steps 2-7 for one random transform.

        ``high`` (B, C, H, W) upsampled features, ``img`` (B, 3, H, W) normalised image.
        With ``bilinear`` (B, C, H, W) also scores it with the same transform and projection.
        """
        b, c = high.shape[:2]
        params = sample_jitter(
            b, tuple(img.shape[-2:]), max_pad=self.hparams.max_pad, max_zoom=self.hparams.max_zoom, generator=generator
        )
        jit_img = apply_jitter(img, params)
        target = self.features(jit_img)  # L' (B, C, h, w)
        proj = random_projection(b, c, self.hparams.proj_dim, generator=generator, device=img.device)
        scale = self.uncertainty(target)  # (B, 1, h, w)
        proj_target = project(target, proj)

        def rec(h: Tensor) -> tuple[Tensor, Tensor]:
            jit_high = apply_jitter(h, params)
            down = project(self.downsampler(jit_high), proj)
            return reconstruction_loss(down.float(), proj_target, scale.float()), jit_high

        out = {}
        out["rec"], jit_high = rec(high)
        out["img"] = image_loss(jit_img, self.image_head(jit_high).float())
        if bilinear is not None:
            out["rec_bilinear"], _ = rec(bilinear)
        return out

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        opt = self.optimizers()
        img = self.normalise(batch)
        low = self.features(img)
        n = self.hparams.n_jitters
        totals = {"rec": 0.0, "img": 0.0}
        opt.zero_grad()
        for j in range(n):
            # Recomputed per jitter: the upsampler's dropouts draw anew, and only one
            # jitter's high-res graph is ever held in memory.
            high = self.upsampler(low, img)
            losses = self.jitter_losses(high, img)
            loss = (losses["rec"] + self.hparams.img_weight * losses["img"]) / n
            # Under DDP Lightning all-reduces each manual backward; the heads are small.
            self.manual_backward(loss)
            for k in totals:
                totals[k] += losses[k].detach() / n
            if j == 0:
                self._maybe_preview(batch, low, high)
        opt.step()
        total = totals["rec"] + self.hparams.img_weight * totals["img"]
        self.log("train/loss", total, prog_bar=True, batch_size=batch.shape[0])
        self.log("train/rec", totals["rec"], batch_size=batch.shape[0])
        self.log("train/img", totals["img"], batch_size=batch.shape[0])

    def on_before_optimizer_step(self, optimizer) -> None:
        # Called after AMP unscaling, so the norm is the true one in every precision.
        if self.global_step < self.hparams.clip_steps:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.clip_norm, gradient_clip_algorithm="norm")

    def configure_optimizers(self):
        params = [
            *self.upsampler.parameters(),
            *self.downsampler.parameters(),
            *self.uncertainty.parameters(),
            *self.image_head.parameters(),
        ]
        return torch.optim.NAdam(params, lr=self.hparams.lr, weight_decay=0.0)

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        """SPEC reconstruction loss of the upsampler and of bilinear upsampling, same crops,
        transforms and projections (seeded by ``val_seed`` and the batch index)."""
        generator = torch.Generator().manual_seed(self.hparams.val_seed * 1_000_003 + batch_idx)
        img = self.normalise(batch)
        low = self.features(img)
        high = self.upsampler(low, img)
        bilinear = F.interpolate(low, size=img.shape[-2:], mode="bilinear", align_corners=False)
        n = self.hparams.n_jitters
        totals = {"rec": 0.0, "img": 0.0, "rec_bilinear": 0.0}
        for _ in range(n):
            losses = self.jitter_losses(high, img, generator=generator, bilinear=bilinear)
            for k in totals:
                totals[k] += losses[k] / n
        for k, v in totals.items():
            self.log(f"val/{k}", v, prog_bar=k != "img", batch_size=batch.shape[0], sync_dist=True)

    # ------------------------------------------------------------------ previews
    def _maybe_preview(self, batch: Tensor, low: Tensor, high: Tensor) -> None:
        every = self.hparams.preview_every_n_steps
        if not every or self.global_step % every or not self.trainer.is_global_zero:
            return
        picture = preview(batch, low, high)
        # A PNG in the run folder for everyone; TensorBoard gets the same picture.
        path = self.preview_dir() / f"step_{self.global_step:06d}.png"
        save_atomic(picture, path)
        logger.debug("preview: %s", path)
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image("preview", np.asarray(picture), self.global_step, dataformats="HWC")

    def preview_dir(self) -> Path:
        """Where the preview PNGs go: ``previews/`` in the run folder (the Trainer's ``default_root_dir``)."""
        return Path(self.trainer.default_root_dir) / PREVIEW_SUBDIR

    # ------------------------------------------------------------------ checkpoints and artefact
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The frozen backbone is rebuilt from the hyperparameters; storing it would multiply
        # every checkpoint's size (~600 MB for ViT-B/16) for nothing.
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("backbone.")]:
            del state[key]
        checkpoint[BACKBONE_KEY] = self.backbone.backbone.to_dict()
        if self.trainer.is_global_zero:
            self.write_artefact()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # The same backbone, wherever its weights file lies now: compared by record, not by path.
        saved = checkpoint.get(BACKBONE_KEY) or _legacy_backbone(checkpoint.get("hyper_parameters", {}))
        mine = self.backbone.backbone.to_dict()
        for key in ("model", "config", "pretrained", "weights_sha256", "attention", "feature_source"):
            theirs = saved.get(key)
            if key == "pretrained" and theirs:
                theirs = Path(theirs).name  # older checkpoints hold the path as typed
            if key == "weights_sha256" and theirs is None:
                continue  # not recorded by older checkpoints
            if theirs != mine[key]:
                flag = {"config": "clip_config", "weights_sha256": "pretrained"}.get(key, key)
                raise ValueError(
                    f"checkpoint was trained with backbone {key}={theirs!r} but this run has {key}={mine[key]!r}; "
                    f"resume with the same --model.{flag} (or start a new run directory)"
                )
        # Put the (identical, frozen) backbone back so the state dict loads strictly.
        state = checkpoint["state_dict"]
        for key, value in self.backbone.state_dict(prefix="backbone.").items():
            state.setdefault(key, value)
        # Another upsampler or head architecture (radius, key_dim, ...) in one line, not load_state_dict's traceback.
        own = self.state_dict()
        wrong = sorted(set(own) ^ set(state)) + [k for k in own if k in state and own[k].shape != state[k].shape]
        if wrong:
            where = getattr(self._trainer, "ckpt_path", None) or "the checkpoint"
            raise ValueError(
                f"{where} holds another model's weights ({', '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''} "
                "differ); resume with the --model.* settings of the run that wrote it (or start a new run directory)"
            )

    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero:
            self.write_artefact()

    def artefact_info(self) -> tuple[dict, dict]:
        """(backbone, extra) dicts stored beside the upsampler weights."""
        hp = dict(self.hparams)
        backbone = self.backbone.backbone.to_dict()  # simfeatup.backbone.Backbone: weights by name + sha256
        trainer = self._trainer
        training = {"steps": int(self.global_step), "config": _jsonable(hp)}
        if trainer is not None:
            training["epoch"] = int(trainer.current_epoch)
            datamodule = getattr(trainer, "datamodule", None)
            if datamodule is not None:
                training["data"] = _jsonable(dict(getattr(datamodule, "hparams", {})))
        return backbone, {"training": training}

    def write_artefact(self, directory: str | os.PathLike | None = None) -> Path:
        """Write ``upsampler.safetensors`` + ``upsampler.json`` atomically; returns the path."""
        if directory is None:
            directory = self.hparams.artefact_dir or (self._trainer.default_root_dir if self._trainer else ".")
        directory = Path(directory)
        final = directory / ARTEFACT_NAME
        if self._written.get(directory) == self.global_step and final.is_file():
            # a step checkpoint, last.ckpt and the end of fit all ask at the same step: one write, one line
            return final
        if directory not in self._swept:  # once per folder: what a killed earlier run left half-written
            remove_stale_temporaries(directory)
            self._swept.add(directory)
        backbone, extra = self.artefact_info()
        # save_upsampler writes each file atomically (weights first, then the .json): a run
        # killed mid-write never leaves a truncated artefact under the final name.
        save_upsampler(self.upsampler, final, backbone=backbone, extra=extra)
        self._written[directory] = self.global_step
        logger.info("wrote %s (step %d)", final, self.global_step)
        return final


def _legacy_backbone(hp: dict) -> dict:
    """The backbone of a checkpoint written before BACKBONE_KEY, from its hyperparameters."""
    config = hp.get("clip_config")
    return {
        "model": None if config is not None else hp.get("model"),
        "config": config,
        "pretrained": None if config is not None else hp.get("pretrained"),
        "attention": hp.get("attention"),
        "feature_source": hp.get("feature_source"),
    }


def _jsonable(value):
    """Best-effort conversion of hyperparameters to JSON-safe values."""
    return json.loads(json.dumps(value, default=str))
