"""Case-level classification: pooled embeddings against a hand computation."""

import numpy as np

from clip_med.eval.case_level import case_level_metrics, has_cases, pool_by_group
from clip_med.eval.embeddings import Embedded


def _unit(rows):
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_pooling_is_the_normalised_mean_of_each_case():
    x = _unit([[1, 0], [0, 1], [1, 1], [3, 1]])
    names, pooled, members = pool_by_group(x, ["a", "b", "a", "b"])
    assert names == ["a", "b"] and members.tolist() == [0, 1, 0, 1]
    for row, case in ((0, [0, 2]), (1, [1, 3])):
        mean = x[case].mean(axis=0)
        np.testing.assert_allclose(pooled[row], mean / np.linalg.norm(mean), atol=1e-6)


def test_case_votes_mixed_cases_and_pooled_image_accuracy():
    # Case c1: two head images, one of which alone looks like "thorax"; pooling fixes it.
    # Case c2: one thorax image. Case c3: images labelled differently (mixed: not scored as a case).
    image = _unit([[1, 0], [0.4, 0.6], [0, 1], [1, 0.1], [0.1, 1]])
    held_out = Embedded(ids=list("abcde"), image=image, text=image, texts=[""] * 5,
                        labels={"anatomy": ["head", "head", "thorax", "head", "thorax"]},
                        groups=["c1", "c1", "c2", "c3", "c3"])
    assert has_cases(held_out)
    classes = ["head", "thorax"]

    def scorer(pooled):  # head along x, thorax along y
        logits = 100 * pooled @ np.eye(2)
        return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)

    result = case_level_metrics(held_out, "anatomy", classes, scorer)
    assert (result["cases"], result["mixed_cases"], result["images"]) == (2, 1, 5)
    assert result["accuracy"] == 1.0  # c1 -> head, c2 -> thorax
    # c3 pools [1, .1] and [.1, 1] to the diagonal; its prediction is one class for both images: 1 of 2 right
    assert result["image_accuracy"] == 4 / 5


def test_no_cases_when_every_image_is_its_own_case():
    x = _unit([[1, 0], [0, 1]])
    assert not has_cases(Embedded(ids=["a", "b"], image=x, text=x, texts=["", ""], groups=["a", "b"]))
