import numpy as np
import pytest

from simfeatup import scores


def _softmax(x, axis=0):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_softmax_over_all_queries_then_max_over_synonyms():
    rng = np.random.default_rng(0)
    logits = rng.uniform(-0.1, 0.4, (4, 5, 6)).astype(np.float32)
    query_class = np.array([0, 1, 1, 2])  # class 1 has two synonyms
    probs = scores.class_probabilities(logits, query_class, 3)
    full = _softmax(50 * logits)
    np.testing.assert_allclose(probs[0], full[0], rtol=1e-5)
    np.testing.assert_allclose(probs[1], np.maximum(full[1], full[2]), rtol=1e-5)
    np.testing.assert_allclose(probs[2], full[3], rtol=1e-5)


def test_one_query_per_class_is_plain_softmax():
    logits = np.random.default_rng(1).normal(size=(3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(scores.class_probabilities(logits, np.arange(3), 3), _softmax(50 * logits), rtol=1e-5)


def test_threshold_sends_unconfident_pixels_to_background():
    probs = np.array([[[0.2, 0.1]], [[0.5, 0.45]], [[0.3, 0.45]]], np.float32)  # (3 classes, 1, 2)
    assert scores.labels_from_probabilities(probs, prob_thd=0.0, bg_idx=0).tolist() == [[1, 1]]
    assert scores.labels_from_probabilities(probs, prob_thd=0.46, bg_idx=2).tolist() == [[1, 2]]
    assert scores.labels_from_probabilities(probs, prob_thd=0.6, bg_idx=0).tolist() == [[0, 0]]


def test_strips_of_a_resize_are_the_whole_resize_bit_for_bit():
    from simfeatup import imaging

    x = np.random.default_rng(2).normal(size=(3, 37, 52)).astype(np.float32)
    for size in ((111, 75), (20, 52), (37, 200), (9, 9)):
        whole = imaging.resize_bilinear(x, size)
        parts = [imaging.resize_bilinear(x, size, (r, min(r + 7, size[0]))) for r in range(0, size[0], 7)]
        np.testing.assert_array_equal(np.concatenate(parts, axis=1), whole)


@pytest.mark.slow  # 3-10 s end to end; the default run must stay under 5 min (README, Tests)
def test_segmentation_at_original_size_matches_resize_then_score_in_bounded_memory(monkeypatch):
    import tracemalloc

    from simfeatup import imaging
    from simfeatup.vocabulary import Vocabulary

    vocabulary = Vocabulary.from_spec("road;tree,forest;water;background")
    small = np.random.default_rng(3).uniform(-0.1, 0.3, (5, 45, 64)).astype(np.float32)
    size = (301, 428)
    reference = scores.class_probabilities(imaging.resize_bilinear(small, size), vocabulary.query_class, 4)
    monkeypatch.setattr(scores, "STRIP_BYTES", (4 * (2 * 5 + 4) + 8) * 428 * 10)  # 10 rows per strip: many strips
    got = scores.segmentation(small, vocabulary, scores.Scoring(prob_thd=0.3, bg_idx=3), return_probs=True, size=size)
    np.testing.assert_array_equal(got.probs, reference)
    np.testing.assert_array_equal(got.labels, scores.labels_from_probabilities(reference, prob_thd=0.3, bg_idx=3))

    # A 6000 x 8000 tile: the full-size logits alone would be 5 x 48e6 float32 = 960 MB.
    monkeypatch.setattr(scores, "STRIP_BYTES", 32 << 20)
    tracemalloc.start()
    labels = scores.segmentation(small, vocabulary, scores.Scoring(prob_thd=0.3, bg_idx=3), size=(6000, 8000)).labels
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert labels.shape == (6000, 8000) and peak < 48e6 + 1.3 * (32 << 20)  # the uint8 map + about one strip


def test_scoring_is_resolved_from_preset_then_flags_and_validated():
    from simfeatup import presets

    udd5 = presets.load("udd5")
    assert scores.Scoring.resolve(udd5) == scores.Scoring(lam=udd5.lam, prob_thd=0.4, bg_idx=4)
    assert scores.Scoring.resolve(udd5, prob_thd=0.0, lam=0.0) == scores.Scoring(lam=0.0, prob_thd=0.0, bg_idx=4)
    assert scores.Scoring.resolve() == scores.Scoring(lam=-0.3, prob_thd=0.0, bg_idx=0)
    for bad in ({"prob_thd": 1.5}, {"prob_thd": float("nan")}, {"lam": float("inf")}, {"bg_idx": -1}):
        with pytest.raises(ValueError):
            scores.Scoring(**bad)
    with pytest.raises(ValueError, match="bg_idx 5 is not a class index"):
        scores.Scoring(bg_idx=5).check(3)
