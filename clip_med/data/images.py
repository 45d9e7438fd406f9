"""Reading, validating, normalising and encoding one image for a shard.

Everything that can be wrong with an input image is turned into :class:`ImageRejected` with a
reason from :class:`~clip_med.data.record.SkipReason`, so the writer can count it and go on.
Colour modes are normalised to 8-bit ``L`` (grayscale) or ``RGB``:

* palette, ``1`` and ``YCbCr``/``LAB``/``HSV`` images are converted;
* ``CMYK`` (print-workflow JPEGs in journal figures) is converted through its embedded ICC
  profile to sRGB when it has one, else with Pillow's plain formula;
* images with alpha are composited onto black (the background of almost every scan);
* 16-bit and float images are rescaled linearly from their own min..max to 0..255;
* ``RGB`` images whose three channels are identical are stored as ``L``.

The decompression-bomb guard reads the size from the header and refuses anything over
``max_pixels`` *before* pixel data is decoded. Pillow's own guard (``Image.MAX_IMAGE_PIXELS``, a
process-wide setting: a warning above it, an error above twice it) is left as it is, never switched
off around a decode: decodes run in threads (inference, the HTTP service), where a per-call switch
could leave it off for the whole process. Images over Pillow's error limit are refused as
``too_many_pixels`` too; to accept larger ones, raise ``Image.MAX_IMAGE_PIXELS`` once at startup.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np
from PIL import Image, ImageChops, ImageFile, UnidentifiedImageError

from clip_med.data.record import SkipReason

ImageFile.LOAD_TRUNCATED_IMAGES = False

log = logging.getLogger(__name__)


class ImageRejected(Exception):
    """An input image that cannot be used; ``reason`` is a :class:`SkipReason` value."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageLimits:
    min_side: int = 16
    max_pixels: int = 100_000_000
    max_file_bytes: int = 512 * 1024 * 1024


@dataclass(frozen=True)
class EncodeOptions:
    max_side: int | None = None
    image_format: str = "png"  # png | jpeg | webp | keep
    jpeg_quality: int = 95


@dataclass(frozen=True)
class PreparedImage:
    data: bytes
    ext: str
    width: int
    height: int
    mode: str
    pixel_hash: str


def check_file(path: str, limits: ImageLimits) -> int:
    """Reject missing, empty and oversized files before any decoding; returns the size."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise ImageRejected(SkipReason.MISSING_FILE, f"{path} does not exist") from None
    except OSError as exc:
        raise ImageRejected(SkipReason.MISSING_FILE, f"{path}: {exc}") from None
    if size == 0:
        raise ImageRejected(SkipReason.EMPTY_FILE, f"{path} is 0 bytes")
    if size > limits.max_file_bytes:
        raise ImageRejected(SkipReason.FILE_TOO_LARGE,
                            f"{path} is {size} bytes > shards.max_file_bytes={limits.max_file_bytes}")
    return size


def check_dimensions(width: int, height: int, limits: ImageLimits, where: str) -> None:
    if width * height > limits.max_pixels:
        raise ImageRejected(
            SkipReason.TOO_MANY_PIXELS,
            f"{where} is {width}x{height} = {width * height} pixels > shards.max_pixels={limits.max_pixels} "
            "(a decompression-bomb guard; raise it if such images are expected)",
        )
    if min(width, height) < limits.min_side:
        raise ImageRejected(SkipReason.TOO_SMALL, f"{where} is {width}x{height} < shards.min_side={limits.min_side}")


def open_image_bytes(data: bytes, limits: ImageLimits, where: str, max_side: int | None = None) -> Image.Image:
    """Decode encoded image bytes with the size guard applied *before* pixels are decoded."""
    if not data:
        raise ImageRejected(SkipReason.EMPTY_FILE, f"{where} is empty")
    # Image.open reads only the header; check_dimensions below is clip_med's bomb guard (its limit,
    # its message). Pillow's global guard is not touched (see the module docstring): it can only
    # refuse earlier, for images over 2 * Image.MAX_IMAGE_PIXELS (or warn above 1x).
    try:
        image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # the warning: under -W error
        raise ImageRejected(
            SkipReason.TOO_MANY_PIXELS,
            f"{where}: {exc} (Pillow's process-wide limit Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}; "
            f"shards.max_pixels={limits.max_pixels})",
        ) from None
    except UnidentifiedImageError:
        raise ImageRejected(SkipReason.NOT_AN_IMAGE, f"{where} is not a readable image file") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected(SkipReason.TRUNCATED, f"{where}: {exc}") from None
    check_dimensions(image.width, image.height, limits, where)
    if max_side and image.format == "JPEG":
        # JPEG can decode at 1/2, 1/4, 1/8 scale: far cheaper than decoding then shrinking.
        image.draft(image.mode, (max_side, max_side))
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageRejected(SkipReason.TRUNCATED, f"{where}: {exc}") from None
    return image


def read_image_file(path: str, limits: ImageLimits, max_side: int | None = None) -> tuple[Image.Image, bytes]:
    check_file(path, limits)
    with open(path, "rb") as handle:
        data = handle.read()
    return open_image_bytes(data, limits, path, max_side), data


def rescale_to_uint8(array: np.ndarray) -> np.ndarray:
    array = array.astype(np.float64)
    low, high = float(array.min()), float(array.max())
    if high <= low:
        return np.zeros(array.shape, dtype=np.uint8)
    return np.round((array - low) * (255.0 / (high - low))).astype(np.uint8)


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    profile = image.info.get("icc_profile")
    if profile:
        from PIL import ImageCms

        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            # Not in place, so it returns the converted image (None only with inPlace=True).
            return cast(Image.Image, ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"),
                                                               outputMode="RGB"))
        except (ImageCms.PyCMSError, OSError, ValueError) as exc:
            log.warning("CMYK image with an unusable ICC profile (%s): converted without the profile", exc)
    return image.convert("RGB")


def normalize_mode(image: Image.Image) -> Image.Image:
    """Return an 8-bit ``L`` or ``RGB`` image (see the module docstring for the rules)."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(rescale_to_uint8(np.asarray(image)), mode="L")
    if mode == "CMYK":
        image = _cmyk_to_rgb(image)
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode == "PA":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        base = "L" if image.mode in ("LA", "La") else "RGB"
        background = Image.new(base, image.size, 0)
        background.paste(image.convert(base), mask=image.getchannel("A"))
        image = background
    if image.mode == "1":
        image = image.convert("L")
    if image.mode not in ("L", "RGB"):
        try:
            image = image.convert("RGB")
        except (ValueError, OSError) as exc:
            raise ImageRejected(SkipReason.UNSUPPORTED_MODE, f"cannot convert mode {mode}: {exc}") from None
    if image.mode == "RGB":
        red, green, blue = image.split()  # in C: six times faster than comparing numpy arrays
        if ImageChops.difference(red, green).getbbox() is None and ImageChops.difference(red, blue).getbbox() is None:
            image = red
    return image


def pixel_hash(image: Image.Image) -> str:
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def encode(image: Image.Image, options: EncodeOptions, original: bytes | None, original_format: str | None,
           changed: bool) -> tuple[bytes, str]:
    fmt = options.image_format
    if fmt == "keep":
        if original is not None and not changed and original_format in ("PNG", "JPEG"):
            return original, "png" if original_format == "PNG" else "jpg"
        fmt = "png"
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG", compress_level=6)
        return buffer.getvalue(), "png"
    if fmt == "jpeg":
        image.save(buffer, format="JPEG", quality=options.jpeg_quality)
        return buffer.getvalue(), "jpg"
    if fmt == "webp":
        image.save(buffer, format="WEBP", lossless=True)
        return buffer.getvalue(), "webp"
    raise ValueError(f"unknown image_format {fmt!r}: use png, jpeg, webp or keep")


def finish_image(image: Image.Image, options: EncodeOptions, original: bytes | None = None) -> PreparedImage:
    """Normalise, hash, optionally shrink, and encode a decoded image."""
    original_format = image.format
    source_mode, source_size = image.mode, image.size
    image = normalize_mode(image)
    digest = pixel_hash(image)
    if options.max_side and max(image.size) > options.max_side:
        image = image.copy()
        image.thumbnail((options.max_side, options.max_side), Image.Resampling.LANCZOS)
    changed = image.mode != source_mode or image.size != source_size
    data, ext = encode(image, options, original, original_format, changed)
    return PreparedImage(data, ext, image.width, image.height, image.mode, digest)


# A decoder turns a record's ``image`` locator into a PIL image plus the original bytes (when
# keeping them is possible). Decoders are named by import path so that writer processes started
# with "spawn" find them without the parent's registrations.
Decoder = Callable[[str, ImageLimits, "int | None"], "tuple[Image.Image, bytes | None]"]
DECODERS: dict[str, str] = {
    "pil": "clip_med.data.images:read_image_file",
    "synthetic": "clip_med.data.sources.synthetic:render_locator",
    "dicom": "clip_med.data.dicom:read_dicom_file",
    "tar_member": "clip_med.data.sources.clip_benchmark:read_tar_member",  # an image inside a CLIP_benchmark tar
    "npz_array": "clip_med.data.sources.arrays:read_npz_item",  # a row of a .npz member (MedMNIST)
    "h5_array": "clip_med.data.sources.arrays:read_h5_item",  # a row of an HDF5 dataset (PCam)
}


def get_decoder(name: str) -> Decoder:
    try:
        module_name, function_name = DECODERS[name].split(":")
    except KeyError:
        raise ValueError(f"no image decoder named {name!r}; known: {', '.join(DECODERS)}") from None
    return getattr(importlib.import_module(module_name), function_name)


def prepare_image(locator: str, decoder: str, limits: ImageLimits, options: EncodeOptions) -> PreparedImage:
    image, original = get_decoder(decoder)(locator, limits, options.max_side)
    return finish_image(image, options, original)


@dataclass(frozen=True)
class ImageJob:
    """One image to prepare, small enough to send to a worker process."""

    index: int
    image: str
    decoder: str
    limits: ImageLimits
    options: EncodeOptions


def run_image_job(job: ImageJob) -> tuple[int, PreparedImage | None, str, str]:
    """Worker entry point (kept in this torch-free module so workers start fast)."""
    try:
        return job.index, prepare_image(job.image, job.decoder, job.limits, job.options), "", ""
    except ImageRejected as rejected:
        return job.index, None, rejected.reason, rejected.detail
