"""pyproject.toml's split: the base install is the torch-free runtime, the extras hold the rest,
and every third-party import in simfeatup is declared where simfeatup/extras.py says it is."""
import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from simfeatup.extras import ADVICE, GEO_MODULES, TORCH_MODULES

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _names(requirements) -> set[str]:
    """Distribution names of requirement strings, normalised; self-references left out."""
    names = {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}
    return names - {"simfeatup"}


def _modules_of(distributions: set[str]) -> set[str]:
    """Top-level import names that the installed ``distributions`` provide."""
    provided = metadata.packages_distributions()
    return {
        module for module, dists in provided.items() if any(d.lower().replace("_", "-") in distributions for d in dists)
    }


BASE = _names(PROJECT["dependencies"])
TORCH_EXTRA = _names(PROJECT["optional-dependencies"]["torch"])


def _third_party_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("simfeatup", "__future__")}


def test_the_base_install_has_no_torch():
    assert not BASE & TORCH_EXTRA
    assert not BASE & {"torch", "torchvision", "open-clip-torch", "lightning", "onnxruntime", "onnxruntime-gpu"}
    assert _names(PROJECT["optional-dependencies"]["onnxruntime"]) == {"onnxruntime"}
    assert _names(PROJECT["optional-dependencies"]["gpu"]) == {"onnxruntime-gpu"}


def test_extras_module_list_is_the_torch_extra():
    assert set(TORCH_MODULES) <= _modules_of(TORCH_EXTRA)
    provided = metadata.packages_distributions()
    for dist in TORCH_EXTRA:  # each distribution of the extra is recognised by at least one module
        modules = {m for m, dists in provided.items() if dist in {d.lower().replace("_", "-") for d in dists}}
        assert modules & set(TORCH_MODULES), f"{dist}: none of {sorted(modules)} is in extras.TORCH_MODULES"


def test_extras_module_list_is_the_geo_extra():
    geo = _names(PROJECT["optional-dependencies"]["geo"])
    assert set(GEO_MODULES) <= _modules_of(geo)
    assert len(GEO_MODULES) == len(geo)  # one import name per distribution
    assert {ADVICE[m] for m in GEO_MODULES} == {'pip install "simfeatup[geo]"'}


def test_every_import_in_the_library_is_declared():
    declared = _modules_of(BASE) | set(ADVICE)
    undeclared = {}
    for path in sorted((REPO / "simfeatup").rglob("*.py")):
        missing = _third_party_imports(path) - declared
        if missing:
            undeclared[str(path.relative_to(REPO))] = sorted(missing)
    assert not undeclared, f"imported but not in pyproject.toml (or not mapped in extras.ADVICE): {undeclared}"


# Every entry point naming a missing extra in one line: tests/test_entry.py.
