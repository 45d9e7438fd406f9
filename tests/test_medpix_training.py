"""MedPix end to end on a fixture in the published layout, with corrupt images among good ones."""

import json

from helpers import make_medpix, tiny_train_config

from clip_med.data.sources.medpix import MedPixSourceConfig
from clip_med.training.trainer import train


def test_corrupt_medpix_images_are_reported_and_the_rest_trains(tmp_path):
    root = make_medpix(tmp_path / "MedPix-2-0", {"train": 12, "dev": 4}, images_per_case=3)
    images = sorted((root / "images").glob("MPXT*"))  # train-split images
    good = images[1].read_bytes()
    images[1].write_bytes(good[: len(good) // 3])  # truncated
    images[4].write_bytes(b"")  # zero bytes
    images[7].write_text("<html>not an image</html>")  # not an image
    images[10].unlink()  # missing
    cfg = tiny_train_config(tmp_path)
    cfg.source = MedPixSourceConfig(root=str(root))
    cfg.shards.max_samples = 8
    cfg.data.loader.batch_size = 8
    report = train(cfg)
    manifest = json.loads((tmp_path / "shards" / "train.manifest.json").read_text())
    reasons = {item["id"]: item["reason"] for item in manifest["skipped"]}
    assert reasons == {
        images[1].stem: "truncated_or_corrupt",
        images[4].stem: "empty_file",
        images[7].stem: "not_an_image",
        images[10].stem: "missing_file",
    }
    assert manifest["written_count"] == 36 - 4 and manifest["input_count"] == 36
    assert manifest["label_counts"]["modality"].keys() <= {"ct", "mr"}
    assert report["step"] > 0 and report["split"] == "dev"
    assert set(report["zero_shot"]) == {"modality", "anatomy"}
