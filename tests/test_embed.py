import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from api_helpers import save_checkpoint, synthetic_shards

import clip_med
import clip_med.inference.extract as extract_module
from clip_med.eval.embeddings import embed_split
from clip_med.inference.extract import ExtractConfig, ExtractionError, extract, resolve_shards
from clip_med.inference.index import IndexConfig


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    return synthetic_shards(tmp_path_factory.mktemp("shards"), {"train": 16, "dev": 30}, max_samples=12)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return clip_med.load(save_checkpoint(tmp_path_factory.mktemp("run")))


def _cfg(**overrides):
    return ExtractConfig(**{"batch_size": 5, "workers": 0, "progress": False, **overrides})


def test_shard_patterns(shard_set, tmp_path):
    folder = shard_set.out_dir
    dev = [str(folder / f"dev-00000{i}.tar") for i in range(3)]
    assert resolve_shards(str(folder / "dev-{000000..000002}.tar")) == dev
    assert resolve_shards(str(folder / "dev-*.tar")) == dev
    assert resolve_shards([str(folder / "dev-*.tar"), dev[0]]) == dev
    assert len(resolve_shards(str(folder))) == 5
    with pytest.raises(ExtractionError, match="not found"):
        resolve_shards(str(tmp_path / "nope-{000000..000001}.tar"))
    with pytest.raises(ExtractionError, match="no shards match"):
        resolve_shards(str(tmp_path / "*.tar"))


def test_extraction_matches_the_evaluation_embeddings(shard_set, model, tmp_path):
    urls = shard_set.urls("dev")
    result = extract(model, urls, tmp_path / "out", _cfg())
    assert result["status"] == "complete" and result["count"] == 30 and result["read_errors"] == {}
    assert result["rows_per_shard"] == {urls[0]: 12, urls[1]: 12, urls[2]: 6}
    reference = embed_split(model.model, urls, model.transform, model.tokenizer, model.device, workers=0,
                            progress=False)
    table = pq.read_table(tmp_path / "out" / "metadata.parquet").to_pylist()
    image = np.load(tmp_path / "out" / "image_embeddings.npy")
    text = np.load(tmp_path / "out" / "text_embeddings.npy")
    order = {item: i for i, item in enumerate(reference.ids)}
    rows = [order[row["id"]] for row in table]
    assert sorted(rows) == list(range(30)) and [row["id"] for row in table] == sorted(row["id"] for row in table)
    assert np.allclose(image, reference.image[rows], atol=1e-6)
    assert np.allclose(text, reference.text[rows], atol=1e-6)
    first = table[0]
    assert first["shard"] == urls[0] and first["split"] == "dev" and first["source"] == "synthetic"
    assert first["modality"] == json.loads(first["labels"])["modality"] == reference.labels["modality"][rows[0]]
    assert first["caption"] and first["text"] and first["origin"].startswith(first["modality"])
    index_info = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index_info["factory"] == "Flat" and index_info["count"] == 30


def test_a_rerun_resumes_after_a_crash_and_redoes_only_missing_shards(shard_set, model, tmp_path, monkeypatch):
    urls, out = shard_set.urls("dev"), tmp_path / "out"
    original, written = extract_module.write_part, []

    def crash_after_first(out_dir, url, *args):
        if written:
            raise KeyboardInterrupt("killed")
        written.append(url)
        return original(out_dir, url, *args)

    monkeypatch.setattr(extract_module, "write_part", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        extract(model, urls, out, _cfg())
    monkeypatch.setattr(extract_module, "write_part", original)
    assert json.loads((out / "embed.json").read_text())["status"] == "running"
    with pytest.raises(ValueError, match="not complete"):
        clip_med.open_index(out)
    first_part = next((out / "parts").glob("dev-000000-*.parquet"))
    before = first_part.stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(extract_module, "write_part", lambda *a: calls.append(a[1]) or original(*a))
    result = extract(model, urls, out, _cfg())
    assert calls == urls[1:] and first_part.stat().st_mtime_ns == before
    assert result["count"] == 30 and len(clip_med.open_index(out)) == 30
    fresh = extract(model, urls, tmp_path / "fresh", _cfg(texts=False, index=IndexConfig(kind="none")))
    assert np.allclose(np.load(out / "image_embeddings.npy"), np.load(tmp_path / "fresh" / "image_embeddings.npy"))
    assert not (tmp_path / "fresh" / "text_embeddings.npy").exists() and fresh["texts"] is False
    calls.clear()
    extract(model, urls, out, _cfg())  # everything done: nothing re-embedded
    assert calls == []


def test_another_checkpoint_cannot_write_into_the_same_folder(shard_set, model, tmp_path):
    extract(model, shard_set.urls("dev")[:1], tmp_path / "out", _cfg())
    other = clip_med.load(save_checkpoint(tmp_path / "other", seed=3))
    with pytest.raises(ExtractionError, match="other settings"):
        extract(other, shard_set.urls("dev")[:1], tmp_path / "out", _cfg())


def test_a_truncated_shard_keeps_its_good_samples(shard_set, model, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(shard_set.out_dir, shards)
    damaged = shards / "dev-000000.tar"
    data = damaged.read_bytes()
    damaged.write_bytes(data[: len(data) // 2])
    result = extract(model, str(shards / "dev-*.tar"), tmp_path / "out", _cfg())
    kept = result["rows_per_shard"][str(damaged)]
    assert 0 < kept < 12 and result["count"] == kept + 18
    assert sum(result["read_errors"].values()) >= 1


def test_two_processes_under_torchrun_give_the_single_process_result(shard_set, model, tmp_path):
    single = tmp_path / "single"
    extract(model, shard_set.urls("dev"), single, _cfg())
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc_per_node=2", "--master_port=29517", "-m", "clip_med.embed",
               f"checkpoint={model.info.path}", f"shards={shard_set.out_dir}/dev-*.tar", f"out={tmp_path / 'two'}",
               "workers=0", "batch_size=5", "progress=false"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "30 embeddings (128-d) from 3 shard(s)" in done.stdout
    assert np.allclose(np.load(single / "image_embeddings.npy"), np.load(tmp_path / "two" / "image_embeddings.npy"),
                       atol=1e-6)
    assert pq.read_table(single / "metadata.parquet").equals(pq.read_table(tmp_path / "two" / "metadata.parquet"))
