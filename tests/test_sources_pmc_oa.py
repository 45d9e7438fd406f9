"""The PMC-OA reader: main and beta releases, the split files, paper-level holdout."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip_med.data.record import SkipReason
from clip_med.data.sources import read_source
from clip_med.data.sources.pmc_oa import PmcOaSourceConfig


def _image(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(path)


def _rows(papers: int, subfigures: int) -> list[dict]:
    rows = []
    for paper in range(papers):
        for sub in range(subfigures):
            rows.append({"image": f"PMC{1000 + paper}_Fig{sub}_1.jpg",
                         "caption": f"Axial CT of the chest of patient {paper}, panel {sub}.",
                         "pmcid": f"PMC{1000 + paper}", "url_name": f"fig{sub}.jpg"})
    return rows


def _write(root: Path, name: str, rows: list[dict], image_dir: str = "images") -> None:
    (root / image_dir).mkdir(parents=True, exist_ok=True)
    with open(root / name, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
            _image(root / image_dir / row["image"], len(row["image"]))


def test_main_release_with_paper_level_holdout(tmp_path):
    rows = _rows(papers=40, subfigures=3)
    rows.append({"image": "PMC9999_missing.jpg", "caption": "A figure whose image was not unzipped."})
    rows.append({"image": "PMC9998_nocap.jpg", "caption": ""})
    _write(tmp_path, "pmc_oa.jsonl", rows[:-2])
    with open(tmp_path / "pmc_oa.jsonl", "a") as handle:
        handle.write(json.dumps(rows[-2]) + "\n" + json.dumps(rows[-1]) + "\n")
    _image(tmp_path / "images" / "PMC9998_nocap.jpg", 1)
    splits = read_source(PmcOaSourceConfig(root=str(tmp_path), holdout=0.25))
    assert set(splits) == {"train", "dev"}
    papers = {split: {record.meta["pmcid"] for record in records} for split, records in splits.items()}
    assert not papers["train"] & papers["dev"]  # no paper on both sides
    assert 4 <= len(papers["dev"]) <= 20
    records = {record.id: record for split in splits.values() for record in split}
    assert records["PMC9999_missing"].problem == SkipReason.MISSING_FILE
    assert records["PMC9999_missing"].meta["pmcid"] == "PMC9999"  # from the file name when the row has none
    assert records["PMC9998_nocap"].problem == SkipReason.EMPTY_CAPTION
    assert records["PMC1000_Fig0_1"].labels == {"modality": "ct", "anatomy": "thorax"}
    assert records["PMC1000_Fig0_1"].meta["url_name"] == "fig0.jpg"
    again = read_source(PmcOaSourceConfig(root=str(tmp_path), holdout=0.25))
    assert {k: [r.id for r in v] for k, v in again.items()} == {k: [r.id for r in v] for k, v in splits.items()}


def test_beta_release_and_split_files(tmp_path):
    _write(tmp_path, "pmc_oa_beta.jsonl", _rows(papers=3, subfigures=2))
    beta = read_source(PmcOaSourceConfig(root=str(tmp_path), release="pmc_oa_beta", holdout=0.0))
    assert list(beta) == ["train"] and len(beta["train"]) == 6
    other = tmp_path / "splits"
    for split, papers in (("train", 3), ("valid", 1), ("test", 1)):
        _write(other, f"{split}.jsonl", _rows(papers, 1), image_dir="caption_T060_filtered_top4_sep_v0_subfigures")
    splits = read_source(PmcOaSourceConfig(root=str(other)))
    assert {split: len(records) for split, records in splits.items()} == {"train": 3, "valid": 1, "test": 1}


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="axiong/pmc_oa"):
        read_source(PmcOaSourceConfig(root=str(tmp_path)))
    (tmp_path / "images").mkdir()
    (tmp_path / "pmc_oa.jsonl").write_text('{"image": "a.jpg", "caption": "x"}\n{not json\n')
    # A broken line is a skipped record naming its line; the rest is read.
    records = [record for split in read_source(PmcOaSourceConfig(root=str(tmp_path))).values() for record in split]
    assert len(records) == 2
    bad = [record for record in records if record.problem == "bad_row"]
    assert len(bad) == 1 and "pmc_oa.jsonl:2" in bad[0].problem_detail and "not valid JSON" in bad[0].problem_detail
    with pytest.raises(ValueError, match="release"):
        read_source(PmcOaSourceConfig(root=str(tmp_path), release="gamma"))
