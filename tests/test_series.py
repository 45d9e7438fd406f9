"""Series- and case-level classification: a DICOM series folder (slices made from pydicom's CT) classified as
one series gives one prediction from the pooled embeddings and the per-slice ones, in Python, on the command
line and through the HTTP API."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from api_helpers import gradient, png_bytes, save_checkpoint
from fastapi.testclient import TestClient
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

import clip_med
from clip_med.cli.config import CONF_DIR
from clip_med.inference.commands import ClassifyConfig, expand_images
from clip_med.inference.series import dicom_series, format_series, pool, run_classify_series, series_inputs
from clip_med.inference.service import ServiceLimits, create_app

# file name -> InstanceNumber: the names do not sort in slice order
SLICES = {"b.dcm": 3, "a.dcm": 4, "d.dcm": 1, "c.dcm": 2}


def write_series(folder: Path, slices: dict[str, int], series_uid: str | None = None) -> Path:
    """Slices of one series from pydicom's CT_small: their own pixels (shifted), InstanceNumber and SliceLocation."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    for name, number in slices.items():
        dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        pixels = dataset.pixel_array
        dataset.PixelData = np.roll(pixels, 17 * number, axis=0).astype(pixels.dtype).tobytes()
        dataset.SeriesInstanceUID = series_uid
        dataset.SOPInstanceUID = generate_uid()
        dataset.InstanceNumber = number
        dataset.SliceLocation = -50.0 + 5 * number
        dataset.save_as(folder / name)
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return clip_med.load(save_checkpoint(tmp_path_factory.mktemp("run")), device="cpu")


@pytest.fixture(scope="module")
def series_folder(tmp_path_factory):
    return write_series(tmp_path_factory.mktemp("series") / "CT_series", SLICES)


def _ordered(folder: Path) -> list[str]:
    return [str(folder / name) for name, _ in sorted(SLICES.items(), key=lambda item: item[1])]


def test_a_dicom_folder_is_grouped_by_series_in_slice_order(series_folder, tmp_path):
    paths = expand_images(str(series_folder))
    assert dicom_series(paths) == [_ordered(series_folder)]
    mixed = write_series(tmp_path / "two", {"x1.dcm": 2, "x2.dcm": 1})
    write_series(mixed, {"y1.dcm": 1}, generate_uid())
    groups = dicom_series(expand_images(str(mixed)))
    assert groups == [[str(mixed / "x2.dcm"), str(mixed / "x1.dcm")], [str(mixed / "y1.dcm")]]
    found = series_inputs(str(mixed), expand_images(str(mixed)), None)
    assert [(item.name, len(item.images)) for item in found] == [(f"{mixed} (series 1 of 2)", 2),
                                                                  (f"{mixed} (series 2 of 2)", 1)]
    (mixed / "notes.png").write_bytes(png_bytes(gradient()))
    assert dicom_series(expand_images(str(mixed))) is None  # not every file is DICOM: no series by itself
    assert series_inputs(str(mixed), expand_images(str(mixed)), None) is None
    assert series_inputs(str(series_folder), expand_images(str(series_folder)), False) is None


def test_a_series_gives_one_prediction_from_its_pooled_embeddings_and_the_per_slice_ones(model, series_folder):
    ordered = _ordered(series_folder)
    result = model.classify_series(ordered, task="anatomy", name="CT_series")
    assert result.images.inputs == ordered and len(result.images) == 4 and result.probs.shape == (6,)
    embeddings = model.embed_images(ordered)
    mean = embeddings.astype(np.float64).mean(axis=0)
    expected = model.classify_embeddings((mean / np.linalg.norm(mean))[None].astype(np.float32), "anatomy")[2][0]
    assert np.allclose(result.probs, expected, atol=1e-6)
    assert np.allclose(pool(embeddings)[0], mean / np.linalg.norm(mean), atol=1e-6)
    assert np.allclose(result.images.probs, model.classify(ordered, task="anatomy").probs, atol=1e-6)
    assert not any(np.allclose(result.probs, row, atol=1e-4) for row in result.images.probs)  # not one slice's
    assert result.prediction == result.labels[int(result.probs.argmax())] and abs(result.probs.sum() - 1) < 1e-5
    record = result.to_dict()
    assert record["images"] == 4 and len(record["per_image"]) == 4 and record["pooling"].startswith("mean")


def test_a_case_of_images_is_one_series_with_series_true_and_unreadable_ones_are_listed(model, tmp_path):
    paths = []
    for seed in range(3):
        (tmp_path / f"img{seed}.png").write_bytes(png_bytes(gradient(seed=seed)))
        paths.append(str(tmp_path / f"img{seed}.png"))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    found = series_inputs(str(tmp_path), expand_images(str(tmp_path)), True)
    assert len(found) == 1 and len(found[0].images) == 4
    result = model.classify_series(found[0].images, labels=["benign", "malignant"], on_error="skip", name="case")
    assert len(result.images) == 3 and [skip.input for skip in result.images.skipped] == [str(tmp_path / "broken.png")]
    assert "SKIPPED" in format_series([result]) and "case, 3 image(s) pooled" in format_series([result])
    with pytest.raises(ValueError, match="no image of empty could be read"):
        model.classify_series([str(tmp_path / "broken.png")], on_error="skip", name="empty")


def test_classify_runs_a_series_folder_from_the_config(model, series_folder):
    cfg = ClassifyConfig(checkpoint=str(model.info.path), images=str(series_folder), task="modality", device="cpu")
    groups = series_inputs(cfg.images, expand_images(cfg.images), cfg.series)
    results = run_classify_series(cfg, groups)
    assert len(results) == 1 and results[0].images.inputs == _ordered(series_folder)
    lines = format_series(results).splitlines()
    assert lines[1].startswith("SERIES") and len(lines) == 2 + 4


def test_the_classify_command_pools_a_dicom_series_folder(model, series_folder, capsys):
    from clip_med.cli.classify import main

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("classify", overrides=[f"checkpoint={model.info.path}", f"images={series_folder}",
                                             "task=anatomy", "format=json", "device=cpu"])
    main(cfg)  # the command's job on its composed config, as `python -m clip_med.classify ...` runs it
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = model.classify_series(_ordered(series_folder), task="anatomy")
    assert record["series"] == str(series_folder) and record["images"] == 4
    assert [row["input"] for row in record["per_image"]] == _ordered(series_folder)
    assert np.allclose([record["probabilities"][label] for label in expected.labels], expected.probs, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# HTTP API


LIMITS = ServiceLimits(max_upload_bytes=400_000, max_series_images=6, max_series_bytes=1_000_000)


@pytest.fixture(scope="module")
def client(model):
    return TestClient(create_app(model, None, None, LIMITS))


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_the_api_classifies_a_series_of_uploads_and_a_zip_of_one(model, client, series_folder):
    ordered = _ordered(series_folder)
    expected = model.classify_series(ordered, task="anatomy")
    files = [("files", (Path(path).name, Path(path).read_bytes(), "application/dicom")) for path in ordered]
    response = client.post("/classify/series", files=files, data={"task": "anatomy"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["images"] == 4 and body["prediction"] == expected.prediction and body["skipped"] == []
    assert np.allclose([body["probabilities"][label] for label in body["labels"]], expected.probs, atol=1e-5)
    assert [row["input"] for row in body["per_image"]] == [Path(path).name for path in ordered]
    assert np.allclose([[row["probabilities"][label] for label in body["labels"]] for row in body["per_image"]],
                       expected.images.probs, atol=1e-5)
    members = {f"CT_series/{Path(path).name}": Path(path).read_bytes() for path in ordered}
    archive = _zip({**members, "CT_series/DICOMDIR": b"x", "CT_series/README.txt": b"a note", "__MACOSX/._a": b"x"})
    zipped = client.post("/classify/series", files={"files": ("series.zip", archive, "application/zip")},
                         data={"task": "anatomy"}).json()
    assert zipped["images"] == 4 and zipped["prediction"] == expected.prediction
    assert np.allclose([zipped["probabilities"][label] for label in zipped["labels"]], expected.probs, atol=1e-5)
    assert [item["input"] for item in zipped["skipped"]] == ["CT_series/README.txt"]


@pytest.mark.parametrize("case", ["too many", "zip too large", "no image", "bad labels", "not a zip"])
def test_bad_series_requests_get_a_4xx_with_a_message(client, case):
    image = png_bytes(gradient())
    if case == "too many":
        files = [("files", (f"{index}.png", image, "image/png")) for index in range(7)]
        expected = 413
    elif case == "zip too large":  # small compressed, large uncompressed
        files = [("files", ("bomb.zip", _zip({f"{index}.png": image + bytes(300_000) for index in range(5)}),
                            "application/zip"))]
        expected = 413
    elif case == "no image":
        files = [("files", ("notes.zip", _zip({"notes.txt": b"hello"}), "application/zip"))]
        expected = 422
    elif case == "bad labels":
        files = [("files", ("a.png", image, "image/png"))]
        expected = 413
    else:
        files = [("files", ("fake.zip", b"PK\x03\x04 not really a zip", "application/zip"))]
        expected = 422
    data = {"labels": ",".join(f"l{index}" for index in range(100))} if case == "bad labels" else {}
    response = client.post("/classify/series", files=files, data=data)
    assert response.status_code == expected, response.text
    assert response.json()["detail"]
