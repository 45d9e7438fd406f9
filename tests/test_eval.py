import zlib

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torchmetrics.retrieval import RetrievalRecall

from clip_med.eval.embeddings import Embedded
from clip_med.eval.evaluator import EvalConfig, evaluate_embeddings
from clip_med.eval.linear_probe import fit_probe
from clip_med.eval.metrics import classification_metrics
from clip_med.eval.report import write_report
from clip_med.eval.retrieval import positive_ranks, recall_at_k
from clip_med.eval.zero_shot import label_prompts, zero_shot_probabilities, zero_shot_weights


class PromptModel(torch.nn.Module):
    """encode_text maps each prompt to the one-hot axis of the label word it contains."""

    def __init__(self, words):
        super().__init__()
        self.words = words
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def encode_text(self, tokens, normalize=True):
        out = torch.zeros(len(tokens), len(self.words))
        for i, text in enumerate(tokens):
            for j, word in enumerate(self.words):
                if word in text:
                    out[i, j] = 1.0
        return out


class _Texts(list):
    def to(self, device):
        return self


def _identity_tokenizer(texts):
    return _Texts(texts)


def test_zero_shot_on_orthogonal_embeddings_is_exact():
    model = PromptModel(["CT", "MRI"])
    prompts = {"ct": ["a CT scan.", "CT image."], "mr": ["a MRI scan."]}
    weights = zero_shot_weights(model, _identity_tokenizer, prompts)
    assert np.allclose(weights, np.eye(2))
    images = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    probs = zero_shot_probabilities(images, weights)
    assert probs.argmax(1).tolist() == [0, 1, 0]
    assert np.allclose(probs.sum(1), 1.0)
    assert probs[0, 0] == pytest.approx(1 / (1 + np.exp(-100)))


class HashTextModel(torch.nn.Module):
    """encode_text: a fixed pseudo-random unit vector per text (seeded by its CRC)."""

    def __init__(self, dim=16):
        super().__init__()
        self.dim, self.dummy = dim, torch.nn.Parameter(torch.zeros(1))

    def encode_text(self, texts, normalize=True):
        rows = [torch.randn(self.dim, generator=torch.Generator().manual_seed(zlib.crc32(text.encode())))
                for text in texts]
        out = torch.stack(rows)
        return out / out.norm(dim=1, keepdim=True) if normalize else out


def _by_hand(model, prompts):
    """Each class encoded on its own: the normalised mean of its own prompts' embeddings."""
    columns = []
    for texts in prompts.values():
        mean = model.encode_text(_Texts(texts), normalize=True).mean(dim=0)
        columns.append((mean / mean.norm()).numpy())
    return np.stack(columns, axis=1)


@pytest.mark.parametrize("lengths", [(2, 3), (3, 2, 1), (1, 2, 3) * 5, (4, 4, 2)])
def test_each_class_vector_is_the_mean_of_its_own_prompts(lengths):
    model = HashTextModel()
    prompts = {f"class {c}": [f"prompt {k} of class {c}" for k in range(n)] for c, n in enumerate(lengths)}
    weights = zero_shot_weights(model, _identity_tokenizer, prompts)
    assert weights.shape == (model.dim, len(lengths))
    np.testing.assert_allclose(weights, _by_hand(model, prompts), atol=1e-6)


def test_a_shorter_prompt_list_is_not_cycled():
    # "ct" has prompts along two axes; cycling its 2 prompts up to 3 counted the first twice: (2, 1) / sqrt(5).
    model = PromptModel(["CT", "MRI", "X-ray"])
    prompts = {"ct": ["CT", "MRI"], "mr": ["MRI", "X-ray", "MRI"]}
    weights = zero_shot_weights(model, _identity_tokenizer, prompts)
    np.testing.assert_allclose(weights[:, 0], [2 ** -0.5, 2 ** -0.5, 0], atol=1e-6)
    np.testing.assert_allclose(weights[:, 1], np.array([0, 2, 1]) / 5 ** 0.5, atol=1e-6)


def test_label_prompts_from_taxonomy_or_user():
    prompts = label_prompts("modality", ["ct", "pneumonia"], templates=["{} image"])
    assert prompts["ct"][0] == "CT image" and prompts["pneumonia"] == ["pneumonia image"]
    assert label_prompts("anatomy", ["head"], prompts={"head": ["brain MRI"]}) == {"head": ["brain MRI"]}
    with pytest.raises(ValueError, match="no prompts"):
        label_prompts("anatomy", ["head", "thorax"], prompts={"head": ["x"]})


def _random_unit(n, d, seed):
    x = np.random.default_rng(seed).normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_recall_matches_torchmetrics_and_full_matrix():
    images, texts = _random_unit(50, 8, 0), _random_unit(50, 8, 1)
    texts[:20] = images[:20] + 0.01  # some easy pairs
    ours = recall_at_k(images, texts, ks=(1, 5, 10), chunk=7)
    scores = torch.tensor(images @ texts.T)
    indexes = torch.arange(50).repeat_interleave(50)
    target = torch.eye(50, dtype=torch.bool).flatten()
    for k in (1, 5, 10):
        reference = RetrievalRecall(top_k=k)(scores.flatten(), target, indexes=indexes).item()
        assert ours[f"R@{k}"] == pytest.approx(reference)
    full = (scores.numpy() > np.diag(scores.numpy())[:, None]).sum(1)
    assert np.array_equal(positive_ranks(images, texts, chunk=7), full)


def test_probe_matches_direct_sklearn_and_picks_c_on_train_only():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 5))
    y = np.where(x[:, 0] + 0.3 * rng.normal(size=120) > 0, "a", "b")
    groups = [str(i // 3) for i in range(120)]
    probe = fit_probe(x, y, groups, Cs=[0.01, 1.0, 100.0], folds=3)
    direct = LogisticRegression(C=probe.C, max_iter=2000).fit(x, y)
    assert np.allclose(probe.predict_proba(x), direct.predict_proba(x), atol=1e-6)
    assert probe.cv_balanced_accuracy > 0.8


def test_classification_metrics_reference_values():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    metrics = classification_metrics(["a", "b", "b", "b"], probs, ["a", "b"])
    assert metrics["accuracy"] == 0.75 and metrics["confusion_matrix"] == [[1, 0], [1, 2]]
    assert metrics["balanced_accuracy"] == pytest.approx((1 + 2 / 3) / 2)
    assert metrics["auroc"] == pytest.approx(1.0)
    assert metrics["per_class"]["b"]["recall"] == pytest.approx(2 / 3)


def test_report_files(tmp_path):
    model = PromptModel(["CT", "MRI"])
    image = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    labels = {"modality": ["ct", "mr", "ct", "mr"]}
    held = Embedded(ids=list("abcd"), image=image, text=image, texts=["t"] * 4, labels=labels, groups=list("abcd"))
    train = Embedded(ids=list("efgh"), image=image, text=image, texts=["t"] * 4, labels=labels, groups=list("efgh"))
    cfg = EvalConfig(tasks=["modality"], probe_folds=2, probe_Cs=[1.0])
    report = evaluate_embeddings(model, _identity_tokenizer, "cpu", held, train, cfg)
    assert report["zero_shot"]["modality"]["accuracy"] == 1.0
    assert report["linear_probe"]["modality"]["accuracy"] == 1.0
    assert report["retrieval"]["image_to_text"]["R@1"] == 1.0  # ties count in the pair's favour
    report["split"] = "dev"
    paths = write_report(report, tmp_path)
    assert paths["confusion_zero_shot_modality"].stat().st_size > 1000
    assert "| zero_shot | modality | 4 | 1.000" in paths["md"].read_text()


def test_auroc_with_two_of_three_labels_present():
    """Three labels, two of them in the truth: scikit-learn's binary case (used to raise)."""
    import numpy as np

    from clip_med.eval.metrics import classification_metrics

    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.6, 0.2], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1]])
    result = classification_metrics(["a", "b", "a", "b"], probs, ["a", "b", "c"])
    assert result["auroc"] == 1.0
    flipped = classification_metrics(["b", "a", "b", "a"], probs, ["a", "b", "c"])
    assert flipped["auroc"] == 0.0
