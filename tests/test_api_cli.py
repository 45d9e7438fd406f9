"""The command lines themselves (one process each): classify with DICOM, evaluate, embed, search."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom.data
import pytest
from api_helpers import gradient, save_checkpoint, synthetic_shards
from PIL import Image

import clip_med
from clip_med.inference.commands import expand_images, format_classification

REPO = Path(__file__).resolve().parents[1]


def _run(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd or REPO, env=env,
                          timeout=300)


def test_classify_command_takes_dicom_png_folders_and_reports_bad_files(tmp_path):
    checkpoint = save_checkpoint(tmp_path / "run")
    folder = tmp_path / "scans"
    folder.mkdir()
    Image.fromarray(gradient()).save(folder / "a.png")
    (folder / "notes.txt").write_text("not an image")
    ct, mr = pydicom.data.get_testdata_file("CT_small.dcm"), pydicom.data.get_testdata_file("MR_small.dcm")
    done = _run("clip_med.classify", f"checkpoint={checkpoint}", f"images=[{ct},{mr},{folder}]", "task=modality",
                "format=json")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    results = [line for line in lines if "prediction" in line]
    assert [Path(line["input"]).name for line in results] == ["CT_small.dcm", "MR_small.dcm", "a.png"]
    for line in results:
        assert abs(sum(line["probabilities"].values()) - 1) < 1e-5
    assert [line["skipped"]["reason"] for line in lines if "skipped" in line] == ["not_an_image"]
    missing = _run("clip_med.classify", f"checkpoint={tmp_path / 'nope.pt'}", f"images={ct}")
    assert missing.returncode == 2 and "error: checkpoint" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.slow
def test_embed_then_search_commands(tmp_path):
    shard_set = synthetic_shards(tmp_path / "shards", {"dev": 20})
    checkpoint = save_checkpoint(tmp_path / "run")
    out = tmp_path / "emb"
    done = _run("clip_med.embed", f"checkpoint={checkpoint}", f"shards={shard_set.out_dir}/dev-*.tar", f"out={out}",
                "workers=0", "progress=false")
    assert done.returncode == 0 and "20 embeddings (128-d)" in done.stdout, done.stderr[-2000:]
    found = _run("clip_med.search", f"index={out}", "text=an MRI of the spine", "k=3")
    assert found.returncode == 0 and "top 3 of 20" in found.stdout, found.stderr[-2000:]
    recall = _run("clip_med.search", f"index={out}", "recall=true", "build=hnsw")
    assert "text->image recall over 20 pairs" in recall.stdout


@pytest.mark.slow
def test_evaluate_command_writes_into_the_hydra_run_dir(tmp_path):
    shard_set = synthetic_shards(tmp_path / "shards", {"train": 32, "dev": 16})
    checkpoint = save_checkpoint(tmp_path / "run")
    done = _run("clip_med.evaluate", f"checkpoint={checkpoint}", "data=shards", f"data.dir={shard_set.out_dir}",
                f"hydra.run.dir={tmp_path / 'eval'}", "eval.workers=0", "eval.probe_folds=2", "progress=false")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| zero_shot | modality | 16 |" in done.stdout
    assert (tmp_path / "eval" / "report.md").is_file() and (tmp_path / "eval" / "clip_benchmark.json").is_file()


def test_classification_table_and_image_expansion(tmp_path):
    model = clip_med.load(save_checkpoint(tmp_path / "run"))
    folder = tmp_path / "deep" / ("long-folder-name-" * 4)
    folder.mkdir(parents=True)
    for name in ("b.png", "a.png"):
        Image.fromarray(gradient()).save(folder / name)
    (folder / ".hidden").write_text("x")
    images = expand_images([str(folder), str(folder / "*.png"), str(tmp_path / "missing.png")])
    assert [Path(image).name for image in images] == ["a.png", "b.png", "a.png", "b.png", "missing.png"]
    result = model.classify(images, task="anatomy", on_error="skip")
    table = format_classification(result, top=2).splitlines()
    assert table[0].startswith("zero-shot anatomy over head")
    assert table[1].endswith(tuple(f"{p:.3f}" for _, p in result.top(2)[0][1:])) and "/a.png" in table[1]
    assert "SKIPPED missing_file" in table[5] and table[6] == "4 classified, 1 skipped"
    with pytest.raises(FileNotFoundError, match="no file matches"):
        expand_images(str(tmp_path / "*.dcm"))
