"""Evaluation (SPEC 6): intersection and union accumulated over a whole dataset.

Torch-free, like the runtime: predictions from either path are scored the same way.
Ground truth goes through the preset's label notes (SPEC 5) first: ``reduce_zero_label``
(raw 0 is no-data, the rest shift down by 1) and ``binary_255`` (masks stored as 0/255).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import imaging
from .constants import IGNORE_INDEX

LABEL_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")  # lossless formats, matched case-insensitively


class LabelError(ValueError):
    """A ground-truth file that cannot be scored; the message says why."""


def read_label(path: Path) -> np.ndarray:
    """A label image's stored values, (H, W) integers: index/palette/16-bit PNG, BMP or one-band TIFF."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            raw = tifffile.imread(path)
            if raw.ndim == 3 and 1 in (raw.shape[0], raw.shape[-1]):  # one band, stored (1, H, W) or (H, W, 1)
                raw = raw.reshape(raw.shape[1:] if raw.shape[0] == 1 else raw.shape[:-1])
        else:
            from PIL import Image

            with Image.open(path) as im:  # palette ("P") images give their indices, not colours
                raw = np.asarray(im)
    except Exception as err:  # decoders raise many types on damaged files
        raise LabelError(f"cannot read label {path}: {err}") from None
    if raw.ndim == 3 and raw.shape[-1] in (2, 3, 4) and (raw[..., :3] == raw[..., :1]).all():
        raw = raw[..., 0]  # grey stored as RGB(A) or grey + alpha
    if raw.dtype == bool:  # 1-bit PNG / bilevel TIFF masks
        raw = raw.astype(np.uint8)
    elif np.issubdtype(raw.dtype, np.floating) and raw.ndim == 2 and np.array_equal(raw, np.round(raw)):
        raw = raw.astype(np.int64)  # float rasters that hold class numbers
    if raw.ndim != 2:
        raise LabelError(f"label {path} has shape {raw.shape}: expected one band of class indices "
                         "(colour-coded RGB labels need converting to indices first)")
    if not np.issubdtype(raw.dtype, np.integer):
        raise LabelError(f"label {path} holds {raw.dtype} values that are not whole numbers: expected class indices")
    return raw


def prepare_labels(
    raw: np.ndarray, n_classes: int, *, reduce_zero_label: bool = False, binary_255: bool = False
) -> np.ndarray:
    """(H, W) stored label values -> int32 class indices, :data:`IGNORE_INDEX` where ignored (SPEC 5).

    Raises LabelError for a value that is neither a class index nor ignored (wrong preset or label
    notes, or colour-coded labels).
    """
    if reduce_zero_label and binary_255:
        raise LabelError("reduce_zero_label and binary_255 exclude each other (the foreground would become class 0)")
    label = raw.astype(np.int32)
    if binary_255:
        label[label == 255] = 1  # 0/255 masks; 0/1 masks pass unchanged
    if reduce_zero_label:
        label = np.where((label == 0) | (label == IGNORE_INDEX), IGNORE_INDEX, label - 1).astype(np.int32)
    bad = np.unique(label[((label < 0) | (label >= n_classes)) & (label != IGNORE_INDEX)])
    if bad.size:
        notes = (
            ", ".join(n for n, on in (("reduce_zero_label", reduce_zero_label), ("binary_255", binary_255)) if on)
            or "none"
        )
        hint = ""
        if not reduce_zero_label and bad.max() == n_classes and bad.min() > 0:
            hint = (
                " (labels 1..K with 0 for no-data, as mmsegmentation writes Potsdam/Vaihingen? try --reduce-zero-label)"
            )
        raise LabelError(
            f"label values {bad[:5].tolist()} are not class indices 0..{n_classes - 1} or {IGNORE_INDEX} (ignored) "
            f"after the label notes ({notes}){hint}: wrong preset, label notes or folder, or colour-coded labels"
        )
    return label


class IoU:
    """Confusion counts over a dataset: ``update`` per image, then per-class IoU and the summary.

    Pixels whose label is :data:`IGNORE_INDEX` are left out. Classes that appear neither in the
    labels nor in the predictions have no IoU (NaN) and do not enter the mean (as mmsegmentation).
    Memory is K x K counts, whatever the dataset's size.
    """

    def __init__(self, n_classes: int):
        self.n_classes = n_classes
        self.confusion = np.zeros((n_classes, n_classes), np.int64)  # [label, prediction]

    def update(self, prediction: np.ndarray, label: np.ndarray) -> None:
        """(H, W) predicted class indices and (H, W) prepared labels of the same size."""
        if prediction.shape != label.shape:
            raise LabelError(
                f"label is {label.shape[1]}x{label.shape[0]} but its image "
                f"{prediction.shape[1]}x{prediction.shape[0]}: "
                "labels are scored at the image's size (SPEC 6), give the label that matches it"
            )
        keep = label != IGNORE_INDEX
        k = self.n_classes
        pairs = label[keep].astype(np.int64) * k + prediction[keep]
        self.confusion += np.bincount(pairs, minlength=k * k).reshape(k, k)

    @property
    def per_class(self) -> np.ndarray:
        """(K,) IoU of every class, NaN where its union is empty."""
        inter = np.diag(self.confusion).astype(np.float64)
        union = self.confusion.sum(0) + self.confusion.sum(1) - inter
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, inter / union, np.nan)

    def summary(self, names, *, foreground_only: bool = False) -> "Report":
        """``foreground_only``: a single-class dataset (background | X), scored by X's IoU (SPEC 6)."""
        per_class = self.per_class
        total = int(self.confusion.sum())
        accuracy = float(np.diag(self.confusion).sum() / total) if total else float("nan")
        if foreground_only:
            if self.n_classes != 2:
                raise LabelError(
                    f"the foreground IoU needs exactly 2 classes (background, foreground), got {self.n_classes}"
                )
            score, metric = float(per_class[1]), f"IoU({names[1]})"
        else:
            score = float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")
            metric = "mIoU"
        return Report(
            metric, score, dict(zip(_unique(names), map(float, per_class))), accuracy, total, self.confusion.tolist()
        )


def _unique(names) -> list[str]:
    """Display names, numbered where two classes share one (the report is keyed by them)."""
    names = list(names)
    return [f"{n} ({k})" if names.count(n) > 1 else n for k, n in enumerate(names)]


@dataclass
class Report:
    metric: str  # "mIoU" or "IoU(<foreground class>)"
    score: float  # 0..1
    per_class: dict[str, float]  # class name -> IoU (NaN: neither labelled nor predicted)
    pixel_accuracy: float
    pixels: int  # scored pixels (ignored ones left out)
    confusion: list[list[int]]  # [label][prediction] pixel counts: reports of parts add up to the whole

    def as_dict(self) -> dict:
        def percent(v):
            return None if np.isnan(v) else 100 * v

        return {
            "metric": self.metric,
            "score": percent(self.score),
            "pixel_accuracy": percent(self.pixel_accuracy),
            "per_class_iou": {k: percent(v) for k, v in self.per_class.items()},
            "unit": "percent",
            "pixels": self.pixels,
            "confusion": self.confusion,
            "confusion_axes": ["label", "prediction"],
        }

    def table(self) -> str:
        width = max(len("class"), *(len(n) for n in self.per_class)) + 2
        lines = [f"{'class':<{width}}IoU %"]
        lines += [
            f"{name:<{width}}{100 * v:6.2f}" if np.isfinite(v) else f"{name:<{width}}     -"
            for name, v in self.per_class.items()
        ]
        lines += [
            f"{self.metric} {100 * self.score:.2f} %, "
            f"pixel accuracy {100 * self.pixel_accuracy:.2f} % over {self.pixels} pixels"
        ]
        return "\n".join(lines)


def pair_labels(
    images, label_dirs, *, suffix: str = "", image_suffix: str = "", strict: bool = True
) -> list[Path | None]:
    """The label file of every image, found in ``label_dirs`` (searched in order).

    Label name = image stem, minus ``image_suffix`` at its end, plus ``suffix``, with one of
    LABEL_SUFFIXES in any letter case (``x_sat.jpg`` -> ``x_mask.png`` with image_suffix
    ``_sat`` and suffix ``_mask``). ``strict=False``: None for an image without a label.
    """
    tables = []
    for folder in map(Path, label_dirs):
        if not folder.is_dir():
            raise LabelError(f"label folder not found: {folder}")
        tables.append(
            {p.name.lower(): p for p in folder.iterdir() if p.suffix.lower() in LABEL_SUFFIXES and p.is_file()}
        )
    found, missing = [], []
    for image in map(Path, images):
        stem = image.stem
        if image_suffix and stem.endswith(image_suffix):
            stem = stem[: -len(image_suffix)]
        wanted = [f"{stem}{suffix}{ext}".lower() for ext in LABEL_SUFFIXES]
        match = next((table[w] for table in tables for w in wanted if w in table), None)
        if match is None:
            missing.append((image, f"{stem}{suffix}.png"))
        found.append(match)
    if missing and strict:
        (image, name), more = missing[0], len(missing) - 1
        raise LabelError(
            f"no label for {image} (looked for {name} or .tif/.tiff/.bmp in {', '.join(map(str, label_dirs))})"
            + (f" and {more} more image(s)" if more else "")
            + "; check --labels, --label-suffix and --image-suffix"
        )
    return found


@dataclass(frozen=True)
class LabelNotes:
    """How a dataset stores its labels and how it is scored (SPEC 5, 6); presets carry them."""

    reduce_zero_label: bool = False  # raw 0 is no-data, the rest shift down by 1 (LoveDA)
    binary_255: bool = False  # 0/255 masks: 255 is the foreground class, not ignored
    foreground_iou: bool = False  # a single-class set: scored by its foreground IoU, not mIoU

    @classmethod
    def resolve(cls, preset_labels: dict | None = None, **given) -> "LabelNotes":
        """The preset's notes, each overridden where ``given`` is not None."""
        unknown = set(given) - set(cls.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown label notes {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        preset_labels = preset_labels or {}
        return cls(
            **{
                name: bool(preset_labels.get(name)) if given.get(name) is None else bool(given[name])
                for name in cls.__dataclass_fields__
            }
        )


class LabelledImages:
    """Image files paired with their label files; labels read and prepared on demand.

    Each image is kept once (resolved paths), files that are another image's label are not
    images (labels kept beside their images), and one label serving two images is refused.
    """

    def __init__(
        self, images, label_dirs, n_classes: int, notes: LabelNotes, *, suffix: str = "", image_suffix: str = ""
    ):
        if notes.reduce_zero_label and notes.binary_255:
            raise LabelError(
                "reduce_zero_label and binary_255 exclude each other (the foreground would become class 0)"
            )
        if (notes.binary_255 or notes.foreground_iou) and n_classes != 2:
            raise LabelError(
                f"binary_255 / foreground_iou (--binary-255 / --foreground-iou) need exactly 2 classes "
                f"(background, foreground), got {n_classes}"
            )
        pairing = dict(suffix=suffix, image_suffix=image_suffix)
        label_dirs = [label_dirs] if isinstance(label_dirs, (str, Path)) else list(label_dirs)
        images = list(dict.fromkeys(Path(p).resolve() for p in images))
        paired = pair_labels(images, label_dirs, **pairing, strict=False)  # one listing of the label folders
        found = {label.resolve() for label in paired if label is not None}
        kept = [(image, label) for image, label in zip(images, paired) if image not in found]
        unlabelled = [image for image, label in kept if label is None]
        if unlabelled:
            pair_labels(unlabelled, label_dirs, **pairing)  # raises the one-line message
        self.images = [image for image, _ in kept]
        self.labels = [label for _, label in kept]
        shared = [label for label, n in Counter(self.labels).items() if n > 1]
        if shared:
            raise LabelError(
                f"{shared[0]} is the label of several images (same stem in two folders?): evaluate them separately"
            )
        self.n_classes, self.notes = n_classes, notes

    def __len__(self) -> int:
        return len(self.images)

    def label(self, i: int) -> np.ndarray:
        """(H, W) int32 class indices of image ``i``, IGNORE_INDEX where ignored."""
        raw = read_label(self.labels[i])
        try:
            return prepare_labels(
                raw, self.n_classes, reduce_zero_label=self.notes.reduce_zero_label, binary_255=self.notes.binary_255
            )
        except LabelError as err:
            raise LabelError(f"{self.labels[i]}: {err}") from None

    def check(self, i: int) -> None:
        """Read label ``i`` and compare its size with its image's header: before any inference."""
        height, width = self.label(i).shape
        h, w = imaging.image_size(self.images[i])
        if (height, width) != (h, w):
            raise LabelError(
                f"{self.labels[i]} is {width}x{height} but {self.images[i]} is {w}x{h}: "
                "labels are scored at the image's size (SPEC 6), give the label that matches it"
            )
