"""Every "SPEC n" / "SPEC n.m" citation in the code, configs, docs and README names a heading of docs/method.md."""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
METHOD = REPO / "docs" / "method.md"
SCANNED = ["simfeatup", "train", "export", "bench", "tests", "configs", "docs", "README.md", "pyproject.toml"]
SUFFIXES = {".py", ".yaml", ".yml", ".toml", ".md", ".txt", ".cfg"}

_NUM = r"\d{1,2}(?:\.\d{1,2})?\b"
# "SPEC 2.3", "SPEC 2.1, 2.2, 2.6", "SPEC 2.3-2.5", "SPEC 2 / 5", "SPEC 4 steps 2-7"
CITATION = re.compile(rf"\bSPEC ({_NUM}(?:\s*(?:,|/|-)\s*{_NUM})*)(?:\s+steps?\s+(\d{{1,2}})(?:\s*-\s*(\d{{1,2}}))?)?")
SECTION = re.compile(r"^## (\d+)\.\s")
SUBSECTION = re.compile(r"^### (\d+)\.(\d+)\s")


def cited(text: str) -> list[str]:
    """Section numbers cited in ``text``, in order; ranges are expanded ("2.3-2.5" -> 2.3, 2.4, 2.5)."""
    out = []
    for m in CITATION.finditer(text):
        numbers = re.findall(r"(\d+(?:\.\d+)?)\s*(-?)", m.group(1))
        refs = []
        for i, (num, dash) in enumerate(numbers):
            refs.append(num)
            if dash and i + 1 < len(numbers):
                (a_major, _, a), (b_major, _, b) = num.partition("."), numbers[i + 1][0].partition(".")
                if a and b and a_major == b_major:
                    refs += [f"{a_major}.{k}" for k in range(int(a) + 1, int(b))]
                elif not a and not b:
                    refs += [str(k) for k in range(int(a_major) + 1, int(b_major))]
        if m.group(2):  # "SPEC 4 steps 2-7": steps 4.2 .. 4.7 of section 4
            first, last = int(m.group(2)), int(m.group(3) or m.group(2))
            refs += [f"{refs[-1]}.{k}" for k in range(first, last + 1)]
        out += refs
    return out


def headings(text: str) -> list[str]:
    """Numbers of the "## n." and "### n.m" headings, in order; a sub-section must sit in its section."""
    found, current = [], None
    for line in text.splitlines():
        if m := SECTION.match(line):
            current = m.group(1)
            found.append(current)
        elif m := SUBSECTION.match(line):
            assert m.group(1) == current, f"heading {line!r} is not inside section {m.group(1)}"
            found.append(f"{m.group(1)}.{m.group(2)}")
    return found


def _citations() -> dict[str, list[str]]:
    """{path relative to the repo: cited numbers} over the scanned files (symlinked copies once)."""
    files = set()
    for name in SCANNED:
        path = REPO / name
        candidates = [path] if path.is_file() else path.rglob("*")
        files |= {p.resolve() for p in candidates if p.is_file() and p.suffix in SUFFIXES}
    files.discard(Path(__file__).resolve())  # its examples are not citations
    return {str(p.relative_to(REPO)): refs for p in sorted(files) if (refs := cited(p.read_text(encoding="utf-8")))}


def test_method_has_the_numbered_sections():
    found = headings(METHOD.read_text(encoding="utf-8"))
    assert len(found) == len(set(found)), f"duplicate headings: {sorted({n for n in found if found.count(n) > 1})}"
    expected = (
        {str(n) for n in range(1, 10)} | {f"2.{k}" for k in range(1, 8)} | {"3.1"} | {f"4.{k}" for k in range(1, 9)}
    )
    assert set(found) == expected


def test_every_citation_names_a_section_of_the_method():
    sections = set(headings(METHOD.read_text(encoding="utf-8")))
    citations = _citations()
    # the scan really reads the code: the encoder's module docstring cites its step
    assert "2.3" in citations["simfeatup/encoder.py"]
    missing = {path: sorted(set(refs) - sections) for path, refs in citations.items() if set(refs) - sections}
    assert not missing, f"SPEC citations without a heading in docs/method.md: {missing}"


def test_citation_parser():
    text = (
        "(SPEC 2.3) SPEC 2.1, 2.2, 2.6; SPEC 2.3-2.5. SPEC 2 / 5 -- SPEC 4 steps 2-7; "
        "SPEC 2.1, in this order; SPEC 6: 255; SPEC 2.8; SPEC 5-7; SPEC.md section 3; SPECIALS 7"
    )
    assert cited(text) == [
        "2.3",
        "2.1",
        "2.2",
        "2.6",
        "2.3",
        "2.4",
        "2.5",
        "2",
        "5",
        "4",
        "4.2",
        "4.3",
        "4.4",
        "4.5",
        "4.6",
        "4.7",
        "2.1",
        "6",
        "2.8",
        "5",
        "6",
        "7",
    ]
    # a citation of a missing step is reported
    assert set(cited("see SPEC 2.8 and SPEC 10")) - set(headings(METHOD.read_text(encoding="utf-8"))) == {"2.8", "10"}


def test_headings_parser_refuses_a_subsection_outside_its_section():
    with pytest.raises(AssertionError, match="3.1"):
        headings("## 2. Inference\n### 3.1 Weights\n")


# ------------------------------------------------------------------ docs/model-folder.md, the consumers' contract
MODEL_FOLDER = REPO / "docs" / "model-folder.md"


def _contract() -> str:
    return MODEL_FOLDER.read_text(encoding="utf-8")


def _anchors(text: str) -> set[str]:
    """GitHub's anchors of the page's headings: lowercase, punctuation dropped, spaces -> '-'."""
    return {
        re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in text.splitlines() if line.startswith("#")
    }


def test_contract_names_every_file_input_output_and_metadata_key():
    from simfeatup import model_folder as mf

    doc = _contract()
    names = [mf.WINDOWS, mf.TEXT, mf.LAM, mf.LOGITS, mf.TOKENS, mf.EMBEDDINGS, mf.IMAGE_GRAPH, mf.TEXT_GRAPH,
             mf.MERGES, mf.MANIFEST, mf.IMAGE_GRAPH + ".data", mf.TEXT_GRAPH + ".data"]
    names += [mf.METADATA_PREFIX + key for key in (*mf.METADATA_FIELDS, "graph")]
    missing = [n for n in names if f"`{n}`" not in doc]
    assert not missing, f"docs/model-folder.md does not name {missing}"
    assert f"**Format version {mf.FORMAT_VERSION}**" in doc and f'`"version": {mf.FORMAT_VERSION}`' in doc
    assert f'`"format": "{mf.FORMAT}"`' in doc
    assert f"versions {' and '.join(map(str, mf.READABLE_VERSIONS))}" in doc
    # every link inside the page lands on a heading
    broken = set(re.findall(r"\]\(#([\w-]+)\)", doc)) - _anchors(doc)
    assert not broken, f"links to missing sections: {broken}"


def test_contract_numbers_are_the_codes():
    from simfeatup.constants import CLIP_MEAN, CLIP_STD, DEFAULT_LAMBDA, LOGIT_SCALE, LONG_SIDE, STRIDE, WINDOW
    from simfeatup.model_folder import DEFAULT_STATIC_QUERIES, STATIC_TEXT_BATCH

    doc = _contract()
    for value in (*CLIP_MEAN, *CLIP_STD):
        assert str(value) in doc
    for phrase in (f"`long_side` ({LONG_SIDE})", f"`window` ({WINDOW})", f"`stride` ({STRIDE})",
                   f"`logit_scale` | {LOGIT_SCALE}", f"`default_lambda` | {DEFAULT_LAMBDA}",
                   f"(default Q = {DEFAULT_STATIC_QUERIES}", f"({STATIC_TEXT_BATCH}, 77)",
                   f"`text_batch` ({STATIC_TEXT_BATCH})"):
        assert phrase in doc, phrase


def _tuple(values) -> str:
    return "(" + ", ".join(str(int(v)) for v in values) + ")"


def test_contract_worked_example_is_what_the_code_computes():
    import numpy as np

    from simfeatup.imaging import normalise, resized_shape
    from simfeatup.resample import taps
    from simfeatup.scores import class_probabilities, labels_from_probabilities
    from simfeatup.windows import padding, window_boxes, window_starts

    doc = " ".join(_contract().split())  # line breaks inside the example do not matter
    assert resized_shape(300, 448) == (300, 448)
    boxes = window_boxes(300, 448)
    assert len(boxes) == 6 and "The 6 window boxes" in doc
    assert ", ".join(map(_tuple, boxes)) + "." in doc
    assert window_starts(300) == [0, 76] and "Row starts 0, 76" in doc
    assert window_starts(448) == [0, 112, 224] and "column starts 0, 112, 224" in doc
    assert resized_shape(400, 1200) == (149, 448) and "working size (149, 448)" in doc
    assert ", ".join(map(_tuple, window_boxes(149, 448))) + ";" in doc
    assert f"by {padding(149, 16)} rows to 160" in doc and f"by {padding(149, 224)} rows to 224" in doc
    # the resize's taps
    for d in range(4):
        cols, rows = (_tuple(a[d] for a in taps(2, 4, rows=r)) for r in (False, True))
        assert f"| {d} | {cols} | {rows} |" in doc
    assert ", ".join(_tuple(a[d] for a in taps(600, 448, rows=False)) for d in range(4)) + "." in doc
    # normalisation and scoring
    pixel = normalise(np.array([[[255, 0, 128]]], np.uint8)).ravel()
    assert "Pixel (255, 0, 128) becomes (" + ", ".join(f"{v:.8g}" for v in pixel) + ")" in doc
    probs = class_probabilities(np.array([0.20, 0.22, 0.21], np.float32).reshape(3, 1, 1), np.array([0, 0, 1]), 2)
    assert "class probabilities (" + ", ".join(f"{v:.7g}" for v in probs.ravel()) + ")" in doc
    assert labels_from_probabilities(probs, prob_thd=0.0, bg_idx=1).item() == 0
    assert labels_from_probabilities(probs, prob_thd=0.6, bg_idx=1).item() == 1  # "or bg_idx with 0.6"


def test_contract_tokenizer_example():
    import open_clip.tokenizer

    from simfeatup.tokenizer import Tokenizer

    tok = Tokenizer(open_clip.tokenizer.default_bpe())
    ids = [int(i) for i in tok("a photo of a building.")[0] if i]
    assert (tok.sot, tok.eot) == (49406, 49407)
    assert f"is `{' '.join(map(str, ids))} 0 ...`" in " ".join(_contract().split())


def test_contract_covers_every_manifest_field_and_the_manifest_links_its_sections(onnx_dir):
    import json

    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    doc = _contract()
    missing = [k for k in manifest if f"`{k}`" not in doc]
    assert not missing, f"docs/model-folder.md does not describe manifest fields {missing}"
    for section in ("preprocessing", "tokenizer", "verification", "docs"):
        missing = [k for k in manifest[section] if f"`{k}`" not in doc]
        assert not missing, f"{section}: {missing}"
    anchors = _anchors(doc)
    for link in manifest["docs"].values():
        page, _, anchor = link.partition("#")
        assert page == "docs/model-folder.md" and (not anchor or anchor in anchors), link
