"""Turning what a user hands in into the pixels training saw.

Inputs are file paths (PNG, JPEG, anything Pillow reads, and DICOM), encoded bytes, PIL images
and numpy arrays. Every one goes through the shard writer's own steps — the same decoders
(DICOM through the decoder registry, windowed as in the DICOM reader), the same size guards,
:func:`~clip_med.data.images.normalize_mode`, the same ``max_side`` shrink and, for shards
written as JPEG, the same lossy round trip — so that an image classified here gives the
embedding it would have had inside a shard. The model's eval transform is applied afterwards
by the caller.

Problems raise :class:`~clip_med.data.images.ImageRejected` (its ``reason`` is a
:class:`~clip_med.data.record.SkipReason`) with a message naming the input.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Union, cast

import numpy as np
from PIL import Image

from clip_med.data.images import (
    EncodeOptions,
    ImageRejected,
    check_dimensions,
    check_file,
    encode,
    get_decoder,
    normalize_mode,
    open_image_bytes,
    rescale_to_uint8,
)
from clip_med.data.record import SkipReason
from clip_med.modeling.checkpoint import Preprocessing

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

DICOM_SUFFIXES = (".dcm", ".dicom")
# Leading bytes of the formats a client may upload (checked on the content, never on names).
SIGNATURES = {
    "png": (b"\x89PNG\r\n\x1a\n",),
    "jpeg": (b"\xff\xd8\xff",),
    "tiff": (b"II*\x00", b"MM\x00*"),
    "bmp": (b"BM",),
    "gif": (b"GIF87a", b"GIF89a"),
}


def is_dicom(head: bytes) -> bool:
    """DICOM Part 10 files carry ``DICM`` after a 128-byte preamble."""
    return len(head) >= 132 and head[128:132] == b"DICM"


def sniff(head: bytes) -> str | None:
    """The format named by the content's first bytes: png, jpeg, dicom, tiff, bmp, gif, webp or None."""
    if is_dicom(head):
        return "dicom"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    for name, signatures in SIGNATURES.items():
        if any(head.startswith(signature) for signature in signatures):
            return name
    return None


def describe(item: object) -> str:
    """A short name for an input, used in messages and results."""
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return f"<{len(item)} bytes>"
    if isinstance(item, Image.Image):
        return f"<PIL {item.mode} {item.width}x{item.height}>"
    if isinstance(item, np.ndarray):
        return f"<array {item.dtype} {'x'.join(map(str, item.shape))}>"
    return f"<{type(item).__name__}>"


def as_trained(image: Image.Image, prep: Preprocessing) -> Image.Image:
    """The writer's normalise-and-shrink (``finish_image``) and, for JPEG shards, its lossy encoding."""
    image = normalize_mode(image)
    if prep.max_side and max(image.size) > prep.max_side:
        image = image.copy()
        image.thumbnail((prep.max_side, prep.max_side), Image.Resampling.LANCZOS)
    if prep.image_format == "jpeg":
        data, _ = encode(image, EncodeOptions(prep.max_side, "jpeg", prep.jpeg_quality), None, None, True)
        image = Image.open(io.BytesIO(data))
        image.load()
    return image


def _decode_path(path: Path, prep: Preprocessing) -> Image.Image:
    check_file(str(path), prep.limits)
    with open(path, "rb") as handle:
        head = handle.read(132)
    decoder = "dicom" if is_dicom(head) or path.suffix.lower() in DICOM_SUFFIXES else "pil"
    image, _ = get_decoder(decoder)(str(path), prep.limits, prep.max_side)
    return image


def _decode_bytes(data: bytes, prep: Preprocessing, name: str) -> Image.Image:
    if not data:
        raise ImageRejected(SkipReason.EMPTY_FILE, f"{name} is empty")
    if len(data) > prep.limits.max_file_bytes:
        raise ImageRejected(SkipReason.FILE_TOO_LARGE,
                            f"{name} is {len(data)} bytes > {prep.limits.max_file_bytes}")
    if not is_dicom(data[:132]):
        return open_image_bytes(data, prep.limits, name, prep.max_side)
    # The DICOM reader works on files (pydicom reads lazily, with deferred pixel data).
    handle = tempfile.NamedTemporaryFile(suffix=".dcm", delete=False)
    try:
        with handle:
            handle.write(data)
        image, _ = get_decoder("dicom")(handle.name, prep.limits, prep.max_side)
    except ImageRejected as rejected:
        raise ImageRejected(rejected.reason, rejected.detail.replace(handle.name, name)) from None
    finally:
        os.unlink(handle.name)
    return image


def _decode_pil(image: Image.Image, prep: Preprocessing) -> Image.Image:
    check_dimensions(image.width, image.height, prep.limits, describe(image))
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageRejected(SkipReason.TRUNCATED, f"{describe(image)}: {exc}") from None
    return image


def _decode_array(array: np.ndarray, prep: Preprocessing) -> Image.Image:
    """H×W (any numeric dtype; non-uint8 is rescaled min..max like 16-bit images), H×W×1, H×W×3 or H×W×4."""
    name = describe(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageRejected(SkipReason.UNSUPPORTED_MODE,
                            f"{name}: expected an H×W, H×W×1, H×W×3 or H×W×4 array")
    if array.dtype.kind not in "biuf":
        raise ImageRejected(SkipReason.UNSUPPORTED_MODE, f"{name}: arrays must be numeric")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ImageRejected(SkipReason.NOT_AN_IMAGE, f"{name} contains NaN or infinite values")
    check_dimensions(array.shape[1], array.shape[0], prep.limits, name)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.ndim == 2:
        if array.dtype == np.uint8:
            return Image.fromarray(array, mode="L")
        return Image.fromarray(array.astype(np.float32), mode="F")
    if array.dtype != np.uint8:
        array = rescale_to_uint8(array)
    return Image.fromarray(np.ascontiguousarray(array), mode="RGB" if array.shape[-1] == 3 else "RGBA")


def load_image(item: ImageInput, prep: Preprocessing, name: str | None = None) -> Image.Image:
    """One input -> an 8-bit ``L`` or ``RGB`` PIL image, exactly as it would sit in a shard.

    ``name`` names encoded bytes in messages (an upload's file name).
    """
    if isinstance(item, (str, os.PathLike)):
        image = _decode_path(Path(item).expanduser(), prep)
    elif isinstance(item, (bytes, bytearray, memoryview)):
        image = _decode_bytes(bytes(item), prep, name or describe(item))
    elif isinstance(item, Image.Image):
        image = _decode_pil(item, prep)
    elif isinstance(item, np.ndarray):
        image = _decode_array(item, prep)
    else:
        raise TypeError(f"cannot read an image from {describe(item)}: give a file path, bytes, a PIL image or "
                        "a numpy array")
    return as_trained(image, prep)


def as_batch(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """A single input becomes a batch of one; lists, tuples, N×H×W×C and N×H×W arrays are batches."""
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, np.ndarray) and (images.ndim == 4 or (images.ndim == 3
                                                                 and images.shape[-1] not in (1, 3, 4))):
        return list(images)  # N×H×W×C, or N×H×W grayscale
    # Anything else is one input (str and bytes are Sequences to mypy, but single inputs here).
    return [cast(ImageInput, images)]
