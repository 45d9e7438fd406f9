"""Generic readers: tables (CSV/TSV/JSONL/JSON), caption folders, class-folder trees."""

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from clip_med.data.record import SkipReason
from clip_med.data.shardset import ShardCommandConfig, shard_source
from clip_med.data.sources import read_source
from clip_med.data.sources.generic import ClassFolderSourceConfig, FolderSourceConfig, TableSourceConfig
from clip_med.data.writer import ShardConfig


def _png(path: Path, seed: int = 0, size=(32, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)).save(path)
    return path


def test_csv_with_columns_labels_splits_and_groups(tmp_path):
    for index in range(6):
        _png(tmp_path / "scans" / f"s{index}.png", index)
    (tmp_path / "export.csv").write_text(
        "file,report,Modality,Region,patient,set,age\n"
        "scans/s0.png,Small nodule in the right upper lobe.,CT,Chest,p1,train,61\n"
        "scans/s1.png,No acute findings.,MR,Brain,p1,train,61\n"
        "scans/s2.png,Axial CT of the abdomen.,,,p2,train,45\n"
        "scans/s3.png,Normal study.,Drawing,,p3,test,30\n"
        "scans/s4.png,Knee radiograph.,,,p4,test,22\n"
        "scans/missing.png,Lost image.,,,p5,test,50\n")
    cfg = TableSourceConfig(path=str(tmp_path / "export.csv"), image_column="file", caption_column="report",
                            label_columns={"modality": "Modality", "anatomy": "Region"}, split_column="set",
                            group_column="patient", meta_columns=["age"], text_template="Age {age}. {caption}")
    splits = read_source(cfg)
    assert {split: len(records) for split, records in splits.items()} == {"train": 3, "test": 3}
    by_id = {record.id: record for split in splits.values() for record in split}
    s0, s2, s3 = by_id["scans/s0"], by_id["scans/s2"], by_id["scans/s3"]
    assert s0.labels == {"modality": "ct", "anatomy": "thorax"}
    assert s0.label_origin == {"modality": "metadata", "anatomy": "metadata"}
    assert s2.labels == {"modality": "ct", "anatomy": "abdomen"} and s2.label_origin["modality"] == "caption"
    assert s3.labels["modality"] == "unknown"  # "Drawing" is no modality, and the caption names none
    assert s0.text == "Age 61. Small nodule in the right upper lobe." and s0.meta["case_id"] == "p1"
    assert by_id["scans/missing"].image.endswith("scans/missing.png")


def test_table_errors_name_the_columns(tmp_path):
    (tmp_path / "t.csv").write_text("path,text\na.png,x\n")
    with pytest.raises(KeyError, match=r"no column\(s\) \['image', 'caption'\].*source.image_column"):
        read_source(TableSourceConfig(path=str(tmp_path / "t.csv")))
    with pytest.raises(ValueError, match="exactly one of"):
        read_source(TableSourceConfig())
    (tmp_path / "t.xlsx").write_bytes(b"PK")
    with pytest.raises(ValueError, match="cannot tell the format"):
        read_source(TableSourceConfig(path=str(tmp_path / "t.xlsx")))


def test_med_mat_json_records_and_per_split_files(tmp_path):
    _png(tmp_path / "imgs" / "a.png", 1)
    _png(tmp_path / "imgs" / "b.png", 2)
    (tmp_path / "train.json").write_text(json.dumps([
        {"image": "imgs/a.png", "caption": "Chest X-ray: pneumonia."},
        {"image": "imgs/b.png", "caption": "Chest X-ray: no finding."}]))
    (tmp_path / "test.jsonl").write_text(json.dumps({"image": "imgs/a.png", "caption": "Brain MRI."}) + "\n")
    (tmp_path / "val.tsv").write_text("image\tcaption\nimgs/b.png\tAbdominal ultrasound.\n")
    splits = read_source(TableSourceConfig(files={"train": str(tmp_path / "train.json"),
                                                  "test": str(tmp_path / "test.jsonl"),
                                                  "val": str(tmp_path / "val.tsv")}))
    assert [r.labels["modality"] for r in splits["train"]] == ["xray", "xray"]
    assert splits["test"][0].labels == {"modality": "mr", "anatomy": "head"}
    assert splits["val"][0].labels == {"modality": "ultrasound", "anatomy": "abdomen"}


def test_table_of_dicom_files_takes_labels_from_tags(tmp_path):
    ct = Path(pydicom.data.get_testdata_file("CT_small.dcm", download=False))
    shutil.copy(ct, tmp_path / "ct.dcm")
    (tmp_path / "reports.csv").write_text("image,caption\nct.dcm,Lesion in segment VI.\n")
    record = read_source(TableSourceConfig(path=str(tmp_path / "reports.csv")))["train"][0]
    assert record.decoder == "dicom" and record.labels["modality"] == "ct"
    assert record.label_origin["modality"] == "metadata" and len(record.meta["case_id"]) == 16


def test_folder_with_sidecar_captions(tmp_path):
    root = tmp_path / "folder"
    _png(root / "train" / "a.png", 1)
    (root / "train" / "a.txt").write_text("Sagittal T2-weighted MRI of the lumbar spine.")
    _png(root / "train" / "sub" / "b.png", 2)
    (root / "train" / "sub" / "b.txt").write_bytes(b"caption \xff\xfe")
    _png(root / "train" / "c.png", 3)  # no caption file
    _png(root / "test" / "d.png", 4)
    (root / "test" / "d.txt").write_text("Chest CT.")
    (root / "test" / "notes.md").write_text("ignored: not an image")
    splits = read_source(FolderSourceConfig(root=str(root)))
    train = {record.id: record for record in splits["train"]}
    assert train["a"].labels == {"modality": "mr", "anatomy": "spine_msk"} and train["a"].problem is None
    assert train["sub/b"].problem == SkipReason.CAPTION_NOT_UTF8
    assert train["c"].problem == SkipReason.EMPTY_CAPTION and "c.txt" in train["c"].problem_detail
    assert [record.id for record in splits["test"]] == ["d"]


def test_class_folders_become_pairs(tmp_path):
    root = tmp_path / "modalities"
    for split in ("train", "val"):
        for index, name in enumerate(["CT", "MRI", "X-ray", "Other"]):
            _png(root / split / name / f"{index}.png", index + (10 if split == "val" else 0))
    cfg = ClassFolderSourceConfig(root=str(root), caption_template="A {class_name} image of the chest.",
                                  class_task="modality", labels={"anatomy": "thorax"},
                                  class_names={"Other": "unusual"})
    splits = read_source(cfg)
    assert set(splits) == {"train", "val"}
    by_class = {record.labels["class"]: record for record in splits["train"]}
    assert by_class["CT"].labels["modality"] == "ct" and by_class["X-ray"].labels["modality"] == "xray"
    assert by_class["MRI"].label_origin["modality"] == "folder" and by_class["CT"].labels["anatomy"] == "thorax"
    assert by_class["Other"].text == "A unusual image of the chest."
    assert by_class["Other"].labels["modality"] == "unknown"
    with pytest.raises(ValueError, match="not a anatomy label"):
        read_source(ClassFolderSourceConfig(root=str(root), labels={"anatomy": "elbowish"}))


def test_label_origins_and_coverage_reach_the_manifest(tmp_path):
    root = tmp_path / "folder"
    for index, caption in enumerate(["Chest CT.", "Brain MRI.", "A figure.", "Knee radiograph."]):
        _png(root / f"{index}.png", index)
        (root / f"{index}.txt").write_text(caption)
    cfg = ShardCommandConfig(source=FolderSourceConfig(root=str(root)), out=str(tmp_path / "out"),
                             shards=ShardConfig(workers=0, progress=False))
    manifest = shard_source(cfg).manifests["train"]
    assert manifest.label_origins["modality"] == {"caption": 3, "none": 1}
    assert manifest.label_coverage()["modality"] == 0.75
    saved = json.loads((tmp_path / "out" / "train.manifest.json").read_text())
    assert saved["label_coverage"]["anatomy"] == 0.75 and saved["label_origins"]["anatomy"]["caption"] == 3
