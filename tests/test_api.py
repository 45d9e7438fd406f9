import csv
import dataclasses
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from api_helpers import TINY, gradient, medpix_images, png_bytes, save_checkpoint
from helpers import make_medpix
from PIL import Image

import clip_med
from clip_med.data.images import EncodeOptions, ImageLimits, ImageRejected, prepare_image
from clip_med.data.sources.medpix import MedPixSourceConfig
from clip_med.data.writer import ShardConfig
from clip_med.eval.datasets import eval_shard_dir
from clip_med.eval.evaluator import EvalConfig
from clip_med.eval.zero_shot import label_prompts, zero_shot_weights
from clip_med.inference.evaluation import EvaluateConfig, evaluate_checkpoint
from clip_med.inference.inputs import load_image
from clip_med.modeling.checkpoint import CheckpointError, Preprocessing
from clip_med.modeling.factory import ModelConfig, create_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def model(checkpoint):
    return clip_med.load(checkpoint, device="cpu")


def test_importing_clip_med_stays_light():
    code = "import sys, clip_med, clip_med.data.images; print('torch' in sys.modules, 'load' in dir(clip_med))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]
    assert callable(clip_med.load) and callable(clip_med.open_index)


def test_load_recreates_the_trained_model(model, checkpoint):
    payload = torch.load(checkpoint, weights_only=True)
    for name, tensor in model.model.state_dict().items():
        assert torch.equal(tensor, payload["state_dict"][name])
    assert (model.name, model.info.step, model.dim, model.bundle.image_size) == ("medclip-tiny", 5, 128, 32)
    assert not model.model.training
    assert model.labels == {}  # no run report, no manifest: the taxonomy's classes
    assert model.task_labels("modality") == clip_med.labels.taxonomy.get_task("modality").ids


def test_default_classes_come_from_the_run_report(tmp_path):
    path = save_checkpoint(tmp_path / "run")
    report = {"zero_shot": {"modality": {"labels": ["ct", "mr"]}, "anatomy": {"labels": ["head", "thorax"]}}}
    (tmp_path / "run" / "report.json").write_text(json.dumps(report))
    loaded = clip_med.load(path)
    assert loaded.task_labels("modality") == ["ct", "mr"]
    assert loaded.classify(gradient()).labels == ["ct", "mr"]
    assert clip_med.load(path, labels={"modality": ["xray", "ct"]}).task_labels("modality") == ["xray", "ct"]


def test_plain_open_clip_state_dicts_need_the_architecture(tmp_path, model):
    plain = tmp_path / "open_clip.pt"
    torch.save({f"module.{k}": v for k, v in model.model.state_dict().items()}, plain)
    with pytest.raises(CheckpointError, match="model_name="):
        clip_med.load(plain)
    loaded = clip_med.load(plain, model_name="medclip-tiny", image_size=32)
    assert loaded.info.format == "open_clip"
    image = gradient()
    assert np.allclose(loaded.embed_images(image), model.embed_images(image), atol=1e-6)
    from safetensors.torch import save_file

    save_file(model.model.state_dict(), tmp_path / "weights.safetensors")
    assert clip_med.load(tmp_path / "weights.safetensors", model_name="medclip-tiny", image_size=32).fingerprint \
        == model.fingerprint


class Payload:
    """Any Python object: a checkpoint holding one needs unpickling, which clip_med refuses."""


def test_unsafe_truncated_and_mismatched_checkpoints_are_refused(tmp_path, checkpoint):
    torch.save({"state_dict": {}, "model_name": "medclip-tiny", "extra": Payload()}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="will not unpickle"):
        clip_med.load(tmp_path / "pickled.pt")
    data = checkpoint.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        clip_med.load(tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        clip_med.load(tmp_path / "missing.pt")
    payload = torch.load(checkpoint, weights_only=True)
    payload["model_cfg"] = {**payload["model_cfg"], "embed_dim": 64}
    torch.save(payload, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="embed_dim"):
        clip_med.load(tmp_path / "other.pt")


@pytest.mark.parametrize("image_format,max_side", [("png", None), ("png", 24), ("jpeg", 24)])
def test_inputs_get_exactly_the_pixels_of_a_shard(tmp_path, image_format, max_side):
    limits = ImageLimits()
    prep = Preprocessing(max_side=max_side, image_format=image_format, limits=limits)
    for mode, seed in (("L", 1), ("RGB", 2), ("RGBA", 3)):
        array = np.random.default_rng(seed).integers(0, 255, (50, 44) if mode == "L" else (50, 44, len(mode)),
                                                      dtype=np.uint8)
        path = tmp_path / f"{mode}.png"
        Image.fromarray(array, mode=mode).save(path)
        prepared = prepare_image(str(path), "pil", limits, EncodeOptions(max_side, image_format))
        in_shard = np.asarray(Image.open(io.BytesIO(prepared.data)).convert("RGB"))
        for item in (path, str(path), path.read_bytes(), Image.open(path), array):
            assert np.array_equal(np.asarray(load_image(item, prep).convert("RGB")), in_shard)


def test_sixteen_bit_and_float_inputs_are_rescaled_like_the_writer(tmp_path):
    array = (np.arange(40 * 48, dtype=np.uint16).reshape(40, 48) * 13)
    path = tmp_path / "sixteen.png"
    Image.fromarray(array).save(path)
    prep = Preprocessing()
    from_file = np.asarray(load_image(path, prep))
    assert from_file.dtype == np.uint8 and from_file.min() == 0 and from_file.max() == 255
    assert np.array_equal(np.asarray(load_image(array.astype(np.float32) - 1000, prep)), from_file)
    assert np.array_equal(np.asarray(load_image(array[..., None], prep)), from_file)


def test_bad_inputs_are_refused_with_the_reason(tmp_path, model):
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    data = png_bytes(gradient(64, 64))
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    cases = {tmp_path / "missing.png": "missing_file", tmp_path / "text.png": "not_an_image",
             tmp_path / "empty.png": "empty_file", tmp_path / "cut.png": "truncated_or_corrupt"}
    for item, reason in cases.items():
        with pytest.raises(ImageRejected) as caught:
            model.embed_images([gradient(), item])
        assert caught.value.reason == reason and str(item) in str(caught.value) and "input 1" in str(caught.value)
    for array, reason in ((np.zeros((8, 8), np.uint8), "too_small"), (np.full((20, 20), np.nan), "not_an_image"),
                          (np.zeros((2, 2, 20, 20, 3)), "unsupported_mode")):
        with pytest.raises(ImageRejected, match=reason):
            model.embed_images(array)
    with pytest.raises(TypeError, match="cannot read an image"):
        model.embed_images([42])
    result = model.classify([tmp_path / "text.png", gradient(), tmp_path / "missing.png"], on_error="skip")
    assert result.indices == [1] and len(result) == 1
    assert [(s.index, s.reason) for s in result.skipped] == [(0, "not_an_image"), (2, "missing_file")]


def test_embeddings_are_normalised_and_batch_independent(model):
    images = [gradient(seed=seed) for seed in range(5)]
    batch = model.embed_images(images, batch_size=2)
    assert batch.shape == (5, 128) and np.allclose(np.linalg.norm(batch, axis=1), 1, atol=1e-5)
    assert np.allclose(model.embed_images(images[3]), batch[3:4], atol=1e-5)
    assert np.allclose(model.embed_images(np.stack(images)), batch, atol=1e-5)
    assert np.allclose(model.embed_images(images, workers=2), batch, atol=1e-6)
    texts = model.embed_texts(["axial CT of the head", "MRI of the knee"])
    assert texts.shape == (2, 128) and np.allclose(np.linalg.norm(texts, axis=1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="empty"):
        model.embed_texts(["fine", "  "])


def test_zero_shot_uses_the_evaluation_prompts_and_temperature(model):
    image = gradient()
    result = model.classify(image, task="anatomy")
    classes = clip_med.labels.taxonomy.get_task("anatomy").ids
    weights = zero_shot_weights(model.model, model.tokenizer, label_prompts("anatomy", classes), "cpu")
    logits = 100.0 * model.embed_images(image) @ weights
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert result.labels == classes and np.allclose(result.probs, expected, atol=1e-6)
    assert result.method == "zero_shot" and result.task == "anatomy"
    assert result.predictions == [classes[int(expected.argmax())]]
    assert abs(sum(result[0].values()) - 1) < 1e-6 and result.top(2)[0][0][0] == result.predictions[0]


def test_own_labels_and_prompts(model):
    image = gradient()
    own = model.classify(image, labels=["pneumothorax", "normal chest"], prompts=["a chest X-ray showing {}."])
    assert own.labels == ["pneumothorax", "normal chest"] and own.probs.shape == (1, 2)
    explicit = model.classify(image, prompts={"a": ["a chest X-ray showing pneumothorax."],
                                              "b": ["a chest X-ray showing normal chest."]})
    assert np.allclose(explicit.probs, own.probs, atol=1e-6)
    for kwargs, message in (({"labels": ["only"]}, "at least two"), ({"labels": ["a", "a"]}, "distinct"),
                            ({"prompts": ["no placeholder"]}, "one '{}'"), ({"task": "finding"}, "no built-in labels"),
                            ({"labels": "ct"}, "list of non-empty strings")):
        with pytest.raises(ValueError, match=message):
            model.classify(image, **kwargs)


def test_classify_reproduces_the_evaluate_command_on_original_files(tmp_path):
    root = make_medpix(tmp_path / "medpix", {"train": 6, "dev": 3}, images_per_case=3)
    source = MedPixSourceConfig(root=str(root))
    shards = ShardConfig(root=str(tmp_path / "shards"), workers=0, progress=False, max_samples=8)
    # The checkpoint was "trained" on max_side=24 shards: evaluation and the API must both shrink.
    checkpoint = save_checkpoint(tmp_path / "run", max_side=24, source=source,
                                 shards_out=str(eval_shard_dir(source, dataclasses.replace(shards, max_side=24))))
    out = tmp_path / "eval"
    cfg = EvaluateConfig(checkpoint=str(checkpoint), data=source, shards=shards, out=str(out), progress=False,
                         eval=EvalConfig(workers=0, probe_folds=2, probe_Cs=[1.0]))
    report = evaluate_checkpoint(cfg)
    loaded = clip_med.load(checkpoint)
    assert loaded.labels_origin.endswith("train.manifest.json")
    names, paths = zip(*medpix_images(root, "dev"))
    rows = {(row["id"], row["task"]): row for row in csv.DictReader(open(out / "predictions.csv"))
            if row["method"] == "zero_shot"}
    for task in ("modality", "anatomy"):
        result = loaded.classify(list(paths), task=task)
        assert result.labels == report["zero_shot"][task]["labels"]
        truth = [rows[name, task]["true"] for name in names]
        accuracy = float(np.mean([p == t for p, t in zip(result.predictions, truth)]))
        assert accuracy == report["zero_shot"][task]["accuracy"]
        for name, probs in zip(names, result.probs):
            expected = json.loads(rows[name, task]["probabilities"])
            assert np.allclose([expected[label] for label in result.labels], probs, atol=1e-5)


def test_a_model_without_torch_weights_is_refused_cleanly(tmp_path):
    bundle = create_model(ModelConfig(**TINY))
    torch.save({"state_dict": {"wrong": torch.zeros(1)}, "model_name": "medclip-tiny",
                "model_cfg": bundle.model_cfg, "config": {"model": TINY}}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="does not fit"):
        clip_med.load(tmp_path / "bad.pt")


def test_dicom_files_and_bytes_are_windowed_like_the_dicom_reader(model):
    import pydicom.data

    from clip_med.data.images import get_decoder

    paths = [pydicom.data.get_testdata_file(name) for name in ("CT_small.dcm", "MR_small.dcm")]
    for path in paths:
        windowed, _ = get_decoder("dicom")(path, ImageLimits(), None)
        assert np.array_equal(np.asarray(load_image(path, Preprocessing())), np.asarray(windowed.convert("L")))
    result = model.classify([*paths, open(paths[0], "rb").read()], task="modality")
    assert result.probs.shape == (3, len(result.labels)) and np.allclose(result.probs.sum(1), 1, atol=1e-5)
    assert np.allclose(result.probs[0], result.probs[2], atol=1e-6)
    with pytest.raises(ImageRejected) as caught:
        model.classify(b"\x00" * 128 + b"DICM" + b"\x01" * 64)
    assert caught.value.reason in ("undecodable_dicom", "no_pixel_data", "truncated_or_corrupt")
