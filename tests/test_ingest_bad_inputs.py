"""The bad-input folder of issue 3: every good sample written, every bad one reported with its reason."""

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip_med.data.shardset import ShardCommandConfig, shard_source
from clip_med.data.sources.generic import TableSourceConfig
from clip_med.data.writer import ShardConfig


def _noise(size=(64, 48), mode="RGB", seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], len(mode))
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def _save(image: Image.Image, path: Path, **kwargs) -> bytes:
    image.save(path, **kwargs)
    return path.read_bytes()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (a decompression bomb's header)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _png_chunk(b"IEND", b""))


GOOD = ["good0.png", "good1.jpg", "good2.png", "good3.jpg", "good4.png", "good5.png",
        "cmyk.jpg", "gray16.png", "palette.png", "rgba.png"]
BAD = {
    "empty.png": "empty_file",
    "cut.png": "truncated_or_corrupt",
    "cut.jpg": "truncated_or_corrupt",
    "text.jpg": "not_an_image",
    "tiny.png": "too_small",
    "bomb.png": "too_many_pixels",
    "missing.png": "missing_file",
    "good0.png#empty": "empty_caption",
    "good1.jpg#utf8": "caption_not_utf8",
    "dup.png": "duplicate_image",
}


def make_bad_folder(root: Path) -> Path:
    """Images and a captions.csv mixing good inputs with every kind of bad one."""
    images = root / "images"
    images.mkdir(parents=True)
    for index, name in enumerate(GOOD[:6]):
        mode = "L" if index % 2 else "RGB"
        _save(_noise(mode=mode, seed=index), images / name, **({"quality": 95} if name.endswith(".jpg") else {}))
    _save(_noise(mode="CMYK", seed=10), images / "cmyk.jpg", quality=95)
    ramp = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 20 % 65536).astype(np.uint16)
    Image.fromarray(ramp).save(images / "gray16.png")
    _noise(seed=11).convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(images / "palette.png")
    _save(_noise(mode="RGBA", seed=12), images / "rgba.png")
    (images / "empty.png").write_bytes(b"")
    png = (images / "good2.png").read_bytes()
    (images / "cut.png").write_bytes(png[: len(png) // 2])
    jpeg = _save(_noise(size=(256, 256), seed=13), root / "whole.jpg", quality=95)
    (images / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (images / "text.jpg").write_text("this is a caption, not a picture\n")
    _save(_noise(size=(1, 1), seed=14), images / "tiny.png")
    (images / "bomb.png").write_bytes(_png_claiming(30000, 30000))
    (images / "dup.png").write_bytes((images / "good4.png").read_bytes())
    rows = [f"images/{name},A plain caption for {name}.".encode() for name in GOOD]
    rows += [f"images/{name},Caption of {name}.".encode() for name in BAD if "#" not in name]
    rows.append(b"images/good0.png,")  # empty caption (the image itself is fine)
    rows.append(b"images/good1.jpg,Caption with bad bytes \xff\xfe here.")
    (root / "captions.csv").write_bytes(b"image,caption\n" + b"\n".join(rows) + b"\n")
    return root / "captions.csv"


def _shard(table: Path, out: Path, workers: int) -> dict:
    source = TableSourceConfig(path=str(table))
    cfg = ShardCommandConfig(source=source, shards=ShardConfig(workers=workers, progress=False, max_samples=4),
                             out=str(out))
    return shard_source(cfg).manifests


def _members(out: Path) -> dict[str, dict]:
    samples: dict[str, dict] = {}
    for shard in sorted(out.glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    return make_bad_folder(tmp_path_factory.mktemp("bad"))


def test_every_good_sample_written_every_bad_one_reported(bad_folder, tmp_path):
    manifest = _shard(bad_folder, tmp_path / "out", workers=0)["train"]
    samples = _members(tmp_path / "out")
    written = sorted(json.loads(sample["json"])["origin"].split("/")[-1] for sample in samples.values())
    assert written == sorted(GOOD)
    reasons = {}
    for item in manifest.skipped:
        name = Path(item.image).name
        suffix = {"empty_caption": "#empty", "caption_not_utf8": "#utf8"}.get(item.reason, "")
        reasons[name + suffix] = item.reason
        assert item.detail, f"{name} skipped without a detail"
    assert reasons == BAD
    assert manifest.input_count == len(GOOD) + len(BAD)
    assert manifest.written_count + len(manifest.skipped) == manifest.input_count
    saved = json.loads((tmp_path / "out" / "train.manifest.json").read_text())
    assert saved["written_count"] == 10 and saved["skipped_count"] == 10
    assert sum(saved["skipped_by_reason"].values()) == 10


def test_convertible_colour_modes_are_normalised(bad_folder, tmp_path):
    _shard(bad_folder, tmp_path / "out", workers=0)
    by_name = {}
    for sample in _members(tmp_path / "out").values():
        meta = json.loads(sample["json"])
        by_name[meta["origin"].split("/")[-1]] = Image.open(io.BytesIO(sample["png"]))
    assert by_name["cmyk.jpg"].mode == "RGB"
    gray16 = np.asarray(by_name["gray16.png"])
    assert by_name["gray16.png"].mode == "L" and gray16.min() == 0 and gray16.max() == 255
    assert by_name["palette.png"].mode in ("RGB", "L")
    rgba = by_name["rgba.png"]
    assert rgba.mode == "RGB" and rgba.size == (64, 48)
    source = Image.open(bad_folder.parent / "images" / "rgba.png")
    alpha = np.asarray(source)[..., 3:4] / 255.0
    expected = np.round(np.asarray(source)[..., :3] * alpha)  # composited onto black
    assert np.abs(np.asarray(rgba).astype(int) - expected).max() <= 1


def test_output_is_identical_with_worker_processes(bad_folder, tmp_path):
    in_process = _shard(bad_folder, tmp_path / "a", workers=0)["train"]
    two_workers = _shard(bad_folder, tmp_path / "b", workers=2)["train"]
    assert in_process.to_dict() == two_workers.to_dict()
    for shard in in_process.shards:
        assert (tmp_path / "a" / shard.name).read_bytes() == (tmp_path / "b" / shard.name).read_bytes()
