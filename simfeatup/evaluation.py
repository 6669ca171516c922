"""Evaluation (SPEC 6): intersection and union accumulated over a whole dataset.

Torch-free, like the runtime: predictions from either path are scored the same way.
Ground truth goes through the preset's label notes (SPEC 5) first: ``reduce_zero_label``
(raw 0 is no-data, the rest shift down by 1) and ``binary_255`` (masks stored as 0/255).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .constants import IGNORE_INDEX

LABEL_EXTS = (".png", ".tif", ".tiff", ".bmp")


class LabelError(ValueError):
    """A ground-truth file that cannot be scored; the message names it and says why."""


def read_label(path: Path) -> np.ndarray:
    """A label image's stored values, (H, W) integers: index/palette PNG, BMP or single-band TIFF."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            raw = np.squeeze(tifffile.imread(path))
        else:
            from PIL import Image

            with Image.open(path) as im:  # palette ("P") images give their indices, not colours
                raw = np.asarray(im)
    except Exception as err:  # decoders raise many types on damaged files
        raise LabelError(f"cannot read label {path}: {err}") from None
    if raw.ndim == 3 and raw.shape[-1] in (3, 4) and (raw[..., :3] == raw[..., :1]).all():
        raw = raw[..., 0]  # grey stored as RGB(A)
    if raw.ndim != 2 or not np.issubdtype(raw.dtype, np.integer):
        raise LabelError(f"label {path} is {raw.dtype} {raw.shape}: expected one channel of integer class indices "
                         "(colour-coded labels need converting to indices first)")
    return raw


def prepare_labels(raw: np.ndarray, n_classes: int, *, reduce_zero_label: bool = False, binary_255: bool = False) -> np.ndarray:
    """(H, W) stored label values -> class indices, :data:`IGNORE_INDEX` where ignored (SPEC 5).

    Raises LabelError for a value that is neither a class index nor ignored (wrong preset, or a
    colour-coded label image that needs converting to indices first).
    """
    if raw.ndim != 2:
        raise LabelError(f"label image has shape {raw.shape}: expected one channel of class indices (H, W)")
    label = raw.astype(np.int64)
    if binary_255:
        label[label == 255] = 1  # 0/255 masks; 0/1 masks pass unchanged
    if reduce_zero_label:
        label = np.where((label == 0) | (label == IGNORE_INDEX), IGNORE_INDEX, label - 1)
    bad = np.unique(label[(label >= n_classes) & (label != IGNORE_INDEX)])
    if bad.size:
        notes = ", ".join(n for n, on in (("reduce_zero_label", reduce_zero_label), ("binary_255", binary_255)) if on) or "none"
        raise LabelError(
            f"label values {bad[:5].tolist()} are not class indices 0..{n_classes - 1} or {IGNORE_INDEX} (ignored) "
            f"after the label notes ({notes}): wrong preset or label folder, or colour-coded labels that need converting to indices"
        )
    return label


class IoU:
    """Confusion counts over a dataset: ``update`` per image, then per-class IoU and the summary.

    Pixels whose label is :data:`IGNORE_INDEX` are left out. Classes that appear neither in the
    labels nor in the predictions have no IoU (NaN) and do not enter the mean.
    """

    def __init__(self, n_classes: int):
        self.n_classes = n_classes
        self.confusion = np.zeros((n_classes, n_classes), np.int64)  # [label, prediction]

    def update(self, prediction: np.ndarray, label: np.ndarray) -> None:
        """(H, W) predicted class indices and (H, W) prepared labels of the same size."""
        if prediction.shape != label.shape:
            raise LabelError(f"label is {label.shape[1]}x{label.shape[0]} but the image {prediction.shape[1]}x{prediction.shape[0]}: "
                             "labels are scored at the image's size, give the label that matches it")
        keep = label != IGNORE_INDEX
        k = self.n_classes
        pairs = label[keep].astype(np.int64) * k + prediction[keep].astype(np.int64)
        self.confusion += np.bincount(pairs, minlength=k * k).reshape(k, k)

    @property
    def per_class(self) -> np.ndarray:
        """(K,) IoU of every class, NaN where its union is empty."""
        inter = np.diag(self.confusion).astype(np.float64)
        union = self.confusion.sum(0) + self.confusion.sum(1) - inter
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, inter / union, np.nan)

    def summary(self, names, *, foreground_only: bool = False) -> "Report":
        per_class = self.per_class
        total = self.confusion.sum()
        accuracy = float(np.diag(self.confusion).sum() / total) if total else float("nan")
        if foreground_only:  # SPEC 6: single-class datasets report the foreground class (index 1)
            score, metric = float(per_class[1]), f"IoU({names[1]})"
        else:
            score, metric = float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan"), "mIoU"
        return Report(metric, score, dict(zip(names, (float(v) for v in per_class))), accuracy, int(total))


@dataclass
class Report:
    metric: str  # "mIoU" or "IoU(<foreground class>)"
    score: float  # 0..1
    per_class: dict[str, float]  # class name -> IoU (NaN: neither labelled nor predicted)
    pixel_accuracy: float
    pixels: int  # scored pixels (ignored ones left out)

    def as_dict(self) -> dict:
        def num(v):
            return None if np.isnan(v) else round(100 * v, 2)

        return {
            "metric": self.metric, "score": num(self.score), "pixel_accuracy": num(self.pixel_accuracy),
            "per_class_iou": {k: num(v) for k, v in self.per_class.items()}, "pixels": self.pixels, "unit": "percent",
        }

    def table(self) -> str:
        width = max(len(n) for n in self.per_class) + 2
        lines = [f"{'class':<{width}}IoU %"]
        lines += [f"{name:<{width}}{100 * v:6.2f}" if np.isfinite(v) else f"{name:<{width}}     -" for name, v in self.per_class.items()]
        lines += [f"{self.metric} {100 * self.score:.2f} %, pixel accuracy {100 * self.pixel_accuracy:.2f} % over {self.pixels} pixels"]
        return "\n".join(lines)


def pair_labels(images, label_dir: Path, suffix: str = "") -> list[Path]:
    """The label file of every image: ``label_dir / (image stem + suffix + one of LABEL_EXTS)``."""
    label_dir = Path(label_dir)
    if not label_dir.is_dir():
        raise LabelError(f"label folder not found: {label_dir}")
    found, missing = [], []
    for image in images:
        candidates = [label_dir / f"{Path(image).stem}{suffix}{ext}" for ext in LABEL_EXTS]
        match = next((c for c in candidates if c.is_file()), None)
        (found if match else missing).append(match or image)
    if missing:
        first = ", ".join(f"{label_dir}/{Path(m).stem}{suffix}.png" for m in missing[:3])
        raise LabelError(f"{len(missing)} image(s) have no label (looked for e.g. {first}); check --labels and --label-suffix")
    return found
