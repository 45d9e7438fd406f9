import json

import numpy as np
import pytest
from api_helpers import save_checkpoint, synthetic_shards
from safetensors.numpy import save_file
from sklearn.linear_model import LogisticRegression

import clip_med
from clip_med.eval.datasets import ShardsData, open_data
from clip_med.eval.embeddings import embed_split
from clip_med.eval.linear_probe import FittedProbe, fit_probe
from clip_med.eval.probe_head import HeadError, ProbeHead
from clip_med.inference.inputs import load_image
from clip_med.inference.probing import ProbeConfig, probe_checkpoint


def _blobs(n_classes, n=60, d=8, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.array([f"c{i % n_classes}" for i in range(n)], dtype=object)
    centers = rng.normal(0, 2, (n_classes, d))
    x = centers[[int(label[1:]) for label in labels]] + rng.normal(0, 1, (n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True), labels


@pytest.mark.parametrize("n_classes", [2, 4])
def test_head_reproduces_scikit_learn_and_survives_a_round_trip(tmp_path, n_classes):
    x, y = _blobs(n_classes)
    model = LogisticRegression(C=1.0, max_iter=1000).fit(x, y)
    fitted = FittedProbe(model, sorted(set(y)), 1.0, None)
    head = ProbeHead.from_fitted(fitted, "modality", model_fingerprint="abc", model_name="tiny")
    assert np.allclose(head.predict_proba(x), model.predict_proba(x), atol=1e-6)
    path = head.save(tmp_path / "head")
    assert path.name == "head.safetensors"
    loaded = ProbeHead.load(path)
    assert (loaded.task, loaded.labels, loaded.model_fingerprint, loaded.C) == ("modality", head.labels, "abc", 1.0)
    assert np.allclose(loaded.predict_proba(x), model.predict_proba(x), atol=1e-6)


def test_unusable_heads_are_refused(tmp_path):
    x, y = _blobs(3)
    head = ProbeHead.from_fitted(fit_probe(x, list(y), Cs=[1.0]), "anatomy", "fingerprint-a", "tiny")
    with pytest.raises(HeadError, match="another model"):
        head.check_model("fingerprint-b", 8)
    with pytest.raises(HeadError, match="8-d"):
        head.check_model("fingerprint-a", 16)
    save_file({"weight": np.zeros((2, 8), np.float32)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(HeadError, match="no clip_med head metadata"):
        ProbeHead.load(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(HeadError, match="not a readable"):
        ProbeHead.load(tmp_path / "junk.safetensors")
    with pytest.raises(HeadError, match="does not exist"):
        ProbeHead.load(tmp_path / "missing.safetensors")


def test_probe_command_fits_scores_and_saves_heads_the_api_uses(tmp_path):
    shard_set = synthetic_shards(tmp_path / "shards")
    checkpoint = save_checkpoint(tmp_path / "run")
    out = tmp_path / "heads"
    cfg = ProbeConfig(checkpoint=str(checkpoint), data=ShardsData(dir=str(shard_set.out_dir)), out=str(out),
                      Cs=[0.1, 10.0], folds=2, workers=0, progress=False)
    report = probe_checkpoint(cfg)
    assert report["split"] == "dev" and report["train_split"] == "train"
    for task in ("modality", "anatomy"):
        metrics = report["linear_probe"][task]
        assert set(metrics) >= {"accuracy", "balanced_accuracy", "macro_f1", "auroc", "confusion_matrix", "C"}
        assert metrics["C"] in (0.1, 10.0) and metrics["n"] == 24 and metrics["n_train"] == 48
        assert np.asarray(metrics["confusion_matrix"]).sum() == 24
        assert (out / f"confusion_linear_probe_{task}.png").is_file()
    assert json.loads((out / "probe_report.json").read_text())["heads"]["modality"].endswith("modality.safetensors")
    assert "| linear_probe | anatomy | 24 |" in (out / "probe_report.md").read_text()

    model = clip_med.load(checkpoint)
    head = ProbeHead.load(out / "anatomy.safetensors")
    assert head.model_fingerprint == model.fingerprint and head.info["metrics"]["accuracy"] == \
        report["linear_probe"]["anatomy"]["accuracy"]
    data = open_data(ShardsData(dir=str(shard_set.out_dir)), None)
    dev = embed_split(model.model, data.shard_set.urls("dev"), model.transform, model.tokenizer, model.device,
                      workers=0, progress=False)
    predicted = head.predict_proba(dev.image).argmax(1)
    truth = np.array([head.labels.index(label) for label in dev.labels["anatomy"]])
    assert float((predicted == truth).mean()) == pytest.approx(report["linear_probe"]["anatomy"]["accuracy"])
    # The API applies the head to images given directly (here: the first dev image, decoded from its shard).
    import webdataset as wds

    sample = next(iter(wds.WebDataset(data.shard_set.urls("dev")[0], shardshuffle=False).decode("pil")))
    image = load_image(sample["png"], model.preprocessing)
    result = model.classify(image, head=out / "anatomy.safetensors")
    assert result.method == "linear_probe" and result.task == "anatomy" and result.labels == head.labels
    assert np.allclose(result.probs, head.predict_proba(model.embed_images(image)), atol=1e-6)
    with pytest.raises(ValueError, match="do not apply"):
        model.classify(image, head=head, labels=["a", "b"])
    with pytest.raises(ValueError, match="classifies 'anatomy'"):
        model.classify(image, head=head, task="modality")
    other = clip_med.load(save_checkpoint(tmp_path / "other", seed=1))
    with pytest.raises(HeadError, match="another model"):
        other.classify(image, head=out / "anatomy.safetensors")
