import numpy as np

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
