"""Readers of the benchmark sets' published layouts (MedMNIST, PCam, LC25000, RSNA, CheXpert, MIMIC-CXR):
the records, labels and splits of tiny fixtures in the exact layouts, the images through the shard writer,
and `evaluate` on a benchmark source (its own classes scored beside the taxonomy's)."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from api_helpers import save_checkpoint
from benchmark_fixtures import (
    CHEXPERT_COLUMNS,
    chexpert_cells,
    make_chexpert,
    make_lc25000,
    make_medmnist,
    make_mimic,
    make_pcam,
    make_rsna,
)
from PIL import Image

from clip_med.data.images import ImageLimits, ImageRejected, get_decoder
from clip_med.data.record import SkipReason
from clip_med.data.sources import all_sources, read_source
from clip_med.data.sources.chexpert import ChexpertSourceConfig
from clip_med.data.sources.lc25000 import Lc25000SourceConfig
from clip_med.data.sources.medmnist import MedMnistSourceConfig
from clip_med.data.sources.pcam import PcamSourceConfig
from clip_med.data.sources.rsna import RsnaSourceConfig
from clip_med.data.writer import ShardConfig, write_shards
from clip_med.eval.datasets import ShardsData, open_data, real_captions
from clip_med.eval.evaluator import EvalConfig
from clip_med.eval.zero_shot import label_prompts
from clip_med.inference.evaluation import EvaluateConfig, evaluate_checkpoint
from clip_med.labels import benchmarks
from clip_med.labels.benchmarks import CHESTMNIST_FINDINGS, CHEXPERT_FINDINGS, MEDMNIST_SUBSETS

CONF = Path(__file__).resolve().parents[1] / "clip_med" / "conf" / "source"
NEW_SOURCES = ("medmnist", "pcam", "lc25000", "rsna", "chexpert")


def _shard(records, out: Path) -> dict[str, tuple[dict, np.ndarray]]:
    """Write the records (one split) as shards; sample key -> (its metadata, its image as an array)."""
    write_shards({records[0].split: records}, out, ShardConfig(out=str(out), workers=0, progress=False, dedup=False),
                 "test")
    found = {}
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as archive:
            members = {member.name: archive.extractfile(member).read() for member in archive if member.isfile()}
        for name, data in members.items():
            key, _, extension = name.partition(".")
            if extension == "json":
                image = next(value for other, value in members.items() if other.startswith(key + ".")
                             and other.partition(".")[2] not in ("json", "txt"))
                found[key] = (json.loads(data), np.asarray(Image.open(io.BytesIO(image))))
    return found


def test_every_reader_is_registered_with_a_config_file():
    for name in NEW_SOURCES:
        assert name in all_sources() and (CONF / f"{name}.yaml").is_file()


def test_every_class_task_has_prompts_and_distinct_names():
    for task in benchmarks.TASKS.values():
        prompts = label_prompts(task.name, task.ids, synonyms=False)
        assert all(prompts[label] for label in task.ids)
        assert len({texts[0] for texts in prompts.values()}) == len(task.ids), task.name
    for subset in MEDMNIST_SUBSETS.values():
        ids = CHESTMNIST_FINDINGS if subset.multilabel else benchmarks.TASKS[subset.task].ids
        assert len(ids) == len(subset.classes)
    assert label_prompts("cardiomegaly", ["negative", "positive"], synonyms=False) == {
        "negative": ["a chest X-ray showing no cardiomegaly.", "a chest radiograph with no cardiomegaly.",
                     "chest X-ray: no cardiomegaly."],
        "positive": ["a chest X-ray showing cardiomegaly.", "a chest radiograph with cardiomegaly.",
                     "chest X-ray: cardiomegaly."]}


# ---------------------------------------------------------------------------------------------
# MedMNIST


@pytest.mark.parametrize("compressed", [True, False])
def test_medmnist_reads_every_split_and_each_record_is_its_row(tmp_path, compressed):
    path = make_medmnist(tmp_path, "pathmnist", {"train": 9, "val": 3, "test": 5}, compressed=compressed)
    splits = read_source(MedMnistSourceConfig(root=str(tmp_path), subset="pathmnist"))
    assert {split: len(records) for split, records in splits.items()} == {"train": 9, "val": 3, "test": 5}
    record = splits["train"][4]
    ids = benchmarks.TASKS["pathmnist"].ids
    assert record.labels["pathmnist"] == ids[4] == "mucus" and record.decoder == "npz_array"
    assert record.caption == "a histopathology image of mucus." and record.text == record.caption
    arrays = np.load(path)
    decode = get_decoder("npz_array")
    for record in [splits["test"][4], splits["train"][7], splits["train"][2], splits["val"][0]]:  # back and forth
        image, _ = decode(record.image, ImageLimits(), None)
        split, row = record.split, int(record.id.split("-")[1])
        assert np.array_equal(np.asarray(image), arrays[f"{split}_images"][row])
    written = _shard(splits["test"], tmp_path / "shards")
    assert len(written) == 5
    meta, pixels = written["test-000003"]
    assert meta["labels"]["pathmnist"] == ids[3] and np.array_equal(pixels, arrays["test_images"][3])


def test_medmnist_chestmnist_is_one_binary_task_per_finding(tmp_path):
    make_medmnist(tmp_path, "chestmnist", {"train": 6, "test": 3}, channels=1, multilabel=14)
    cfg = MedMnistSourceConfig(root=str(tmp_path), subset="chestmnist")
    assert cfg.class_tasks() == CHESTMNIST_FINDINGS
    record = read_source(cfg)["train"][1]
    expected = {finding: "positive" if (1 + column) % 3 == 0 else "negative"
                for column, finding in enumerate(CHESTMNIST_FINDINGS)}
    assert {task: record.labels[task] for task in CHESTMNIST_FINDINGS} == expected
    assert record.labels["modality"] == "xray" and record.labels["anatomy"] == "thorax"
    assert record.caption == "a chest X-ray showing a pleural effusion, a nodule, consolidation and fibrosis."
    image, _ = get_decoder("npz_array")(record.image, ImageLimits(), None)
    assert image.mode == "L" and image.size == (28, 28)


def test_medmnist_sizes_and_a_file_as_root(tmp_path):
    make_medmnist(tmp_path, "dermamnist", {"train": 3, "test": 2}, n_classes=7, size=64)
    splits = read_source(MedMnistSourceConfig(root=str(tmp_path), subset="dermamnist", size=64))
    image, _ = get_decoder("npz_array")(splits["test"][1].image, ImageLimits(), None)
    assert image.size == (64, 64)
    by_file = read_source(MedMnistSourceConfig(root=str(tmp_path / "dermamnist_64.npz")))
    assert [record.labels for record in by_file["test"]] == [record.labels for record in splits["test"]]
    with pytest.raises(FileNotFoundError, match="dermamnist.npz does not exist.*medmnist.com"):
        read_source(MedMnistSourceConfig(root=str(tmp_path), subset="dermamnist"))
    with pytest.raises(ValueError, match="unknown MedMNIST subset 'pathmnst'"):
        read_source(MedMnistSourceConfig(root=str(tmp_path), subset="pathmnst"))
    with pytest.raises(ValueError, match="choose a MedMNIST subset"):
        read_source(MedMnistSourceConfig(root=str(tmp_path)))


def test_medmnist_refuses_object_arrays_and_marks_bad_labels(tmp_path):
    arrays = {"train_images": np.zeros((2, 28, 28), np.uint8), "train_labels": np.array([[1], [12]], np.uint8),
              "test_images": np.array([[None]] * 2, dtype=object), "test_labels": np.array([[0], [1]], np.uint8)}
    np.savez(tmp_path / "pneumoniamnist.npz", **arrays)
    with pytest.raises(ValueError, match="only plain numbers"):
        read_source(MedMnistSourceConfig(root=str(tmp_path), subset="pneumoniamnist"))
    del arrays["test_images"], arrays["test_labels"]
    np.savez(tmp_path / "pneumoniamnist.npz", **arrays)
    records = read_source(MedMnistSourceConfig(root=str(tmp_path), subset="pneumoniamnist"))["train"]
    assert records[0].problem is None and records[0].labels["pneumoniamnist"] == "pneumonia"
    assert records[1].problem == SkipReason.BAD_ROW and "class 12" in records[1].problem_detail


def _replace(path: Path, write) -> None:
    """Replace ``path`` as a download would (a new file renamed over it), one second newer."""
    old = path.stat()
    fresh = path.with_name("fresh-" + path.name)
    write(fresh)
    os.replace(fresh, path)
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns + 10**9))


def _medmnist_file(root: Path):
    """A MedMNIST file, its config, its test images and how to write it again with the images inverted."""
    path = make_medmnist(root, "pathmnist", {"test": 4}, compressed=False)
    arrays = dict(np.load(path))

    def write_inverted(target: Path) -> None:
        np.savez(target, test_images=255 - arrays["test_images"], test_labels=arrays["test_labels"])

    return path, MedMnistSourceConfig(root=str(root), subset="pathmnist"), arrays["test_images"], write_inverted


def _pcam_file(root: Path):
    import h5py

    make_pcam(root, {"test": 4})
    path = root / "camelyonpatch_level_2_split_test_x.h5"
    with h5py.File(path) as handle:
        pixels = handle["x"][:]

    def write_inverted(target: Path) -> None:
        with h5py.File(target, "w") as handle:
            handle.create_dataset("x", data=255 - pixels, chunks=(1, 96, 96, 3), compression="gzip")

    return path, PcamSourceConfig(root=str(root)), pixels, write_inverted


@pytest.mark.parametrize("make", [_medmnist_file, _pcam_file])
def test_a_replaced_array_file_is_resharded_with_its_new_pixels(tmp_path, make):
    path, source, pixels, write_inverted = make(tmp_path / "data")

    def shard() -> tuple[str, np.ndarray]:
        found = _shard(read_source(source)["test"], tmp_path / "shards")
        manifest = json.loads((tmp_path / "shards" / "test.manifest.json").read_text())
        return manifest["fingerprint"], found["test-000002"][1]

    first, image = shard()
    assert np.array_equal(image, pixels[2]) and shard()[0] == first  # unchanged: the same fingerprint
    _replace(path, write_inverted)
    second, image = shard()
    assert second != first and np.array_equal(image, 255 - pixels[2])  # resharded, read through a fresh handle


# ---------------------------------------------------------------------------------------------
# PCam, LC25000, RSNA


def test_pcam_reads_the_hdf5_pairs_with_slides_as_cases(tmp_path):
    make_pcam(tmp_path, {"train": 6, "valid": 2, "test": 4})
    splits = read_source(PcamSourceConfig(root=str(tmp_path)))
    assert {split: len(records) for split, records in splits.items()} == {"train": 6, "valid": 2, "test": 4}
    record = splits["test"][3]
    assert record.labels["pcam"] == "tumor" and record.meta["case_id"] == "camelyon16_train_001"
    assert record.caption == "a histopathology image of lymph node tissue with metastatic tumour."
    import h5py

    with h5py.File(tmp_path / "camelyonpatch_level_2_split_test_x.h5") as handle:
        expected = handle["x"][3]
    image, _ = get_decoder("h5_array")(record.image, ImageLimits(), None)
    assert image.size == (96, 96) and np.array_equal(np.asarray(image), expected)
    (tmp_path / "camelyonpatch_level_2_split_test_x.h5").rename(tmp_path / "camelyonpatch_level_2_split_test_x.h5.gz")
    with pytest.raises(FileNotFoundError, match="still gzipped"):
        read_source(PcamSourceConfig(root=str(tmp_path)))


def test_pcam_patch_outside_the_dataset_is_a_rejected_image(tmp_path):
    make_pcam(tmp_path, {"test": 2}, meta=False)
    record = read_source(PcamSourceConfig(root=str(tmp_path)))["test"][0]
    assert "case_id" not in record.meta
    with pytest.raises(ImageRejected) as found:
        get_decoder("h5_array")(record.image.replace(", 0]", ", 7]"), ImageLimits(), None)
    assert found.value.reason == SkipReason.TRUNCATED and "outside" in found.value.detail


def test_lc25000_reads_the_class_folders_per_organ_with_a_stable_holdout(tmp_path):
    make_lc25000(tmp_path, per_class=6)
    both = read_source(Lc25000SourceConfig(root=str(tmp_path)))
    assert sum(map(len, both.values())) == 30 and set(both) == {"train", "test"}
    labels = {record.labels["lc25000"] for records in both.values() for record in records}
    assert labels == {"colon_aca", "colon_n", "lung_aca", "lung_n", "lung_scc"}
    lung = read_source(Lc25000SourceConfig(root=str(tmp_path / "lung_colon_image_set"), organ="lung"))
    assert Lc25000SourceConfig(organ="lung").class_tasks() == ["lc25000_lung"]
    assert {record.labels["lc25000_lung"] for records in lung.values() for record in records} == {
        "lung_aca", "lung_n", "lung_scc"}
    again = read_source(Lc25000SourceConfig(root=str(tmp_path)))
    assert [record.id for record in again["test"]] == [record.id for record in both["test"]]
    assert both["test"][0].caption.startswith("a histopathology image of ")
    with pytest.raises(ValueError, match="source.organ='liver'"):
        Lc25000SourceConfig(organ="liver").class_tasks()
    with pytest.raises(FileNotFoundError, match="does not look like LC25000"):
        read_source(Lc25000SourceConfig(root=str(tmp_path / "lung_colon_image_set" / "lung_image_sets")))


def test_rsna_is_one_label_per_patient_read_as_dicom(tmp_path):
    make_rsna(tmp_path, patients=6)
    splits = read_source(RsnaSourceConfig(root=str(tmp_path), holdout=0.0))
    records = splits["train"]
    assert len(records) == 6  # the two box rows of a pneumonia patient are one image
    assert [record.labels["rsna_pneumonia"] for record in records] == ["normal", "pneumonia"] * 3
    assert all(record.decoder == "dicom" and record.meta["case_id"] == record.id for record in records)
    written = _shard(records, tmp_path / "shards")
    assert len(written) == 6 and all(meta["labels"]["modality"] == "xray" for meta, _ in written.values())
    held = read_source(RsnaSourceConfig(root=str(tmp_path), holdout=0.5))
    assert set(held) == {"train", "test"} and sum(map(len, held.values())) == 6


def test_rsna_bad_rows_are_counted_not_fatal(tmp_path):
    make_rsna(tmp_path, patients=2)
    with open(tmp_path / "stage_2_train_labels.csv", "a") as handle:
        handle.write("../../etc/passwd,,,,,1\nabc,,,,,maybe\n")
    records = read_source(RsnaSourceConfig(root=str(tmp_path), holdout=0.0))["train"]
    bad = [record for record in records if record.problem]
    assert len(records) == 4 and len(bad) == 2 and all(record.problem == SkipReason.BAD_ROW for record in bad)


# ---------------------------------------------------------------------------------------------
# CheXpert, MIMIC-CXR


def _findings(record) -> list[str]:
    return [record.labels[finding] for finding in CHEXPERT_FINDINGS]


def test_chexpert_reads_the_published_csvs_with_the_uncertainty_policies(tmp_path):
    root = make_chexpert(tmp_path / "CheXpert-v1.0-small", {"train": 8, "valid": 4})
    splits = read_source(ChexpertSourceConfig(root=str(root)))
    assert {split: len(records) for split, records in splits.items()} == {"train": 8, "valid": 4}
    record = splits["train"][1]
    assert Path(record.image).is_file() and record.meta == {"view": "Frontal", "case_id": "patient00000"}
    # cells cycle 1, 0, -1, blank: U-Ignore leaves -1 unknown, a blank is negative
    read = {"1.0": "positive", "0.0": "negative", "-1.0": "unknown", "": "negative"}
    assert _findings(record) == [read[cell] for cell in chexpert_cells(1)]
    ones = read_source(ChexpertSourceConfig(root=str(root), uncertain="positive", blank="ignore"))["train"][1]
    read.update({"-1.0": "positive", "": "unknown"})
    assert _findings(ones) == [read[cell] for cell in chexpert_cells(1)]
    frontal = read_source(ChexpertSourceConfig(root=str(root), frontal_only=True))
    assert len(frontal["train"]) == 6 and all(r.meta["view"] == "Frontal" for r in frontal["train"])
    chosen = ChexpertSourceConfig(root=str(root), findings=["edema", "pleural_effusion"])
    assert chosen.class_tasks() == ["edema", "pleural_effusion"]
    assert set(read_source(chosen)["valid"][0].labels) == {"modality", "anatomy", "edema", "pleural_effusion"}
    with pytest.raises(ValueError, match="uncertain='maybe'"):
        read_source(ChexpertSourceConfig(root=str(root), uncertain="maybe"))
    with pytest.raises(ValueError, match="unknown finding"):
        ChexpertSourceConfig(findings=["cardiomegally"]).class_tasks()


def test_chexpert_style_csv_with_paths_under_the_root(tmp_path):
    root = make_chexpert(tmp_path / "CheXpert-v1.0-small", {"train": 4})
    renamed = tmp_path / "chexpert"
    shutil.move(root, renamed)  # the published folder name in Path no longer matches the folder
    records = read_source(ChexpertSourceConfig(root=str(renamed)))["train"]
    assert all(Path(record.image).is_file() for record in records)
    lines = (renamed / "train.csv").read_text().splitlines()
    (renamed / "mine.csv").write_text("\n".join(["file," + ",".join(CHEXPERT_COLUMNS)] + [
        line.split(",", 1)[0].split("/", 1)[1] + "," + ",".join(line.split(",")[5:]) for line in lines[1:]]) + "\n")
    mine = read_source(ChexpertSourceConfig(root=str(renamed), files={"test": "mine.csv"}, image_column="file"))
    assert [_findings(r) for r in mine["test"]] == [_findings(r) for r in records]


def test_mimic_cxr_reads_the_gzipped_tables_and_the_files_tree(tmp_path):
    root = make_mimic(tmp_path / "mimic-cxr-jpg", studies=6)
    splits = read_source(ChexpertSourceConfig(root=str(root), layout="mimic"))
    assert {split: len(records) for split, records in splits.items()} == {"train": 8, "test": 4}
    record = splits["train"][0]
    assert Path(record.image).is_file() and record.meta["case_id"] == "p10000000"
    read = {"1.0": "positive", "0.0": "negative", "-1.0": "unknown", "": "negative"}
    assert _findings(record) == [read[cell] for cell in chexpert_cells(0)]
    frontal = read_source(ChexpertSourceConfig(root=str(root), layout="mimic", frontal_only=True))
    assert sum(map(len, frontal.values())) == 6 and all(r.meta["view"] == "PA" for r in frontal["train"])
    with gzip.open(root / "mimic-cxr-2.0.0-split.csv.gz", "at") as handle:
        handle.write("x/../y,5,1,train\n")
    bad = [r for r in read_source(ChexpertSourceConfig(root=str(root), layout="mimic"))["train"] if r.problem]
    assert len(bad) == 1 and bad[0].problem == SkipReason.BAD_ROW and bad[0].image == ""


# ---------------------------------------------------------------------------------------------
# evaluate on a benchmark source


def test_evaluate_scores_a_benchmark_sets_own_classes(tmp_path):
    make_medmnist(tmp_path / "mm", "pneumoniamnist", {"train": 12, "test": 6}, n_classes=2, channels=1)
    from clip_med.cli.common import data_schema

    data = data_schema(MedMnistSourceConfig)(name="medmnist", root=str(tmp_path / "mm"), subset="pneumoniamnist",
                                             text_template=None, splits=None, limit=None, allow_outside_root=False,
                                             size=None, split="test", train_split="train")
    cfg = EvaluateConfig(checkpoint=str(save_checkpoint(tmp_path / "run")), data=data, device="cpu",
                         shards=ShardConfig(root=str(tmp_path / "shards"), workers=0, progress=False),
                         eval=EvalConfig(workers=0, probe_folds=2, probe_Cs=[1.0]), out=str(tmp_path / "eval"),
                         progress=False)
    report = evaluate_checkpoint(cfg)
    assert list(report["zero_shot"]) == ["pneumoniamnist"] and report["zero_shot"]["pneumoniamnist"]["n"] == 6
    assert report["zero_shot"]["pneumoniamnist"]["labels"] == ["normal", "pneumonia"]
    assert report["linear_probe"]["pneumoniamnist"]["accuracy"] == 1.0  # the classes differ in brightness
    records = json.loads((tmp_path / "eval" / "clip_benchmark.json").read_text())
    assert {(record["dataset"], record["task"]) for record in records} >= {
        ("medmnist/test/pneumoniamnist", "zeroshot_classification"), ("medmnist/test/pneumoniamnist", "linear_probe")}
    # captions made from class names: no retrieval, neither here nor on the shards read back
    assert "retrieval" not in report and all(record["task"] != "zeroshot_retrieval" for record in records)
    assert "## Retrieval" not in (tmp_path / "eval" / "report.md").read_text()
    assert open_data(ShardsData(dir=report["shards"], split="test"), ShardConfig()).retrieval is False


def test_only_sources_with_real_captions_get_retrieval():
    flagged = {name for name, spec in all_sources().items() if spec.config_class.captions_from_class_names}
    assert flagged == {*NEW_SOURCES, "class_folders"}
    assert real_captions("medpix") and real_captions("roco") and real_captions("not-registered")
    assert not real_captions("pcam")
