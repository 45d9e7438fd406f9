"""Hostile DICOM: frames that decode bigger than the header says, and text that names the patient.

* The size guard holds what will be *decoded*: a frame's own header (JPEG SOF, JPEG 2000 SIZ), every
  frame of a multi-frame file, the native pixel data's length and a deflated data set's inflated size,
  all before anything is decoded, and peak memory stays far below what decoding would take.
* De-identification by default: a patient's name, id and accession number placed in the descriptions,
  the folder name and a file name appear nowhere in what the shard writer writes (every byte of the
  output folder, tar members and manifests included, and the INFO log), while every good image is
  written and written + skipped = input holds; ``keep_descriptions`` keeps the descriptions, cleaned.
"""

import io
import json
import logging
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    generate_uid,
)

from clip_med.data.dicom import read_dicom_file
from clip_med.data.images import ImageLimits, ImageRejected
from clip_med.data.record import SkipReason
from clip_med.data.shardset import ShardCommandConfig, shard_source
from clip_med.data.sources.dicom import DicomSourceConfig
from clip_med.data.writer import ShardConfig

ROOT = Path(__file__).resolve().parents[1]
# pydicom warns about the deliberately corrupt file (clip_med ignores its warnings outside tests)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
BOMB_SIDE = 8000  # 64 M pixels: 64 MB as uint8, 512 MB once rescaled to float64


def _jpeg(side: int, fmt: str = "JPEG", **options) -> bytes:
    image = Image.linear_gradient("L").resize((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _dataset(rows: int, columns: int, syntax, frames: int = 1) -> Dataset:
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = syntax
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    return ds


def _encapsulated(path: Path, frames: list[bytes], rows: int = 64, columns: int = 64, syntax=JPEGBaseline8Bit) -> str:
    ds = _dataset(rows, columns, syntax, len(frames))
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return str(path)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("hostile")
    small, bomb = _jpeg(64), _jpeg(BOMB_SIDE)
    files = {
        "jpeg_bomb": _encapsulated(folder / "jpeg_bomb.dcm", [bomb]),  # 64x64 claimed, 8000x8000 inside
        "frame2_larger": _encapsulated(folder / "frame2.dcm", [small, _jpeg(2048), small]),
        "frame3_larger": _encapsulated(folder / "frame3.dcm", [small, small, _jpeg(2048)]),
        "frame2_other_size": _encapsulated(folder / "frame2_80.dcm", [small, _jpeg(80), small]),
        "j2k_bigger": _encapsulated(folder / "j2k.dcm", [_jpeg(512, "JPEG2000", no_jp2=True)], syntax=JPEG2000Lossless),
        "jp2_bigger": _encapsulated(folder / "jp2.dcm", [_jpeg(512, "JPEG2000")], syntax=JPEG2000Lossless),
        "good_multiframe": _encapsulated(folder / "good.dcm", [small, small, small]),
    }
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for name, data, rows in (("native_short", ct.PixelData[: len(ct.PixelData) // 2], 128),
                             ("native_long", ct.PixelData, 64)):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.PixelData, ds.Rows, ds.Columns = data, rows, rows
        ds.save_as(folder / f"{name}.dcm")
        files[name] = str(folder / f"{name}.dcm")
    deflated = _dataset(4096, 4096, DeflatedExplicitVRLittleEndian)  # 16 MB of zeros, deflated to a few KB
    deflated.PixelData = bytes(4096 * 4096)
    deflated["PixelData"].VR = "OB"
    deflated.save_as(folder / "deflated.dcm", enforce_file_format=True)
    files["deflate_bomb"] = str(folder / "deflated.dcm")
    return files


@pytest.mark.parametrize("name, reason", [
    ("jpeg_bomb", SkipReason.UNDECODABLE_DICOM),
    ("frame2_larger", SkipReason.UNDECODABLE_DICOM),
    ("frame3_larger", SkipReason.UNDECODABLE_DICOM),
    ("frame2_other_size", SkipReason.UNDECODABLE_DICOM),
    ("j2k_bigger", SkipReason.UNDECODABLE_DICOM),
    ("jp2_bigger", SkipReason.UNDECODABLE_DICOM),
    ("native_short", SkipReason.UNDECODABLE_DICOM),
    ("native_long", SkipReason.UNDECODABLE_DICOM),
])
def test_frames_bigger_than_the_header_are_refused_before_decoding(hostile, name, reason):
    with pytest.raises(ImageRejected) as caught:
        read_dicom_file(hostile[name], ImageLimits(), None)
    assert caught.value.reason == reason and hostile[name] in caught.value.detail


def test_a_frame_over_the_pixel_limit_names_the_limit(hostile):
    with pytest.raises(ImageRejected) as caught:
        read_dicom_file(hostile["jpeg_bomb"], ImageLimits(max_pixels=10_000_000), None)
    assert caught.value.reason == SkipReason.TOO_MANY_PIXELS
    assert f"{BOMB_SIDE}x{BOMB_SIDE}" in caught.value.detail and "max_pixels=10000000" in caught.value.detail


def test_a_deflated_data_set_is_measured_before_it_is_inflated(hostile):
    with pytest.raises(ImageRejected) as caught:
        read_dicom_file(hostile["deflate_bomb"], ImageLimits(max_file_bytes=4 * 1024 * 1024), None)
    assert caught.value.reason == SkipReason.FILE_TOO_LARGE and "max_file_bytes" in caught.value.detail


def test_well_formed_files_still_decode(hostile, tmp_path):
    image, _ = read_dicom_file(hostile["good_multiframe"], ImageLimits(), None)
    assert image.size == (64, 64)
    ok = _encapsulated(tmp_path / "big_ok.dcm", [_jpeg(1024)], 1024, 1024)  # a big frame that says so
    assert read_dicom_file(ok, ImageLimits(), None)[0].size == (1024, 1024)


def test_peak_memory_stays_bounded(hostile):
    """In a fresh process: refusing every hostile file adds little to the peak RSS; decoding the
    bomb (what happened before the guard) adds at least its 64 MB of pixels."""
    script = textwrap.dedent("""
        import json, resource, sys
        from pydicom.pixels import pixel_array
        from clip_med.data.dicom import read_dicom_file
        from clip_med.data.images import ImageLimits, ImageRejected
        files = json.loads(sys.argv[1])
        read_dicom_file(files["good_multiframe"], ImageLimits(), None)  # loads the codecs

        def peak():  # MiB: the peak RSS since the last reset (Linux), else since the start
            try:
                with open("/proc/self/status") as status:
                    return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024
            except (OSError, StopIteration):
                return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        def reset():
            try:
                with open("/proc/self/clear_refs", "w") as refs:
                    refs.write("5")  # resets VmHWM to the current RSS
            except OSError:
                pass

        reset()
        before = peak()
        refused = 0
        for name in files:
            if name != "good_multiframe":
                try:
                    read_dicom_file(files[name], ImageLimits(max_file_bytes=4 * 1024 * 1024), None)
                except ImageRejected:
                    refused += 1
        guarded = peak()
        reset()
        guarded, current = guarded - before, peak()
        try:
            pixel_array(files["jpeg_bomb"])  # the decode the guard prevents (it fails, but only after decoding)
        except ValueError:
            pass
        print(json.dumps({"refused": refused, "guard_mib": guarded, "decode_mib": peak() - current}))
    """)
    result = subprocess.run([sys.executable, "-c", script, json.dumps(hostile)], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    print("peak RSS growth (MiB):", measured)
    assert measured["refused"] == len(hostile) - 1
    assert measured["guard_mib"] < 24, measured
    assert measured["decode_mib"] > 60, measured  # the file really is a bomb


# ---------------------------------------------------------------------------------------------
# De-identification

SECRETS = ("DOE", "JANE", "MRN1234567", "ACC998877")


def _identified(source: str, target: Path, **tags) -> None:
    ds = pydicom.dcmread(get_testdata_file(source))
    ds.PatientName, ds.PatientID, ds.AccessionNumber = "DOE^JANE", "MRN1234567", "ACC998877"
    ds.OtherPatientIDs, ds.InstitutionName, ds.StudyDate = "X-ACC998877", "St Example Hospital", "20190304"
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target)


@pytest.fixture
def export(tmp_path) -> Path:
    root = tmp_path / "export"
    patient = root / "MRN1234567"
    _identified("CT_small.dcm", patient / "ct.dcm", StudyDescription="CT HEAD for DOE^JANE MRN1234567",
                SeriesDescription="Jane Doe axial ACC998877 2019-03-04", ProtocolName="HEAD doe, jane")
    _identified("MR_small.dcm", patient / "DOE_JANE_mr.dcm", StudyDescription="MR SPINE jane DOE (acc998877)",
                SeriesDescription="T1 sagittal 04.03.2019 at St Example Hospital")
    (patient / "broken_ACC998877.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 40)  # corrupt
    return root


def _run(root: Path, out: Path, secret: Path, **options):
    source = DicomSourceConfig(root=str(root), progress=False, id_secret_file=str(secret), **options)
    cfg = ShardCommandConfig(source=source, out=str(out), shards=ShardConfig(workers=0, progress=False))
    return shard_source(cfg).manifests["train"]


def _every_byte(out: Path) -> tuple[bytes, list[bytes]]:
    """All bytes of every file under ``out``, and the text members of its tars (plus manifests)."""
    raw, texts = b"", []
    for path in sorted(out.rglob("*")):
        if path.is_file():
            raw += path.read_bytes()
            if path.suffix == ".tar":
                with tarfile.open(path) as tar:
                    for member in tar.getmembers():
                        texts.append(member.name.encode())
                        if not member.name.endswith(".png"):
                            texts.append(tar.extractfile(member).read())
            else:
                texts.append(path.read_bytes())
    return raw, texts


def _samples(out: Path) -> list[dict]:
    samples = []
    for shard in sorted(out.glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            samples += [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    return samples


def _assert_nothing_leaks(out: Path, log_text: str) -> None:
    raw, texts = _every_byte(out)
    for secret in SECRETS:
        assert secret.encode() not in raw, secret
        assert not any(secret.lower().encode() in text.lower() for text in texts), secret
        assert secret.lower() not in log_text.lower(), secret
    assert b"Example Hospital" not in raw and b"2019" not in b"".join(texts)


def test_no_identifier_leaves_in_a_shard_by_default(export, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out, secret = tmp_path / "out", tmp_path / "keys" / "id_secret"
    manifest = _run(export, out, secret)
    assert manifest.written_count == 2 and len(manifest.skipped) == 1  # the corrupt file
    assert manifest.written_count + len(manifest.skipped) == manifest.input_count == 3
    _assert_nothing_leaks(out, caplog.text)
    samples = _samples(out)
    assert {sample["labels"]["modality"] for sample in samples} == {"ct", "mr"}
    assert all(sample["meta"]["study_description"] == "" and sample["meta"]["sex"] == "" for sample in samples)
    assert all(sample["id"].startswith("dcm-") and sample["origin"] == sample["id"] for sample in samples)
    deid = manifest.deidentification
    assert "StudyDescription (0008,1030)" in deid["dropped"] and deid["hash_paths"] and deid["key_id"]
    assert secret.read_text().strip() not in (out / "train.manifest.json").read_text()
    # the same key gives the same ids: a rerun finds nothing to do
    shards = {path: path.stat().st_mtime_ns for path in out.glob("*.tar")}
    caplog.clear()
    _run(export, out, secret)
    assert "up to date" in caplog.text and {path: path.stat().st_mtime_ns for path in out.glob("*.tar")} == shards


def test_keep_descriptions_keeps_them_cleaned(export, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "out"
    manifest = _run(export, out, tmp_path / "id_secret", keep_descriptions=True)
    assert manifest.written_count == 2
    _assert_nothing_leaks(out, caplog.text)
    by_modality = {sample["labels"]["modality"]: sample for sample in _samples(out)}
    ct, mr = by_modality["ct"], by_modality["mr"]
    assert ct["meta"]["study_description"] == "CT HEAD for [removed] [removed]"
    assert ct["meta"]["series_description"] == "[removed] [removed] axial [removed] [removed]"
    assert ct["meta"]["protocol_name"] == "HEAD [removed], [removed]"
    assert "MR SPINE [removed] [removed] ([removed]). T1 sagittal [removed] at [removed]." in mr["caption"]
    assert "StudyDescription (0008,1030)" in manifest.deidentification["kept"]


def test_unhashed_paths_are_an_explicit_choice(export, tmp_path):
    manifest = _run(export, tmp_path / "out", tmp_path / "id_secret", hash_paths=False)
    assert {sample["id"] for sample in _samples(tmp_path / "out")} == {"MRN1234567/ct", "MRN1234567/DOE_JANE_mr"}
    assert manifest.deidentification["hash_paths"] is False


def test_pseudonyms_are_keyed(export, tmp_path):
    one = _run(export, tmp_path / "one", tmp_path / "key_one")
    two = _run(export, tmp_path / "two", tmp_path / "key_two")
    assert one.deidentification["key_id"] != two.deidentification["key_id"]
    ids_one = sorted(s["meta"]["case_id"] for s in _samples(tmp_path / "one"))
    ids_two = sorted(s["meta"]["case_id"] for s in _samples(tmp_path / "two"))
    assert ids_one != ids_two and not set(ids_one) & set(ids_two)
    assert np.unique(ids_one).size == 1  # one patient, one case id
