"""CLIP's byte-level BPE tokenizer without torch: the same ids as open_clip's SimpleTokenizer.

The rules (from OpenAI CLIP, as open_clip applies them with ``clean="lower"``): ftfy-fix the
text, HTML-unescape it twice, collapse whitespace, lowercase; split it with CLIP's regex;
map each piece's UTF-8 bytes to printable characters; merge byte pairs by rank from the merges
file, the last symbol of a piece carrying the end-of-word mark ``</w>``; wrap in
start/end-of-text ids; cut to the context length keeping the end-of-text id last; pad with 0.
"""
from __future__ import annotations

import gzip
import html
from functools import lru_cache
from pathlib import Path

import ftfy
import numpy as np
import regex

N_MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 256 bytes x 2 (with </w>) + merges + 2 specials
SPECIALS = ("<start_of_text>", "<end_of_text>")
END_OF_WORD = "</w>"


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """Byte -> printable character: printable Latin-1 bytes map to themselves, the rest to 256+."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clean(text: str) -> str:
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


class Tokenizer:
    """``Tokenizer(merges_path)(texts) -> (N, context_length) int64``, ids as open_clip's."""

    def __init__(self, merges_path: str | Path, context_length: int = 77):
        with gzip.open(merges_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]  # line 0 is a version header
        if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{merges_path}: not CLIP's BPE merges file ({len(merges)} merges, expected {N_MERGES})")
        symbols = list(byte_alphabet().values())
        vocab = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges] + list(SPECIALS)
        self.ids = {token: i for i, token in enumerate(vocab)}
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.sot, self.eot = self.ids[SPECIALS[0]], self.ids[SPECIALS[1]]
        self.context_length = context_length
        specials = "|".join(SPECIALS)
        self.pattern = regex.compile(
            specials + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
        )
        self._words: dict[str, list[int]] = {}

    def _merge(self, piece: str) -> list[int]:
        """One regex piece (already byte-mapped) -> its BPE token ids."""
        if piece in SPECIALS:
            return [self.ids[piece]]
        word = [*piece[:-1], piece[-1] + END_OF_WORD]
        while len(word) > 1:
            # the adjacent pair merged first is the one listed earliest in the merges file
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, N_MERGES))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return [self.ids[s] for s in word]

    def encode(self, text: str) -> list[int]:
        """Text -> BPE ids without the start/end-of-text ids."""
        alphabet = byte_alphabet()
        ids = []
        for piece in self.pattern.findall(clean(text)):
            cached = self._words.get(piece)
            if cached is None:
                cached = self._words[piece] = self._merge("".join(alphabet[b] for b in piece.encode("utf-8")))
            ids.extend(cached)
        return ids

    def __call__(self, texts: str | list[str]) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in zip(out, texts):
            ids = [self.sot, *self.encode(text), self.eot]
            if len(ids) > self.context_length:
                ids = ids[: self.context_length]
                ids[-1] = self.eot  # a truncated text still ends with end-of-text
            row[: len(ids)] = ids
        return out
