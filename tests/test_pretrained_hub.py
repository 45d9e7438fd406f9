"""Pretrained models through the Hugging Face hub's cache: hf-hub: repos (BiomedCLIP's layout), open_clip tags.

Everything is served by the fake hub of :mod:`hub_fixtures` (127.0.0.1, HF_ENDPOINT pointed at it):
a model downloads into an empty cache, runs again offline from the cache, and without either stops
with one ``error:`` line. Every command takes such a model, and each model sees its images as
open_clip's own transform for it would give them.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from api_helpers import gradient, png_bytes, save_checkpoint, synthetic_shards
from conftest import SHARED_DATA
from fastapi.testclient import TestClient
from helpers import tiny_train_config
from hub_fixtures import (
    BIOMEDCLIP_REPO,
    HUB_MODEL,
    TAG,
    TAG_ARCH,
    TAG_PREPROCESS,
    TAG_REPO,
    TEXT_REPO,
    FakeHub,
    biomedclip_config,
    biomedclip_repo,
    hub_env,
    register_tag,
    run_command,
    standard_repos,
    subprocess_env,
    text_repo,
    timm_repo,
)
from PIL import Image

import clip_med
from clip_med.cli.common import normalise_overrides
from clip_med.core import distributed
from clip_med.eval.datasets import ShardsData
from clip_med.eval.evaluator import EvalConfig
from clip_med.eval.zero_shot import label_prompts, prompt_style_for
from clip_med.inference.commands import ClassifyConfig, EmbedConfig, SearchConfig, run_classify, run_embed, run_search
from clip_med.inference.evaluation import EvaluateConfig, evaluate_checkpoint
from clip_med.inference.service import ServeConfig, build_service
from clip_med.modeling.factory import ModelConfig, create_model
from clip_med.modeling.hub import ModelUnavailable, first_on_rank_zero
from clip_med.training.metrics_log import read_metrics
from clip_med.training.trainer import train

SQUASH_REPO = "clipmed-test/tiny-biomedclip-squash"
SQUASH_PREPROCESS = {"mean": [0.4, 0.45, 0.5], "std": [0.2, 0.25, 0.3], "interpolation": "bilinear",
                     "resize_mode": "squash"}
MEDPIX_IMAGES = SHARED_DATA / "medpix-2.0" / "images"


@pytest.fixture(scope="module")
def hub():
    repos = {**standard_repos(), SQUASH_REPO: biomedclip_repo(preprocess_cfg=SQUASH_PREPROCESS)}
    with FakeHub(repos) as server:
        yield server


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache the in-process tests share (each downloads what it has not yet)."""
    return tmp_path_factory.mktemp("hf")


@pytest.fixture
def online(hub, cache, monkeypatch):
    hub_env(monkeypatch, hub.url, cache)
    register_tag(monkeypatch)
    return hub


def _images(folder: Path, count: int = 3) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(count):
        path = folder / f"scan{seed}.png"
        path.write_bytes(png_bytes(gradient(48, 40 + 8 * seed, seed=seed)))
        paths.append(str(path))
    return paths


def _classify_args(images: list[str], *model: str) -> list[str]:
    return [*model, f"images=[{','.join(images)}]", "labels=[ct,mr]", "format=json", "device=cpu"]


def _probabilities(stdout: str) -> list[list[float]]:
    rows = [json.loads(line)["probabilities"] for line in stdout.splitlines() if line.startswith("{")]
    return [[row[label] for label in sorted(row)] for row in rows]


# ---------------------------------------------------------------------------------------------
# Download, cache, offline, and the one-line error


def test_a_hub_model_downloads_into_an_empty_cache_then_runs_offline_then_fails_in_one_line(tmp_path):
    images = _images(tmp_path / "images")
    cache = tmp_path / "hf"
    args = _classify_args(images, f"model={HUB_MODEL}")
    with FakeHub(standard_repos()) as hub:
        first = run_command("clip_med.classify", args, subprocess_env(hub.url, cache))
        assert first.returncode == 0, first.stderr[-3000:]
        assert {Path(path).name for path in hub.downloads(BIOMEDCLIP_REPO)} == {"open_clip_config.json",
                                                                               "open_clip_pytorch_model.bin"}
        text_files = {Path(path).name for path in hub.downloads(TEXT_REPO)}
        assert {"config.json", "tokenizer.json"} <= text_files
        assert "model.safetensors" not in text_files  # the CLIP weights hold the text tower: not downloaded
        assert not hub.unhandled
    assert (cache / "hub" / "models--clipmed-test--tiny-biomedclip").is_dir()

    # The server is gone; HF_HUB_OFFLINE=1 reads the cache: the same answers.
    again = run_command("clip_med.classify", args, subprocess_env(None, cache, offline=True))
    assert again.returncode == 0, again.stderr[-3000:]
    assert np.allclose(_probabilities(again.stdout), _probabilities(first.stdout), atol=1e-6)
    assert len(_probabilities(first.stdout)) == len(images)

    # Neither cached nor reachable: one error line naming the model, the cache and how to fetch it.
    empty = tmp_path / "empty-hf"
    failed = run_command("clip_med.classify", args, subprocess_env(None, empty, offline=True))
    assert failed.returncode == 2
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), failed.stderr
    assert HUB_MODEL in lines[0] and str(empty / "hub") in lines[0]
    assert f"hf download {BIOMEDCLIP_REPO}" in lines[0] and "Traceback" not in failed.stderr


def test_a_missing_text_tower_is_named_in_the_one_line_error(tmp_path, hub):
    """The CLIP repo is cached but the repo its text tower names (hf_model_name) is not: that repo is named."""
    from huggingface_hub import hf_hub_download

    cache = tmp_path / "hf"
    for name in ("open_clip_config.json", "open_clip_pytorch_model.bin"):
        hf_hub_download(BIOMEDCLIP_REPO, name, cache_dir=str(cache / "hub"), endpoint=hub.url)
    failed = run_command("clip_med.classify", _classify_args(_images(tmp_path / "images", 1), f"model={HUB_MODEL}"),
                         subprocess_env(None, cache, offline=True))
    assert failed.returncode == 2, failed.stderr[-3000:]
    line = failed.stderr.strip()
    assert "\n" not in line and line.startswith("error: ") and "Traceback" not in line
    assert f"hf download {TEXT_REPO}" in line and str(cache / "hub") in line


def test_hub_errors_name_the_repository(online):
    with pytest.raises(ModelUnavailable, match="has no repository clipmed-test/no-such-model"):
        clip_med.load("hf-hub:clipmed-test/no-such-model", device="cpu")
    online.add_repo("clipmed-test/config-only", {"open_clip_config.json": biomedclip_repo()["open_clip_config.json"]})
    with pytest.raises(ModelUnavailable, match="config-only on the hub lacks a file"):
        clip_med.load("hf-hub:clipmed-test/config-only", device="cpu")


def test_the_cache_is_used_when_the_hub_is_down_without_offline_mode(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE unset and the hub unreachable: what is cached still loads (huggingface_hub's fallback)."""
    cache = tmp_path / "hf"
    texts = ["a CT scan of the brain."]
    with FakeHub(standard_repos()) as hub:
        hub_env(monkeypatch, hub.url, cache)
        expected = clip_med.load(HUB_MODEL, device="cpu").embed_texts(texts)
    hub_env(monkeypatch, hub.url, cache)  # the same endpoint, nothing listening any more
    assert np.array_equal(clip_med.load(HUB_MODEL, device="cpu").embed_texts(texts), expected)


# ---------------------------------------------------------------------------------------------
# Every command takes it


def test_evaluate_writes_a_zero_shot_baseline_report_for_a_hub_model(online, tmp_path):
    shard_set = synthetic_shards(tmp_path / "shards", {"train": 16, "dev": 12})
    cfg = EvaluateConfig(model_name=HUB_MODEL, device="cpu", data=ShardsData(dir=str(shard_set.out_dir)),
                         out=str(tmp_path / "eval"), progress=False,
                         eval=EvalConfig(workers=0, batch_size=16, probe_folds=2, probe_Cs=[1.0]))
    evaluate_checkpoint(cfg)
    saved = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert saved["checkpoint"] == HUB_MODEL and saved["model"] == HUB_MODEL and saved["step"] is None
    for task in ("modality", "anatomy"):
        assert 0 <= saved["zero_shot"][task]["accuracy"] <= 1
        assert 0 <= saved["linear_probe"][task]["accuracy"] <= 1
    assert set(saved["retrieval"]["text_to_image"]) >= {"R@1", "R@5", "R@10"}
    for name in ("report.md", "clip_benchmark.json", "predictions.csv"):
        assert (tmp_path / "eval" / name).is_file()


def test_training_fine_tunes_a_hub_model_and_its_checkpoint_loads_offline(online, cache, tmp_path, monkeypatch):
    cfg = tiny_train_config(tmp_path, epochs=6)
    cfg.source = dataclasses.replace(cfg.source, sizes={"train": 48, "dev": 16})
    cfg.model = ModelConfig(name=HUB_MODEL)
    cfg.optim.lr = 1e-3
    report = train(cfg)
    losses = [row["train/loss"] for row in read_metrics(cfg.run_dir) if "train/loss" in row]
    assert len(losses) == 18 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2
    assert report["model"] == HUB_MODEL
    checkpoint = sorted((Path(cfg.run_dir) / "checkpoints").glob("step-*.pt"))[-1]
    fine_tuned = clip_med.load(checkpoint, device="cpu")
    pretrained = clip_med.load(HUB_MODEL, device="cpu")
    assert fine_tuned.fingerprint != pretrained.fingerprint  # the weights are the checkpoint's, not the hub's
    texts = ["a CT scan of the brain.", "an X-ray of the chest."]

    online.requests.clear()
    hub_env(monkeypatch, None, cache, offline=True)  # the rebuild reads configs and tokenizer from the cache
    offline = clip_med.load(checkpoint, device="cpu")
    assert offline.fingerprint == fine_tuned.fingerprint
    assert np.allclose(offline.embed_texts(texts), fine_tuned.embed_texts(texts), atol=1e-6)
    assert not online.requests


def test_classify_embed_search_and_serve_take_a_hub_model(online, tmp_path):
    images = _images(tmp_path / "images")
    result = run_classify(ClassifyConfig(model_name=HUB_MODEL, images=images, labels=["ct", "mr"], device="cpu"))
    assert len(result) == len(images) and result.labels == ["ct", "mr"]

    shard_set = synthetic_shards(tmp_path / "shards", {"dev": 8})
    out = tmp_path / "embeddings"
    summary = run_embed(EmbedConfig(model_name=HUB_MODEL, shards=shard_set.urls("dev"), out=str(out), device="cpu",
                                    workers=0, progress=False))
    assert summary["count"] == 8 and summary["checkpoint"] == HUB_MODEL
    found = run_search(SearchConfig(index=str(out), text="a CT scan of the brain.", k=3))  # the index's model
    assert len(found.hits) == 3

    app = build_service(ServeConfig(model_name=HUB_MODEL, device="cpu"))
    client = TestClient(app)
    assert client.get("/health").json()["model"] == HUB_MODEL
    answer = client.post("/classify", files={"file": ("scan.png", png_bytes(gradient()), "image/png")},
                         data={"labels": "ct,mr"})
    assert answer.status_code == 200, answer.text


def test_clip_med_load_takes_a_pretrained_tag_with_its_preprocessing(online):
    model = clip_med.load(TAG_ARCH, pretrained=TAG, device="cpu")
    reference, _, preprocess = open_clip.create_model_and_transforms(TAG_ARCH, pretrained=TAG)
    assert {key: model.bundle.preprocess_cfg[key] for key in TAG_PREPROCESS} == TAG_PREPROCESS
    assert repr(model.transform) == repr(preprocess)
    state, ours = reference.state_dict(), model.model.state_dict()
    assert all(torch.equal(state[key], ours[key]) for key in state)
    assert model.prompt_style == "medical" and model.info.format == "pretrained"


def test_search_reloads_a_pretrained_tag_model_from_what_embed_recorded(online, tmp_path):
    shard_set = synthetic_shards(tmp_path / "shards", {"dev": 6})
    out = tmp_path / "embeddings"
    run_embed(EmbedConfig(model_name=TAG_ARCH, pretrained=TAG, shards=shard_set.urls("dev"), out=str(out),
                          device="cpu", workers=0, progress=False))
    recorded = json.loads((out / "embed.json").read_text())["load"]
    assert recorded == {"checkpoint": None, "model_name": TAG_ARCH, "pretrained": TAG}
    found = run_search(SearchConfig(index=str(out), text="a CT scan of the brain.", k=2))  # no model options
    assert len(found.hits) == 2


def test_the_classify_command_takes_a_pretrained_tag_then_offline(tmp_path):
    images = _images(tmp_path / "images", 2)
    cache = tmp_path / "hf"
    args = _classify_args(images, f"model={TAG_ARCH}", f"pretrained={TAG}")
    with FakeHub(standard_repos()) as hub:
        first = run_command("clip_med.classify", args, subprocess_env(hub.url, cache), tag=True)
        assert first.returncode == 0, first.stderr[-3000:]
        assert [Path(path).name for path in hub.downloads(TAG_REPO)] == ["open_clip_pytorch_model.bin"]
    again = run_command("clip_med.classify", args, subprocess_env(None, cache, offline=True), tag=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert np.allclose(_probabilities(again.stdout), _probabilities(first.stdout), atol=1e-6)


def test_towers_start_from_their_own_pretrained_weights_without_clip_weights(online, tmp_path):
    """A config asking for a pretrained timm image tower and a pretrained HF text tower, and no CLIP weights."""
    from safetensors.torch import load as load_safetensors

    folder = tmp_path / "towers"
    folder.mkdir()
    config = biomedclip_config()
    config["model_cfg"]["vision_cfg"]["timm_model_pretrained"] = True
    config["model_cfg"]["text_cfg"]["hf_model_pretrained"] = True
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):  # the tokenizer beside it, as exported
        (folder / name).write_bytes(text_repo()[name])
    bundle = create_model(ModelConfig(name=f"local-dir:{folder}"))
    image = load_safetensors(timm_repo()["model.safetensors"])
    text = load_safetensors(text_repo()["model.safetensors"])
    assert torch.equal(bundle.model.visual.trunk.patch_embed.proj.weight, image["patch_embed.proj.weight"])
    assert torch.equal(bundle.model.text.transformer.embeddings.word_embeddings.weight,
                       text["embeddings.word_embeddings.weight"])
    assert bundle.weights is None and bundle.pretrained


def test_a_model_without_weights_is_refused_for_inference(online):
    with pytest.raises(ValueError, match="has no weights to use: add pretrained=<tag>"):
        clip_med.load("medclip-tiny", device="cpu")


# ---------------------------------------------------------------------------------------------
# Preprocessing: the model's own preprocess_cfg, exactly as open_clip applies it


def _open_clip_preprocess(name: str):
    _, _, preprocess = open_clip.create_model_and_transforms(name)
    return preprocess


def test_a_squash_bilinear_preprocess_cfg_is_applied_exactly_as_open_clip_does(online):
    name = f"hf-hub:{SQUASH_REPO}"
    model = clip_med.load(name, device="cpu")
    expected = _open_clip_preprocess(name)
    assert model.bundle.preprocess_cfg["resize_mode"] == "squash"
    assert model.bundle.preprocess_cfg["interpolation"] == "bilinear"
    wide = Image.fromarray(np.stack([gradient(90, 250, seed=seed) for seed in range(3)], axis=-1))
    assert torch.equal(model.transform(wide), expected(wide))
    assert model.preprocess(wide).shape == (3, 160, 160)
    assert torch.equal(model.preprocess(wide), expected(wide))
    # The default resize (shortest side, then a centre crop) would give other pixels: the test can fail.
    shortest = _open_clip_preprocess(HUB_MODEL)
    assert not torch.equal(shortest(wide), expected(wide))


@pytest.mark.skipif(not MEDPIX_IMAGES.is_dir(), reason="MedPix 2.0 is not in /work/shared/data")
def test_medpix_images_are_preprocessed_exactly_as_open_clip_does(online):
    name = f"hf-hub:{SQUASH_REPO}"
    model = clip_med.load(name, device="cpu")
    expected = _open_clip_preprocess(name)
    paths = sorted(MEDPIX_IMAGES.glob("*.png"))[::300][:6]
    assert paths
    for path in paths:
        with Image.open(path) as image:
            reference = expected(image)
        assert torch.equal(model.preprocess(str(path)), reference), path.name


def test_default_models_keep_their_transforms(tmp_path):
    """medclip-tiny (open_clip's default preprocess_cfg): the very transforms clip_med built before, step by step."""
    from clip_med.data.transforms import AugmentConfig, create_transform

    bundle = clip_med.load(save_checkpoint(tmp_path / "run"), device="cpu").bundle
    image = Image.fromarray(np.stack([gradient(70, 50, seed=seed) for seed in range(3)], axis=-1))
    for train_mode in (False, True):
        ours = bundle.transform(train=train_mode, augment=AugmentConfig())
        before = create_transform(bundle.image_size, bundle.mean, bundle.std, train=train_mode)
        assert [type(step) for step in ours.transforms] == [type(step) for step in before.transforms]
        for seed in range(5):
            torch.manual_seed(seed)
            random.seed(seed)
            first = ours(image)
            torch.manual_seed(seed)
            random.seed(seed)
            assert torch.equal(first, before(image))


# ---------------------------------------------------------------------------------------------
# Prompts, and torchrun


def test_pretrained_models_get_medical_prompts_and_scratch_models_keep_theirs(online, tmp_path):
    prompts = label_prompts("modality", ["ct", "mr"], context={"anatomy": ["head", "abdomen"]}, style="medical")
    assert "a CT scan of the brain." in prompts["ct"] and "an axial MRI of the abdomen." in prompts["mr"]
    anatomy = label_prompts("anatomy", ["head"], context={"modality": ["ct", "xray"]}, style="medical")
    assert "a CT scan of the head." in anatomy["head"] and "an X-ray of the head." in anatomy["head"]
    # Explicit templates win over the style (the MedPix experiment's own prompts).
    own = label_prompts("modality", ["ct"], ["{} image of the {anatomy}."], context={"anatomy": ["head"]},
                        synonyms=False, style="medical")
    assert own == {"ct": ["CT image of the head."]}
    assert prompt_style_for(None, pretrained=True) == "medical" and prompt_style_for(None, False) == "plain"
    assert clip_med.load(HUB_MODEL, device="cpu").prompt_style == "medical"
    assert clip_med.load(save_checkpoint(tmp_path / "run"), device="cpu").prompt_style == "plain"


def test_model_on_the_command_line_names_a_model_on_every_command():
    biomedclip = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    assert normalise_overrides([f"model={HUB_MODEL}"], "evaluate") == [f"model_name={HUB_MODEL}"]
    assert normalise_overrides(["model=biomedclip", f"pretrained={TAG}"], "serve") == [
        f"model_name={biomedclip}", f"pretrained={TAG}"]
    assert normalise_overrides([f"model={HUB_MODEL}"], "train") == [f"model.name={HUB_MODEL}"]
    assert normalise_overrides(["model=biomedclip", "exp=medpix"], "train") == ["model=biomedclip", "+exp=medpix"]


def test_under_torchrun_rank_zero_downloads_first_and_the_others_wait(monkeypatch):
    order: list[str] = []
    sent: list[object] = []

    def broadcast(value, info, src=0):
        order.append("broadcast")
        return sent[0] if sent else value

    monkeypatch.setattr(distributed, "broadcast_object", broadcast)
    # the wait itself goes through the store, under the long phase timeout, not the collectives' timeout
    monkeypatch.setattr(distributed, "barrier", lambda info, what="": order.append("barrier"))
    rank1 = distributed.DistInfo(rank=1, world_size=2)
    assert first_on_rank_zero(rank1, lambda: order.append("build") or "model") == "model"
    assert order == ["barrier", "broadcast", "build"]  # rank 1 builds only after rank 0 said it is done

    order.clear()
    sent.append((True, "model X is not in the Hugging Face cache"))
    with pytest.raises(ModelUnavailable, match="not in the Hugging Face cache"):
        first_on_rank_zero(rank1, lambda: order.append("build"))
    assert order == ["barrier", "broadcast"]  # rank 0 failed: the others stop with its message, without trying

    def failing():
        raise ModelUnavailable("model X is not in the Hugging Face cache")

    sent.clear()
    order.clear()
    with pytest.raises(ModelUnavailable):
        first_on_rank_zero(distributed.DistInfo(rank=0, world_size=2), failing)
    assert order == ["barrier", "broadcast"]  # rank 0 tells the others before it stops


def test_an_offline_cache_copy_works_elsewhere(hub, tmp_path, monkeypatch):
    """``hf download`` on a connected machine, then copying the cache: the README's offline recipe."""
    from huggingface_hub import snapshot_download

    connected = tmp_path / "connected"
    for repo in (BIOMEDCLIP_REPO, TEXT_REPO):
        snapshot_download(repo, cache_dir=str(connected / "hub"), endpoint=hub.url)
    copied = tmp_path / "air-gapped"
    shutil.copytree(connected, copied, symlinks=True)
    hub_env(monkeypatch, None, copied, offline=True)
    assert clip_med.load(HUB_MODEL, device="cpu").dim == 32
