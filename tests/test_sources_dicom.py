"""DICOM: pydicom's bundled CT, MR, US and NM files shard into valid images with the right labels."""

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import pixel_array

from clip_med.data.dicom import apply_window, dicom_tags, read_dicom_file
from clip_med.data.dicom_deid import load_id_key
from clip_med.data.images import ImageLimits, ImageRejected
from clip_med.data.record import SkipReason
from clip_med.data.shardset import ShardCommandConfig, shard_source
from clip_med.data.sources.dicom import DicomSourceConfig, public_id
from clip_med.data.writer import ShardConfig

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
DECODABLE = {  # file -> modality label
    "CT_small.dcm": "ct", "693_J2KI.dcm": "ct", "J2K_pixelrep_mismatch.dcm": "ct",
    "MR_small.dcm": "mr", "MR_small_RLE.dcm": "mr", "MR_small_jpeg_ls_lossless.dcm": "mr",
    "MR_small_jp2klossless.dcm": "mr", "examples_overlay.dcm": "mr",
    "examples_rgb_color.dcm": "ultrasound", "examples_palette.dcm": "ultrasound",
    "examples_ybr_color.dcm": "ultrasound", "examples_jpeg2k.dcm": "ultrasound", "ExplVR_BigEnd.dcm": "ultrasound",
    "JPGExtended.dcm": "nuclear_medicine", "JPEG2000.dcm": "nuclear_medicine",
    "dicomdirtests/77654033/CR1/6154": "xray",
}
REJECTED = {
    "MR_truncated.dcm": SkipReason.UNDECODABLE_DICOM,  # pixel data cut short
    "JPEG-lossy.dcm": SkipReason.UNDECODABLE_DICOM,  # no installed plugin can decode this 12-bit stream
    # its frame's SIZ marker is garbage (a width of 3.7e9): refused from the frame header, before decoding
    "JPEG2000-embedded-sequence-delimiter.dcm": SkipReason.TOO_MANY_PIXELS,
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000000": SkipReason.NO_PIXEL_DATA,  # CT, no pixels
    "rtplan.dcm": SkipReason.NOT_AN_IMAGE,  # RTPLAN: a non-image modality
    "reportsi.dcm": SkipReason.NOT_AN_IMAGE,  # SR: a non-image modality
    "liver_1frame.dcm": SkipReason.NOT_AN_IMAGE,  # SEG
    "no_meta.dcm": SkipReason.NOT_AN_IMAGE,  # no DICOM preamble
}


@pytest.fixture(autouse=True)
def _id_secret(tmp_path, monkeypatch):
    """Ids are keyed hashes: a key per test, never the user's own (~/.config/clip_med/id_secret)."""
    monkeypatch.setenv("CLIP_MED_ID_SECRET_FILE", str(tmp_path / "id_secret"))


def _copy(names, folder: Path) -> None:
    for name in names:
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(TEST_FILES / name, target)


def _written(out: Path) -> dict[str, tuple[dict, Image.Image]]:
    samples: dict[str, dict] = {}
    for shard in sorted(out.glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return {json.loads(s["json"])["id"]: (json.loads(s["json"]), Image.open(io.BytesIO(s["png"]))) for s in
            samples.values()}


def test_bundled_files_shard_with_modality_labels(tmp_path):
    root = tmp_path / "export"
    _copy([*DECODABLE, *REJECTED], root)
    (root / "README.txt").write_text("not picked up: wrong extension")
    cfg = ShardCommandConfig(source=DicomSourceConfig(root=str(root), progress=False), out=str(tmp_path / "out"),
                             shards=ShardConfig(workers=0, progress=False, dedup=False))
    manifest = shard_source(cfg).manifests["train"]
    # ids, keys and origins are keyed hashes of the paths (clip_med.data.dicom_deid): map them back
    names = {public_id(str(Path(name).with_suffix("")), load_id_key()): name for name in [*DECODABLE, *REJECTED]}
    written = {str(Path(names[key]).with_suffix("")): value for key, value in _written(tmp_path / "out").items()}
    assert set(written) == {str(Path(name).with_suffix("")) for name in DECODABLE}
    for name, modality in DECODABLE.items():
        meta, image = written[str(Path(name).with_suffix(""))]
        header = pydicom.dcmread(TEST_FILES / name, stop_before_pixels=True)
        assert meta["labels"]["modality"] == modality, name
        assert image.size == (int(header.Columns), int(header.Rows)), name
        assert image.mode in ("L", "RGB") and np.asarray(image).std() > 0, name
    assert {names[item.image]: item.reason for item in manifest.skipped} == REJECTED
    assert str(root) not in json.dumps(manifest.to_dict())
    assert "Unable to decode" in next(i.detail for i in manifest.skipped if names[i.image] == "JPEG-lossy.dcm")
    assert manifest.written_count + len(manifest.skipped) == manifest.input_count == len(DECODABLE) + len(REJECTED)
    assert written["dicomdirtests/77654033/CR1/6154"][0]["labels"]["anatomy"] == "spine_msk"  # BodyPart CSPINE
    assert written["J2K_pixelrep_mismatch"][0]["labels"]["anatomy"] == "head"
    assert written["J2K_pixelrep_mismatch"][0]["caption"].startswith("CT image of the head.")
    assert written["dicomdirtests/77654033/CR1/6154"][0]["caption"].startswith("X-ray image of the spine")
    assert written["MR_small"][0]["caption"] == "MRI image."


def test_text_and_tags_never_hold_patient_identifiers(tmp_path):
    _copy(["CT_small.dcm"], tmp_path)
    info = dicom_tags(tmp_path / "CT_small.dcm")
    header = pydicom.dcmread(tmp_path / "CT_small.dcm", stop_before_pixels=True)
    assert info.modality == "CT" and info.patient_key and info.patient_key != header.PatientID
    assert str(header.PatientName) not in json.dumps(info.text_fields())


def _modified(tmp_path: Path, name: str, **tags) -> str:
    ds = pydicom.dcmread(TEST_FILES / name)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    path = tmp_path / f"modified_{Path(name).name}"
    ds.save_as(path)
    return str(path)


def test_rescale_then_window_follow_the_standard(tmp_path):
    path = _modified(tmp_path, "CT_small.dcm", WindowCenter=40, WindowWidth=400)
    image, _ = read_dicom_file(path, ImageLimits(), None)
    ds = pydicom.dcmread(path)
    hounsfield = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.round(np.clip((hounsfield - 39.5) / 399 + 0.5, 0, 1) * 255)
    assert np.array_equal(np.asarray(image), expected.astype(np.uint8))
    assert apply_window(np.array([-1000.0, 39.5, 1000.0]), 40, 400).tolist() == [0.0, 0.5, 1.0]


def test_monochrome1_is_inverted(tmp_path):
    name = "dicomdirtests/77654033/CR1/6154"
    as_stored, _ = read_dicom_file(str(TEST_FILES / name), ImageLimits(), None)
    flipped_path = _modified(tmp_path, name, PhotometricInterpretation="MONOCHROME2")
    flipped, _ = read_dicom_file(flipped_path, ImageLimits(), None)
    assert np.array_equal(np.asarray(as_stored).astype(int), 255 - np.asarray(flipped).astype(int))


def test_multi_frame_gives_the_middle_frame():
    image, _ = read_dicom_file(str(TEST_FILES / "examples_ybr_color.dcm"), ImageLimits(), None)
    middle = pixel_array(str(TEST_FILES / "examples_ybr_color.dcm"), index=15)
    assert np.array_equal(np.asarray(image), middle)


def test_size_guard_runs_before_decoding(tmp_path):
    path = _modified(tmp_path, "CT_small.dcm", Rows=30000, Columns=30000)
    with pytest.raises(ImageRejected) as caught:
        read_dicom_file(path, ImageLimits(), None)
    assert caught.value.reason == SkipReason.TOO_MANY_PIXELS and "30000x30000" in caught.value.detail


# clip_med keeps its own rescale for what pydicom's apply_modality_lut does not read (an enhanced
# file's functional groups) and feeds pydicom's apply_windowing a 0..1 output range: both must
# agree with pydicom on files pydicom handles itself.


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_functional_group_rescale_matches_pydicom(name):
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_modality_lut
    from pydicom.sequence import Sequence

    from clip_med.data.dicom import _modality_lut

    ds = pydicom.dcmread(get_testdata_file(name))
    ds.RescaleSlope, ds.RescaleIntercept = ds.get("RescaleSlope") or 1.5, ds.get("RescaleIntercept") or -7.0
    stored = ds.pixel_array
    expected = apply_modality_lut(stored, ds)
    assert np.array_equal(_modality_lut(stored, ds), expected)  # pydicom's own path
    item = Dataset()
    item.RescaleSlope, item.RescaleIntercept = ds.RescaleSlope, ds.RescaleIntercept
    del ds.RescaleSlope, ds.RescaleIntercept
    shared = Dataset()
    shared.PixelValueTransformationSequence = Sequence([item])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    assert np.array_equal(apply_modality_lut(stored, ds), stored)  # pydicom does not look there ...
    assert np.array_equal(_modality_lut(stored, ds), expected)  # ... clip_med does, with the same numbers


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_window_matches_pydicom_on_the_file_itself(tmp_path, name, function):
    from pydicom.pixels import apply_modality_lut, apply_windowing

    ds = pydicom.dcmread(get_testdata_file(name))
    values = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    center, width = float(np.median(values)), float(values.max() - values.min()) / 3
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = center, width, function
    ours = apply_window(values, center, width, function)
    # pydicom's output spans the file's value range (Bits Stored, signedness, rescale): map it to 0..1.
    signed = int(ds.PixelRepresentation) == 1
    low, high = (-(2 ** (ds.BitsStored - 1)), 2 ** (ds.BitsStored - 1) - 1) if signed else (0, 2 ** ds.BitsStored - 1)
    if "RescaleSlope" in ds:
        low, high = low * ds.RescaleSlope + ds.RescaleIntercept, high * ds.RescaleSlope + ds.RescaleIntercept
    theirs = (apply_windowing(values, ds) - low) / (high - low)
    assert 0.0 <= ours.min() and ours.max() <= 1.0 and ours.std() > 0
    assert np.allclose(ours, theirs, rtol=0, atol=1e-9)
    ds.save_as(tmp_path / name)
    image, _ = read_dicom_file(str(tmp_path / name), ImageLimits(), None)
    assert np.array_equal(np.asarray(image), np.round(ours * 255).astype(np.uint8))
