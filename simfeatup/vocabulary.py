"""Class lines -> text queries (SPEC 2, text side). Torch-free: the ONNX runtime uses it too."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


class VocabularyError(ValueError):
    """A class list that cannot be used; the message says how to write one."""


def _parse_line(line: str) -> tuple[str, ...]:
    return tuple(word.strip() for word in line.split(",") if word.strip())


@dataclass(frozen=True)
class Vocabulary:
    """Classes, each a tuple of synonym queries that all vote for it.

    ``"building,roof,house"`` is one class with three queries; "background" is an
    ordinary query.
    """

    classes: tuple[tuple[str, ...], ...]

    def __post_init__(self):
        if not self.classes or any(not synonyms for synonyms in self.classes):
            raise VocabularyError(
                'empty class list: give class lines like --classes "building,roof;road;water" '
                "(';' separates classes, ',' separates synonyms)"
            )
        from .tokenizer import clean  # the text CLIP's tokenizer sees: "Road" and "road" are one query

        seen: dict[str, int] = {}
        for k, synonyms in enumerate(self.classes):
            for word in synonyms:
                key = clean(word)
                if key in seen:
                    where = f"twice in class {k + 1}" if seen[key] == k else f"in classes {seen[key] + 1} and {k + 1}"
                    raise VocabularyError(f"{word!r} is given {where}: each word may vote for one class only "
                                          "(';' separates classes, ',' separates synonyms)")
                seen[key] = k

    def advice(self) -> list[str]:
        """What looks like a mistyped class list (it still runs): one class, or separators other than ';' and ','."""
        notes = []
        if len(self.classes) == 1:
            notes.append(f"one class ({self.names[0]!r}): every pixel is scored against it alone, so (nearly) every "
                         "pixel gets it; list the other classes too (e.g. 'background'), separated by ';'")
        for word in self.queries:
            odd = [c for c in "|/" if c in word]
            if odd:
                notes.append(f"class word {word!r} contains {odd[0]!r}: ';' separates classes and ',' synonyms")
        return notes

    @classmethod
    def from_lines(cls, lines) -> "Vocabulary":
        """One class line per item; blank lines and ``#`` comments are skipped."""
        return cls(tuple(p for p in (_parse_line(line) for line in lines if not line.lstrip().startswith("#")) if p))

    @classmethod
    def from_spec(cls, spec: str) -> "Vocabulary":
        """``"building,roof;road;water"``: ';' or newlines separate classes."""
        return cls.from_lines(spec.replace(";", "\n").splitlines())

    @classmethod
    def from_file(cls, path: str | Path) -> "Vocabulary":
        path = Path(path)
        if not path.is_file():
            raise VocabularyError(f"classes file not found: {path}")
        return cls.from_lines(path.read_text(encoding="utf-8").splitlines())

    @classmethod
    def from_preset(cls, name: str) -> "Vocabulary":
        from . import presets

        return cls.from_lines(presets.load(name).classes)

    @property
    def names(self) -> list[str]:
        """A display name per class: its first synonym."""
        return [synonyms[0] for synonyms in self.classes]

    @property
    def queries(self) -> list[str]:
        """Every query word, class by class."""
        return [word for synonyms in self.classes for word in synonyms]

    @property
    def query_class(self) -> np.ndarray:
        """(Q,) the class index each query votes for."""
        return np.asarray([k for k, synonyms in enumerate(self.classes) for _ in synonyms], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.classes)
