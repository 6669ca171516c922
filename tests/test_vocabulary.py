import pytest

from simfeatup import presets
from simfeatup.vocabulary import Vocabulary, VocabularyError


def test_class_lines_with_synonyms():
    v = Vocabulary.from_spec(" building , roof,house ; road;water ")
    assert v.classes == (("building", "roof", "house"), ("road",), ("water",))
    assert v.queries == ["building", "roof", "house", "road", "water"]
    assert v.query_class.tolist() == [0, 0, 0, 1, 2]
    assert v.names == ["building", "road", "water"]


@pytest.mark.parametrize("spec", ["", " ; ,", ";;"])
def test_empty_class_list_is_refused_with_the_fix(spec):
    with pytest.raises(VocabularyError, match="--classes"):
        Vocabulary.from_spec(spec)


@pytest.mark.parametrize("spec, message", [
    ("building;road;building", "'building' is given in classes 1 and 3: each word may vote for one class only"),
    ("building,roof,building;road", "'building' is given twice in class 1"),
    ("Road;tree  cover;road", "'road' is given in classes 1 and 3"),  # one query to CLIP's tokenizer
    ("tree cover;Tree   Cover", "'Tree   Cover' is given in classes 1 and 2"),
])
def test_a_word_given_twice_is_refused(spec, message):
    with pytest.raises(VocabularyError, match=message):
        Vocabulary.from_spec(spec)


def test_likely_mistyped_class_lists_get_advice_and_presets_none():
    [one, pipe] = Vocabulary.from_spec("building|road|tree").advice()
    assert one.startswith("one class ('building|road|tree'): every pixel is scored against it alone")
    assert pipe == "class word 'building|road|tree' contains '|': ';' separates classes and ',' synonyms"
    assert Vocabulary.from_spec("building").advice()[0].startswith("one class ('building')")
    assert Vocabulary.from_spec("building,roof;road").advice() == []
    for name in presets.available():  # the shipped vocabularies are neither
        assert Vocabulary.from_preset(name).advice() == [], name


def test_classes_file(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("# my classes\nbuilding,roof\n\nroad\n")
    assert Vocabulary.from_file(f).classes == (("building", "roof"), ("road",))
    with pytest.raises(VocabularyError, match="not found"):
        Vocabulary.from_file(tmp_path / "nope.txt")


def test_all_seventeen_presets_load_with_spec_values():
    keys = presets.available()
    assert len(keys) == 17
    for key in keys:
        p = presets.load(key)
        assert 0 <= p.bg_idx < len(p.classes) and p.lam in (-0.3, 0.0)
    oem = presets.load("OpenEarthMap")
    assert oem.classes[1] == "bareland,barren" and oem.prob_thd == 0.1 and len(oem.classes) == 9
    assert presets.load("potsdam").bg_idx == 5
    assert presets.load("UDD5").bg_idx == 4 and presets.load("UDD5").prob_thd == 0.4
    assert presets.load("WHU-Sat.II").prob_thd == 0.7
    xbd = presets.load("xbd-pre")
    assert xbd.lam == 0.0 and xbd.prob_thd == 0.0
    assert len(presets.load("isaid").classes) == 16
    assert presets.load("loveda").labels["reduce_zero_label"] is True


def test_unknown_preset_suggests_close_names():
    with pytest.raises(ValueError, match="Did you mean loveda"):
        presets.load("lovedaa")


def test_preset_vocabulary():
    assert Vocabulary.from_preset("udd5").names == ["vegetation", "building", "road", "vehicle", "background"]


def test_configs_datasets_links_to_the_presets_folder():
    from pathlib import Path

    link = Path(__file__).resolve().parents[1] / "configs" / "datasets" / "presets"
    assert link.is_symlink() and link.resolve() == Path(presets.__file__).resolve().parent
    assert {p.stem for p in link.glob("*.yaml")} == {p.stem for p in Path(presets.__file__).parent.glob("*.yaml")}


def test_a_fixed_folder_baked_with_a_repeated_word_asks_for_a_re_export():
    from simfeatup.model_folder import ModelFolderError
    from simfeatup.runtime_fixed import fixed_vocabulary

    manifest = {"vocabulary": {"classes": [["road"], ["Road"]], "lam": -0.3, "prob_thd": 0.0, "bg_idx": 0}}
    with pytest.raises(ModelFolderError, match="the folder's baked classes cannot be used: 'Road' is given in classes "
                                               "1 and 2.*; re-export it with distinct class words"):
        fixed_vocabulary(manifest)
