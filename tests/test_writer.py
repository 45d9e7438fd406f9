import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import write_png
from PIL import Image

from clip_med.data.manifest import load_manifest
from clip_med.data.record import Record
from clip_med.data.writer import ShardConfig, write_split


def _record(i, path, caption="a caption", problem=None):
    return Record(id=f"item.{i}", split="train", image=str(path), caption=caption, text=caption,
                  labels={"modality": "ct" if i % 2 else "mr"}, meta={"n": i}, problem=problem)


def _good_records(folder: Path, n: int) -> list[Record]:
    folder.mkdir(parents=True, exist_ok=True)
    return [_record(i, write_png(folder / f"{i}.png", seed=i)) for i in range(n)]


def _tar_members(path):
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_writes_bounded_shards_with_metadata(tmp_path):
    records = _good_records(tmp_path / "img", 7)
    cfg = ShardConfig(max_samples=3, workers=0, progress=False)
    manifest = write_split(records, "train", tmp_path / "out", cfg, "src")
    assert [s.count for s in manifest.shards] == [3, 3, 1]
    assert manifest.written_count == 7 and manifest.skipped == []
    assert manifest.label_counts == {"modality": {"ct": 3, "mr": 4}}
    members = _tar_members(tmp_path / "out" / "train-000000.tar")
    names = [name for name, _ in members]
    assert sorted(names[:3]) == ["item_0.json", "item_0.png", "item_0.txt"]  # no dot inside the key
    meta = json.loads(dict(members)["item_0.json"])
    assert meta["id"] == "item.0" and meta["labels"] == {"modality": "mr"} and meta["meta"] == {"n": 0}
    assert meta["image"]["mode"] == "L" and meta["image"]["width"] == 48
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_bad_images_are_skipped_reported_and_counted(tmp_path):
    folder = tmp_path / "img"
    records = _good_records(folder, 3)
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image at all")
    good = (folder / "0.png").read_bytes()
    (folder / "cut.png").write_bytes(good[: len(good) // 2])
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (folder / "cut.jpg").write_bytes(buffer.getvalue()[:400])
    write_png(folder / "tiny.png", size=(1, 1))
    bad = {"empty.png": "empty_file", "text.jpg": "not_an_image", "cut.png": "truncated_or_corrupt",
           "cut.jpg": "truncated_or_corrupt", "tiny.png": "too_small", "missing.png": "missing_file"}
    records += [_record(10 + i, folder / name) for i, name in enumerate(bad)]
    records.append(_record(30, folder / "1.png", caption="", problem="empty_caption"))
    records.append(_record(31, folder / "dup.png"))
    (folder / "dup.png").write_bytes((folder / "2.png").read_bytes())
    manifest = write_split(records, "train", tmp_path / "out", ShardConfig(workers=0, progress=False), "src")
    reasons = {Path(item.image).name: item.reason for item in manifest.skipped}
    assert reasons == {**bad, "1.png": "empty_caption", "dup.png": "duplicate_image"}
    assert manifest.written_count == 3
    assert manifest.written_count + len(manifest.skipped) == manifest.input_count == len(records)
    assert all(item.detail for item in manifest.skipped if item.reason != "empty_caption")
    saved = json.loads((tmp_path / "out" / "train.manifest.json").read_text())
    assert saved["skipped_by_reason"]["truncated_or_corrupt"] == 2 and saved["skipped_count"] == 8


def test_rerun_on_unchanged_source_does_nothing(tmp_path, caplog):
    records = _good_records(tmp_path / "img", 5)
    cfg = ShardConfig(max_samples=2, workers=0, progress=False)
    write_split(records, "train", tmp_path / "out", cfg, "src")
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    write_split(records, "train", tmp_path / "out", cfg, "src")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == stamps
    assert "up to date" in caplog.text


def test_changed_source_rewrites_and_removes_stale_shards(tmp_path):
    records = _good_records(tmp_path / "img", 6)
    cfg = ShardConfig(max_samples=2, workers=0, progress=False)
    write_split(records, "train", tmp_path / "out", cfg, "src")
    manifest = write_split(records[:3], "train", tmp_path / "out", cfg, "src")
    assert sorted(p.name for p in (tmp_path / "out").glob("train-*.tar")) == ["train-000000.tar", "train-000001.tar"]
    assert manifest.written_count == 3


def test_output_is_identical_whatever_the_worker_count(tmp_path):
    records = _good_records(tmp_path / "img", 9)
    outputs = []
    for workers in (0, 2):
        out = tmp_path / f"out{workers}"
        write_split(records, "train", out, ShardConfig(max_samples=4, workers=workers, progress=False), "src")
        outputs.append({p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))})
    assert outputs[0] == outputs[1] and len(outputs[0]) == 3


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, monkeypatch):
    records = _good_records(tmp_path / "img", 10)
    cfg = ShardConfig(max_samples=3, workers=0, progress=False)
    reference = write_split(records, "train", tmp_path / "ref", cfg, "src")

    import clip_med.data.writer as writer

    calls = {"n": 0}
    original = writer.run_image_job

    def dying(job):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt("simulated kill")
        return original(job)

    monkeypatch.setattr(writer, "run_image_job", dying)
    with pytest.raises(KeyboardInterrupt):
        write_split(records, "train", tmp_path / "out", cfg, "src")
    assert (tmp_path / "out" / ".progress" / "train.jsonl").is_file()
    assert not (tmp_path / "out" / "train.manifest.json").exists()
    monkeypatch.setattr(writer, "run_image_job", original)
    resumed = write_split(records, "train", tmp_path / "out", cfg, "src")
    assert resumed.to_dict() == reference.to_dict()
    for shard in reference.shards:
        assert (tmp_path / "out" / shard.name).read_bytes() == (tmp_path / "ref" / shard.name).read_bytes()
    assert load_manifest(tmp_path / "out", "train").written_count == 10
    assert not (tmp_path / "out" / ".progress" / "train.jsonl").exists()


def test_resize_on_write_and_encodings(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    records = [_record(0, write_png(folder / "big.png", size=(300, 200)))]
    cfg = ShardConfig(max_side=100, workers=0, progress=False)
    manifest = write_split(records, "train", tmp_path / "png", cfg, "s")
    meta = json.loads(dict(_tar_members(tmp_path / "png" / manifest.shards[0].name))["item_0.json"])
    assert (meta["image"]["width"], meta["image"]["height"]) == (100, 67)
    manifest = write_split(records, "train", tmp_path / "jpg",
                           ShardConfig(image_format="jpeg", workers=0, progress=False), "s")
    assert "item_0.jpg" in dict(_tar_members(tmp_path / "jpg" / manifest.shards[0].name))
