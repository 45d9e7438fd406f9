import pytest
from helpers import make_medpix

from clip_med.data.sources import read_source
from clip_med.data.sources.medpix import DEFAULT_TEMPLATE, MedPixSourceConfig


def test_reads_published_layout(tmp_path):
    root = make_medpix(tmp_path / "mp", {"train": 3, "dev": 1}, extra_splits={"train_1": ["train"]})
    splits = read_source(MedPixSourceConfig(root=str(root)))
    assert sorted(splits) == ["dev", "train"]  # train_1 is inside train: not sharded twice
    assert len(splits["train"]) == 6 and len(splits["dev"]) == 2
    record = splits["train"][0]
    assert record.image.endswith(f"{record.id}.png")
    assert record.labels["modality"] in ("ct", "mr") and record.labels["anatomy"] != "unknown"
    assert record.caption.startswith("Finding number")
    assert record.meta["case_title"].startswith("Case ") and record.meta["diagnosis"] == "Diagnosis X"
    assert record.meta["plane"] == "Axial" and record.meta["sex"] == "female"
    assert record.text.startswith(("CT image of the", "MRI image of the")) and "axial plane" in record.text
    assert record.caption in record.text


def test_nested_split_is_read_when_named(tmp_path):
    root = make_medpix(tmp_path / "mp", {"train": 2, "dev": 1}, extra_splits={"train_1": ["train"]})
    splits = read_source(MedPixSourceConfig(root=str(root), splits=["train_1", "dev"]))
    assert sorted(splits) == ["dev", "train_1"]


def test_custom_template_and_limit(tmp_path):
    root = make_medpix(tmp_path / "mp")
    cfg = MedPixSourceConfig(root=str(root), text_template="{caption} ({location_category}, {sex})", limit=3)
    splits = read_source(cfg)
    assert all(len(records) <= 3 for records in splits.values())
    assert splits["train"][0].text.endswith("female)")


def test_missing_root_explains_where_to_get_the_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="github.com/CHILab1/MedPix-2.0.*MEDPIX_ROOT"):
        read_source(MedPixSourceConfig(root=None))
    with pytest.raises(FileNotFoundError, match="does not look like MedPix"):
        read_source(MedPixSourceConfig(root=str(tmp_path)))


def test_unknown_split_is_refused(tmp_path):
    root = make_medpix(tmp_path / "mp")
    with pytest.raises(ValueError, match="no split"):
        read_source(MedPixSourceConfig(root=str(root), splits=["test"]))


def test_real_medpix(medpix_real_root):
    splits = read_source(MedPixSourceConfig(root=str(medpix_real_root)))
    assert {split: len(records) for split, records in splits.items()} == {"dev": 197, "train": 1653}
    for records in splits.values():
        assert {r.labels["modality"] for r in records} == {"ct", "mr"}
        assert {r.labels["anatomy"] for r in records} == {"head", "thorax", "abdomen", "spine_msk", "urogenital"}
        assert all(r.text and r.problem is None for r in records)
    assert DEFAULT_TEMPLATE.startswith("{modality}")
