"""The ROCO reader: published layout, both image namings, metadata kept, missing images listed."""

import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip_med.data.record import SkipReason
from clip_med.data.shardset import ShardCommandConfig, shard_source
from clip_med.data.sources import read_source
from clip_med.data.sources.roco import RocoSourceConfig
from clip_med.data.writer import ShardConfig

ROCO_REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "roco"
FILES = ("captions.txt", "keywords.txt", "semtypes.txt", "cuis.txt", "dlinks.txt", "licences.txt")


def _jpeg(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path, quality=90)


def _tab_lines(path: Path) -> dict[str, list[str]]:
    rows = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        rows[parts[0].strip()] = [part.strip() for part in parts[1:] if part.strip()]
    return rows


def _shard_keys(out: Path, split: str) -> dict[str, dict]:
    samples = {}
    for shard in sorted(out.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    samples[meta["id"]] = meta
    return samples


@pytest.fixture
def roco_real_mirror(tmp_path):
    """The real validation/radiology text files (linked, read-only) plus images the test makes
    for 30 of the ids: 20 as <ROCO_ID>.jpg, 10 under fetch.py's <PMCID>_<name>."""
    source = ROCO_REAL / "data" / "validation" / "radiology"
    if not (source / "captions.txt").is_file():
        pytest.skip("../shared/data/roco is not present")
    folder = tmp_path / "roco" / "data" / "validation" / "radiology"
    folder.mkdir(parents=True)
    for name in FILES:
        (folder / name).symlink_to(source / name)
    (folder / "images").mkdir()
    ids = list(_tab_lines(source / "captions.txt"))
    chosen = random.Random(0).sample(ids, 30)
    dlinks = _tab_lines(source / "dlinks.txt")
    for index, roco_id in enumerate(chosen):
        if index < 20:
            _jpeg(folder / "images" / f"{roco_id}.jpg", index)
        else:
            archive, image_name = dlinks[roco_id][0], dlinks[roco_id][-1]
            pmcid = [word for word in archive.split() if word.endswith(".tar.gz")][0].split("/")[-1][:-7]
            _jpeg(folder / "images" / f"{pmcid}_{image_name}", index)
    return tmp_path / "roco", chosen, ids


def test_real_roco_text_files_with_a_subset_of_images(roco_real_mirror, tmp_path):
    root, chosen, ids = roco_real_mirror
    cfg = ShardCommandConfig(source=RocoSourceConfig(root=str(root)),
                             shards=ShardConfig(workers=0, progress=False, max_samples=16), out=str(tmp_path / "out"))
    manifest = shard_source(cfg).manifests["validation"]
    samples = _shard_keys(tmp_path / "out", "validation")
    assert set(samples) == set(chosen)  # exactly the pairs whose images exist
    assert manifest.input_count == len(ids) and manifest.written_count == len(chosen)
    missing = {item.id for item in manifest.skipped if item.reason == SkipReason.MISSING_FILE}
    assert missing == set(ids) - set(chosen) and len(manifest.skipped) == len(missing)
    assert all("fetch.py" in item.detail for item in manifest.skipped)
    source = ROCO_REAL / "data" / "validation" / "radiology"
    captions, keywords = _tab_lines(source / "captions.txt"), _tab_lines(source / "keywords.txt")
    cuis, semtypes = _tab_lines(source / "cuis.txt"), _tab_lines(source / "semtypes.txt")
    for roco_id in chosen:
        meta = samples[roco_id]
        assert meta["caption"] == " ".join(captions[roco_id][0].split())
        assert meta["meta"]["keywords"] == keywords[roco_id] and meta["meta"]["cuis"] == cuis[roco_id]
        assert meta["meta"]["semtypes"][0] == " ".join(semtypes[roco_id][:2])
        assert meta["meta"]["pmcid"].startswith("PMC") and meta["meta"]["licence"].startswith("CC")
        assert meta["meta"]["archive"].endswith(f"{meta['meta']['pmcid']}.tar.gz") and meta["meta"]["image_name"]
        assert set(meta["labels"]) == {"modality", "anatomy"} and set(meta["label_origin"].values()) <= {"caption",
                                                                                                         "none"}


def _write_roco(root: Path) -> Path:
    """A tiny ROCO tree: validation radiology + non-radiology, with problem captions."""
    for kind, ids in (("radiology", ["ROCO_00001", "ROCO_00002", "ROCO_00003", "ROCO_00004"]),
                      ("non-radiology", ["ROCO_90001"])):
        folder = root / "data" / "validation" / kind
        (folder / "images").mkdir(parents=True)
        captions = {"ROCO_00001": b" Axial CT of the brain.", "ROCO_00002": b" Chest radiograph \xff broken.",
                    "ROCO_00003": b" ", "ROCO_00004": b" Knee MRI.", "ROCO_90001": b" Photograph of a rash."}
        (folder / "captions.txt").write_bytes(b"\n".join(f"{i}\t".encode() + captions[i] for i in ids) + b"\n")
        (folder / "keywords.txt").write_text("".join(f"{i}\t\tword\tother\n" for i in ids))
        (folder / "semtypes.txt").write_text("".join(f"{i}\t\tT060\tDiagnostic Procedure\n" for i in ids))
        (folder / "cuis.txt").write_text("".join(f"{i}\t\tC0040405\n" for i in ids))
        (folder / "dlinks.txt").write_text("".join(
            f"{i}\twget -r ftp://x/oa_package/aa/bb/PMC{n}.tar.gz -P /path/to/Dir\tfig{n}.jpg\n"
            for n, i in enumerate(ids)))
        (folder / "licences.txt").write_text("ROCO_ID,PMC_ID,CC\n" + "".join(
            f"{i},PMC{n}_fig{n}.jpg,CC BY\n" for n, i in enumerate(ids)))
        for n, roco_id in enumerate(ids):
            name = f"PMC{n}_fig{n}.jpg" if roco_id == "ROCO_00004" else f"{roco_id}.jpg"
            _jpeg(folder / "images" / name, n)
    return root


def test_reader_problems_kinds_and_labels(tmp_path):
    root = _write_roco(tmp_path / "roco-dataset")
    records = read_source(RocoSourceConfig(root=str(root), kinds=["radiology", "non-radiology"]))["validation"]
    by_id = {record.id: record for record in records}
    assert by_id["ROCO_00001"].labels == {"modality": "ct", "anatomy": "head"}
    assert by_id["ROCO_00002"].problem == SkipReason.CAPTION_NOT_UTF8
    assert by_id["ROCO_00003"].problem == SkipReason.EMPTY_CAPTION
    assert by_id["ROCO_00004"].image.endswith("PMC3_fig3.jpg") and by_id["ROCO_00004"].problem is None
    assert by_id["ROCO_90001"].meta["kind"] == "non-radiology" and by_id["ROCO_90001"].labels["modality"] == "unknown"
    assert by_id["ROCO_00001"].meta["semtypes"] == ["T060 Diagnostic Procedure"]
    # root may also be the data/ folder itself
    assert len(read_source(RocoSourceConfig(root=str(root / "data")))["validation"]) == 4


def test_missing_root_says_where_to_get_roco(tmp_path):
    with pytest.raises(FileNotFoundError, match="razorx89/roco-dataset"):
        read_source(RocoSourceConfig(root=str(tmp_path / "nowhere")))
    with pytest.raises(FileNotFoundError, match="ROCO_ROOT"):
        read_source(RocoSourceConfig(root=None))
