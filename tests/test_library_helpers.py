"""Library replacements of hand-written code give the numbers the hand-written code gave."""

import json
import logging

import numpy as np
import pytest

from clip_med.core.counting import merge_counts
from clip_med.data.manifest import Manifest, ManifestError, ShardInfo, load_manifest, save_manifest
from clip_med.data.shardset import fetch_manifest
from clip_med.eval.clip_benchmark import top_k_accuracy
from clip_med.eval.embeddings import Embedded
from clip_med.eval.evaluator import Predictions, run_linear_probe
from clip_med.inference.extract import manifest_counts


def test_merge_counts_sums_by_kind_in_first_seen_order():
    assert merge_counts() == {}
    merged = merge_counts({"bad_image": 2, "empty": 0}, {}, {"bad_shard": 1, "bad_image": 3})
    assert merged == {"bad_image": 5, "empty": 0, "bad_shard": 1}
    assert list(merged) == ["bad_image", "empty", "bad_shard"]


def _reference_top_k(predictions: Predictions, k: int) -> float | None:
    """The hand-written top-k accuracy scikit-learn's replaced (ties: the first label wins)."""
    if len(predictions.labels) < k:
        return None
    truth = np.array([predictions.labels.index(label) for label in predictions.y_true])
    top = np.argsort(-predictions.probs, axis=1, kind="stable")[:, :k]
    return float((top == truth[:, None]).any(axis=1).mean())


def test_top_k_accuracy_matches_the_stable_argsort_with_ties_and_missing_labels():
    rng = np.random.default_rng(0)
    for case in range(400):
        n_labels, k = int(rng.integers(1, 10)), int(rng.choice([1, 2, 3, 5]))
        labels = [f"label{i}" for i in range(n_labels)]
        probs = rng.random((25, n_labels))
        if case % 2:
            probs = np.round(probs * 2) / 2  # many ties, also at the k-th place
        if case % 5 == 0:
            probs[:] = 0.0
        present = labels if case % 3 else labels[:1]  # some labels never the truth
        y_true = [present[i] for i in rng.integers(0, len(present), len(probs))]
        predictions = Predictions([str(i) for i in range(len(probs))], y_true, labels, probs)
        assert top_k_accuracy(predictions, k) == _reference_top_k(predictions, k), (case, n_labels, k)
    tied = Predictions(["a", "b"], ["l1", "l5"], [f"l{i}" for i in range(6)], np.full((2, 6), 1 / 6))
    assert top_k_accuracy(tied, 5) == 0.5  # all six tied: l1 is among the first five, l5 is not


def _embedded(x, labels, prefix):
    ids = [f"{prefix}{i}" for i in range(len(x))]
    return Embedded(ids=ids, image=x, text=x, texts=[""] * len(x), labels={"modality": list(labels)},
                    groups=[f"{prefix}case{i // 2}" for i in range(len(x))])


@pytest.mark.parametrize("n_classes", [2, 3])
def test_probe_flow_scores_with_the_model_or_its_head(n_classes):
    rng = np.random.default_rng(n_classes)
    centers = rng.normal(0, 2, (n_classes, 6))
    y = np.array([f"c{i % n_classes}" for i in range(90)], dtype=object)
    x = centers[[int(label[1:]) for label in y]] + rng.normal(0, 1.5, (90, 6))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    y[5] = "unknown"
    train, held_out = _embedded(x[:60], y[:60], "t"), _embedded(x[60:], y[60:], "h")
    held_out.labels["modality"][0] = "unknown"
    classes = sorted({label for label in train.labels["modality"] if label != "unknown"})
    by_model = run_linear_probe("modality", classes, train, held_out, Cs=[0.1, 10.0], folds=3)
    by_head = run_linear_probe("modality", classes, train, held_out, Cs=[0.1, 10.0], folds=3, score_with_head=True)
    assert by_model.excluded_unlabelled == 1 and by_model.metrics["n"] == 29 and by_model.metrics["n_train"] == 59
    assert by_model.fitted.C == by_head.fitted.C and by_model.head.labels == classes
    assert np.array_equal(by_model.probs, by_model.fitted.predict_proba(held_out.image[1:]))
    assert np.array_equal(by_head.probs, by_head.head.predict_proba(held_out.image[1:]))
    assert np.allclose(by_model.probs, by_head.probs, atol=1e-6)


def _manifest(split="train"):
    return Manifest(split=split, source="synthetic", fingerprint="f", options={}, input_count=1,
                    shards=[ShardInfo(f"{split}-000000.tar", 1, 10)])


def test_a_bad_manifest_is_an_error_that_names_it(tmp_path):
    save_manifest(_manifest(), tmp_path)
    assert load_manifest(tmp_path, "train").written_count == 1 and load_manifest(tmp_path, "dev") is None
    for junk in ("{not json", json.dumps({"split": "train"}), "[]", "\xff"):
        (tmp_path / "train.manifest.json").write_bytes(junk.encode("latin-1"))
        with pytest.raises(ManifestError, match="train.manifest.json is not a clip_med manifest"):
            load_manifest(tmp_path, "train")
        with pytest.raises(ValueError, match="train.manifest.json is not a clip_med manifest"):
            fetch_manifest(str(tmp_path / "train.manifest.json"))


def test_embedding_progress_counts_warn_about_a_bad_manifest(tmp_path, caplog):
    save_manifest(_manifest("train"), tmp_path)
    (tmp_path / "dev.manifest.json").write_text("{truncated", encoding="utf-8")
    urls = [str(tmp_path / "train-000000.tar"), str(tmp_path / "dev-000000.tar")]
    with caplog.at_level(logging.WARNING, logger="clip_med.inference.extract"):
        assert manifest_counts(urls) == {urls[0]: 1}
    assert any("dev.manifest.json is not a clip_med manifest" in record.getMessage() for record in caplog.records)
