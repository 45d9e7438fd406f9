"""Hostile and careless inputs against the promises of issue 9 (the DICOM and service attacks
have files of their own): names from data never become paths or commands, a bad row is a
skipped row, inputs outside the source's folder are skipped, and no run starts quietly wrong.

Each test asserts the promise itself (no file outside the output folder changes, no marker file
appears, written + skipped = input, a non-zero exit with one line) rather than message wording.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from helpers import write_png

from clip_med.data.manifest import ManifestError, parse_manifest
from clip_med.data.shardset import open_shard_set, prepare_shards, resolve_shard_list
from clip_med.data.sources.generic import TableSourceConfig
from clip_med.data.writer import ShardConfig

ROOT = Path(__file__).resolve().parents[1]
SHARDS = dict(workers=0, progress=False, max_samples=100)

# Split values a careful attacker tries: traversal (plain, absolute, Windows, percent-encoded),
# Unicode look-alikes of "/" (division slash, fullwidth solidus), shell and NUL characters.
HOSTILE_SPLITS = ["../victim/dev", "/tmp/clip_med_abs_dev", "..\\..\\dev", "%2e%2e%2fdev", "dev\u2215x",
                  "dev\uff0fx", "dev;touch pwned", "..", ".hidden", "dev\x00x", "a" * 65]


def _tree_digest(root: Path, skip: Path) -> dict[str, str]:
    """Every file under ``root`` except those under ``skip``, by content hash."""
    digest = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            if skip in path.parents:
                continue
            digest[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def _table(tmp_path: Path, rows: list[dict], header=("image", "caption", "split"), name="table.csv") -> Path:
    import csv

    path = tmp_path / "data" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(header))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _images(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    return [write_png(folder / f"img{index}.png", seed=index).name for index in range(count)]


def _written_and_skipped(shard_set) -> tuple[int, int, int]:
    manifests = shard_set.manifests.values()
    return (sum(m.written_count for m in manifests), sum(len(m.skipped) for m in manifests),
            sum(m.input_count for m in manifests))


# ---------------------------------------------------------------------------------------------
# 1. Names from data never become paths or commands


def test_split_values_never_leave_the_output_folder(tmp_path):
    names = _images(tmp_path / "data", 3 + len(HOSTILE_SPLITS))
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "dev-000000.tar").write_bytes(b"precious")
    (victim / "dev.manifest.json").write_text("{}")
    rows = [{"image": names[0], "caption": "axial CT of the head", "split": "train"},
            {"image": names[1], "caption": "chest radiograph", "split": "train"},
            {"image": names[2], "caption": "MRI of the knee", "split": "dev"}]
    rows += [{"image": names[3 + index], "caption": f"scan number {index}", "split": split}
             for index, split in enumerate(HOSTILE_SPLITS)]
    table = _table(tmp_path, rows)
    out = tmp_path / "out"
    before = _tree_digest(tmp_path, out)
    shard_set = prepare_shards(TableSourceConfig(path=str(table), split_column="split"),
                               ShardConfig(out=str(out), **SHARDS))
    assert _tree_digest(tmp_path, out) == before  # nothing outside the output folder changed or appeared
    assert not Path("/tmp/clip_med_abs_dev-000000.tar").exists()
    assert sorted(shard_set.splits) == ["dev", "train"]
    written, skipped, total = _written_and_skipped(shard_set)
    assert (written, total) == (3, len(rows)) and written + skipped == total
    reasons = [item.reason for manifest in shard_set.manifests.values() for item in manifest.skipped]
    assert reasons.count("bad_split_name") == len(HOSTILE_SPLITS)
    for path in out.rglob("*"):  # every file the writer made is a direct child named as the writer names them
        assert path.parent == out or path.parent.name == ".progress"


def test_a_split_name_from_a_config_is_refused_before_writing(tmp_path):
    names = _images(tmp_path / "data", 1)
    table = _table(tmp_path, [{"image": names[0], "caption": "a scan", "split": "x"}])
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="not a safe name"):
        prepare_shards(TableSourceConfig(path=str(table), split="../escape"), ShardConfig(out=str(out), **SHARDS))
    assert not (tmp_path / "escape-000000.tar").exists() and not list(out.glob("*.tar"))


def _manifest(split: str, shard_names: list[str], source: str = "table") -> dict:
    return {"split": split, "source": source, "fingerprint": "x", "options": {}, "input_count": len(shard_names),
            "shards": [{"name": name, "count": 1, "bytes": 10} for name in shard_names], "skipped": [],
            "label_counts": {}}


@pytest.mark.parametrize("shard", ["train-000000.tar; touch {marker}", "train-000000.tar$(touch {marker})",
                                   "train-000000.tar`touch {marker}`", "train-000000.tar|touch {marker}",
                                   "../../train-000000.tar", "/etc/train-000000.tar", "train-000000.tar\ntouch x",
                                   "sub/train-000000.tar", "train-0000001.tar", "dev-000000.tar"])
def test_manifest_shard_names_never_reach_a_shell_or_a_path(tmp_path, shard):
    marker = tmp_path / "MARKER"
    folder = tmp_path / "remote"
    folder.mkdir()
    manifest = folder / "train.manifest.json"
    manifest.write_text(json.dumps(_manifest("train", [shard.format(marker=marker)])))
    with pytest.raises(ManifestError, match="refusing to open it"):
        resolve_shard_list(f"pipe:cat {manifest}")
    with pytest.raises(ManifestError):
        resolve_shard_list(f"pipe:cat {folder}/train-{{000000..000000}}.tar")
    with pytest.raises(ManifestError):
        open_shard_set(folder)
    assert not marker.exists()


@pytest.mark.parametrize("field, value", [("split", "../x"), ("split", "a b"), ("source", "../../etc")])
def test_manifest_names_that_would_become_paths_are_refused(field, value):
    data = _manifest("train", ["train-000000.tar"])
    data[field] = value
    with pytest.raises(ManifestError):
        parse_manifest(json.dumps(data), "m.json")


def test_training_from_a_pipe_manifest_with_an_injected_name_stops_without_running_it(tmp_path):
    marker = tmp_path / "MARKER"
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "train.manifest.json").write_text(json.dumps(_manifest("train", [f"train-000000.tar;touch {marker}"])))
    result = _command("clip_med.train", f"data.train_shards=pipe:cat {folder}/train.manifest.json", cwd=tmp_path)
    assert result.returncode != 0 and not marker.exists()
    assert result.stderr.strip().splitlines()[-1].startswith("error:")


# ---------------------------------------------------------------------------------------------
# 3. A bad row is a skipped row


def test_bad_rows_are_skipped_with_their_line_and_the_rest_is_written(tmp_path):
    data = tmp_path / "data"
    names = _images(data, 6)
    lines = ["\ufeffimage,caption",  # Excel's UTF-8 BOM before the first column name
             f"{names[0]},axial CT of the head\r",  # mixed line endings
             f'{names[1]},"{"x" * 200_000}"',  # a caption over the csv module's 128 KiB default field limit
             f"{names[2]}\x00.png,a NUL in the path",
             f"{names[3]},chest radiograph",
             f'{names[4]},"{"y" * (17 * 1024 * 1024)}"',  # beyond even the raised field limit
             f"{names[5]},MRI of the knee"]
    table = data / "table.csv"
    table.write_bytes("\n".join(lines).encode("utf-8") + b"\nimg0.png,caf\xe9 latin-1 caption\n")
    out = tmp_path / "out"
    shard_set = prepare_shards(TableSourceConfig(path=str(table)), ShardConfig(out=str(out), **SHARDS))
    manifest = shard_set.manifest("train")
    assert manifest.written_count == 3 and manifest.written_count + len(manifest.skipped) == manifest.input_count
    reasons = sorted(item.reason for item in manifest.skipped)
    assert reasons == ["bad_row", "bad_row", "caption_not_utf8", "caption_too_long"]
    bad = [item for item in manifest.skipped if item.reason == "bad_row"]
    assert all("table.csv:" in item.detail for item in bad)


def test_broken_jsonl_lines_are_skipped_rows(tmp_path):
    data = tmp_path / "data"
    names = _images(data, 2)
    (data / "t.jsonl").write_text(json.dumps({"image": names[0], "caption": "head CT"}) + "\n{broken\n[1, 2]\n"
                                  + json.dumps({"image": names[1], "caption": "chest x-ray"}) + "\n")
    shard_set = prepare_shards(TableSourceConfig(path=str(data / "t.jsonl")), ShardConfig(out=str(tmp_path / "o"),
                                                                                            **SHARDS))
    manifest = shard_set.manifest("train")
    assert manifest.written_count == 2 and [item.reason for item in manifest.skipped] == ["bad_row", "bad_row"]
    assert manifest.input_count == 4


# ---------------------------------------------------------------------------------------------
# 6. Inputs outside the source's root


def test_images_outside_the_table_folder_are_skipped_unless_allowed(tmp_path):
    data, outside = tmp_path / "data", tmp_path / "elsewhere"
    inside = _images(data, 1)
    _images(outside, 1)
    (data / "link.png").symlink_to(outside / "img0.png")  # a symlink that leaves the folder
    rows = [{"image": inside[0], "caption": "axial CT of the head"},
            {"image": str(outside / "img0.png"), "caption": "absolute path elsewhere"},
            {"image": "../elsewhere/img0.png", "caption": "relative path climbing out"},
            {"image": "link.png", "caption": "symlink leaving the folder"}]
    table = _table(tmp_path, rows, header=("image", "caption"))
    strict = prepare_shards(TableSourceConfig(path=str(table)), ShardConfig(out=str(tmp_path / "a"), **SHARDS))
    manifest = strict.manifest("train")
    assert manifest.written_count == 1
    assert [item.reason for item in manifest.skipped] == ["outside_root"] * 3
    allowed = prepare_shards(TableSourceConfig(path=str(table), allow_outside_root=True),
                             ShardConfig(out=str(tmp_path / "b"), **SHARDS))
    written = allowed.manifest("train")
    assert written.written_count + sum(item.reason == "duplicate_image" for item in written.skipped) == 4


# ---------------------------------------------------------------------------------------------
# 4. No quiet wrong starts


def _command(module: str, *arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", module, *arguments, f"hydra.run.dir={cwd}/run"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


TINY = ["source.image_size=32", "source.sizes={train:8,dev:4}", "model.image_size=32", "shards.workers=0",
        "shards.progress=false", "data.loader.batch_size=4", "data.loader.workers=0"]


@pytest.mark.parametrize("override", ["data.loader.batch_size=-1", "data.loader.workers=-2", "trainer.epochs=0",
                                      "optim.lr=0", "optim.lr=-1e-3", "shards.max_samples=0",
                                      "eval.batch_size=0", "data.loader.sentence_keep_prob=1.5",
                                      "trainer.accum_freq=0", "shards.jpeg_quality=101"])
def test_numbers_out_of_range_stop_when_the_config_is_composed(tmp_path, override):
    from hydra import compose, initialize_config_dir

    from clip_med.cli.config import CONF_DIR, register_schemas, to_object

    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="train", overrides=[override])
    with pytest.raises(ValueError, match=rf"{override.split('=')[0]}=.* is out of range"):
        to_object(cfg)


def test_quiet_wrong_starts_stop_with_one_line(tmp_path):
    broken = tmp_path / "broken_run" / "checkpoints"
    broken.mkdir(parents=True)
    (broken / "step-00000004.pt").write_bytes(b"not a checkpoint")
    cases = {"resume=" + str(broken.parent): "resume=", "data.loader.batch_size=-1": "out of range"}
    for override, expected in cases.items():
        result = _command("clip_med.train", f"shards.out={tmp_path}/shards", *TINY, override, cwd=tmp_path)
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 2 and last.startswith("error:") and expected in last, result.stderr[-2000:]
        assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before training


def test_an_empty_train_split_is_refused_before_training(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _table(tmp_path, [{"image": "missing.png", "caption": "gone", "split": "train"},
                      {"image": "also-missing.png", "caption": "gone", "split": "dev"}])
    result = _command("clip_med.train", "source=table", f"source.path={data}/table.csv", "source.split_column=split",
                      f"shards.out={tmp_path}/shards", "shards.workers=0", "shards.progress=false", cwd=tmp_path)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "holds no samples" in last and "missing_file" in last, result.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_shards_written_keep_every_member_name_safe(tmp_path):
    names = _images(tmp_path / "data", 2)
    table = _table(tmp_path, [{"image": names[0], "caption": "a", "split": "train"},
                              {"image": names[1], "caption": "b", "split": "dev"}])
    shard_set = prepare_shards(TableSourceConfig(path=str(table), split_column="split"),
                               ShardConfig(out=str(tmp_path / "o"), **SHARDS))
    for split in shard_set.splits:
        for url in shard_set.urls(split):
            with tarfile.open(url) as tar:
                assert all("/" not in member.name and ".." not in member.name.split(".")[0] for member in tar)


def test_a_table_of_dicom_files_writes_no_path_derived_identity(tmp_path):
    import shutil

    from pydicom.data import get_testdata_file

    patient = tmp_path / "data" / "MRN1234567"
    patient.mkdir(parents=True)
    shutil.copy(get_testdata_file("CT_small.dcm"), patient / "DOE_JANE_1.dcm")
    rows = [{"image": "MRN1234567/DOE_JANE_1.dcm", "caption": "axial CT of the chest"},
            {"image": "MRN1234567/DOE_JANE_missing.dcm", "caption": "a file that is not there"}]
    table = _table(tmp_path, rows, header=("image", "caption"))
    out = tmp_path / "out"
    shard_set = prepare_shards(TableSourceConfig(path=str(table)), ShardConfig(out=str(out), **SHARDS))
    manifest = shard_set.manifest("train")
    assert (manifest.written_count, [item.reason for item in manifest.skipped]) == (1, ["missing_file"])
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            blobs = [data]
            if path.suffix == ".tar":
                with tarfile.open(path) as tar:
                    blobs += [member.name.encode() for member in tar]
            for blob in blobs:
                assert b"MRN1234567" not in blob and b"DOE_JANE" not in blob, path
