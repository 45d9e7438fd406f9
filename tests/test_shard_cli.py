"""``python -m clip_med.shard``: its configs compose for every source, and the command runs end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from PIL import Image

from clip_med.cli.config import CONF_DIR, to_object
from clip_med.cli.shard import register
from clip_med.data.shardset import ShardCommandConfig, shard_source
from clip_med.data.sources.roco import RocoSourceConfig

ROOT = Path(__file__).resolve().parents[1]
register()  # the shard command's own schemas


def _compose(overrides=(), config="shard"):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(config, overrides=list(overrides))


@pytest.mark.parametrize("source", sorted(path.stem for path in (CONF_DIR / "source").glob("*.yaml")))
def test_every_source_composes_with_the_shard_command(source, monkeypatch):
    monkeypatch.setenv("MEDPIX_ROOT", "/data/medpix")
    cfg = to_object(_compose([f"source={source}", "out=/tmp/somewhere"]))
    assert isinstance(cfg, ShardCommandConfig) and cfg.source.name == source and cfg.out == "/tmp/somewhere"


def test_dataset_roots_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("ROCO_ROOT", "/data/roco-dataset")
    monkeypatch.setenv("PMC_OA_ROOT", "/data/pmc_oa")
    assert to_object(_compose(["source=roco"])).source.root == "/data/roco-dataset"
    assert to_object(_compose(["source=pmc_oa"])).source.root == "/data/pmc_oa"
    assert to_object(_compose(["+exp=roco"], config="train")).source.name == "roco"
    assert to_object(_compose(["+exp=pmc_oa"], config="train")).source.holdout == 0.02


def test_training_takes_shard_lists_from_the_command_line():
    # Hydra needs the braces and spaces quoted: "data.train_shards='...'" on a shell command line.
    cfg = to_object(_compose(["data.train_shards='https://host/roco/train-{000000..000031}.tar'",
                              "data.eval_shards='pipe:aws s3 cp s3://bucket/roco/validation.manifest.json -'"],
                             config="train"))
    assert cfg.data.train_shards == "https://host/roco/train-{000000..000031}.tar"
    assert cfg.data.eval_shards.startswith("pipe:aws s3 cp") and cfg.data.eval_shards.endswith(".json -")


@pytest.mark.parametrize("override", ["source=roco source.rooot=/x", "shards.max_sampls=3", "source=nope"])
def test_typos_fail_at_compose_time(override):
    with pytest.raises(ConfigCompositionException):
        _compose(override.split())


def test_a_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="razorx89/roco-dataset.*ROCO_ROOT"):
        shard_source(ShardCommandConfig(source=RocoSourceConfig(root=str(tmp_path / "absent"))))


def test_shard_command_writes_then_reuses(tmp_path):
    root = tmp_path / "pairs"
    for split, count in (("train", 6), ("test", 2)):
        (root / split).mkdir(parents=True)
        for index in range(count):
            pixels = np.random.default_rng(index + 10 * len(split)).integers(0, 256, (40, 40), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / f"{index}.png")
            (root / split / f"{index}.txt").write_text(f"Axial CT of the chest, case {index}.")
    whole = (root / "train" / "0.png").read_bytes()
    (root / "train" / "broken.png").write_bytes(whole[: len(whole) // 2])
    (root / "train" / "broken.txt").write_text("Chest CT.")
    out = tmp_path / "shards"
    command = [sys.executable, "-m", "clip_med.shard", "source=folder", f"source.root={root}", f"out={out}",
               "shards.workers=2", "shards.max_samples=4", f"hydra.run.dir={tmp_path / 'log'}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "train: 6 of 7 written in 2 shard(s)" in first.stdout
    assert "skipped        1  truncated_or_corrupt" in first.stdout and "modality   labelled 100.0%" in first.stdout
    assert "test: 2 of 2 written" in first.stdout
    manifest = json.loads((out / "train.manifest.json").read_text())
    assert manifest["skipped"][0]["image"].endswith("broken.png") and manifest["source"] == "folder"
    stamps = {path.name: path.stat().st_mtime_ns for path in out.iterdir()}
    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and "up to date" in second.stdout + second.stderr
    assert {path.name: path.stat().st_mtime_ns for path in out.iterdir()} == stamps
