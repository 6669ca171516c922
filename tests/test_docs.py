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
