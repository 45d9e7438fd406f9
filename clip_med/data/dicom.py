"""DICOM files: pixel data to an 8-bit image, and the tags that become labels and text.

:func:`read_dicom_file` is the ``"dicom"`` image decoder (see :data:`clip_med.data.images.DECODERS`)
and is also what the model-use tools call for a DICOM input. The display pipeline follows the
standard's order (PS3.3 C.11):

1. **Decode** with pydicom: uncompressed, RLE and deflated transfer syntaxes natively; JPEG,
   JPEG-LS and JPEG 2000 through the pylibjpeg plugins (``pylibjpeg``, ``pylibjpeg-libjpeg``,
   ``pylibjpeg-openjpeg``, installed with clip_med). A file no plugin can decode is rejected as
   ``undecodable_dicom`` with pydicom's reason, which names the transfer syntax and the plugin
   to install.
2. **Multi-frame files** (cine loops, ultrasound clips, enhanced CT/MR) give one image: the
   *middle* frame, decoded on its own (the first frames of a clip are often a blank run-in or a
   localiser, and decoding one frame keeps memory bounded).
3. **Modality LUT**: Rescale Slope/Intercept (from the top level or the shared functional
   groups of an enhanced file) or a Modality LUT Sequence, so CT values are Hounsfield units
   (pydicom's ``apply_modality_lut``; the functional groups, which it does not read, here).
4. **VOI LUT**: the first Window Center/Width pair with its VOI LUT Function (LINEAR,
   LINEAR_EXACT or SIGMOID; pydicom's ``apply_windowing``), or a VOI LUT Sequence (pydicom's
   ``apply_voi_lut``); without either, the 0.5th..99.5th
   percentile range of the image is stretched to 0..255 (robust to a few hot pixels).
5. **MONOCHROME1** images (white = low values, common for CR/DX) are inverted so bone is white.
6. Colour: pydicom converts YCbCr to RGB; PALETTE COLOR is expanded through its lookup table;
   more than 8 bits per sample are scaled by the stored bit depth.

**Size guard, before anything is decoded** (:func:`check_pixel_data`). A codec decodes a frame at
the size its own header gives, whatever Rows/Columns claim, so the guard reads what will be decoded:

* Rows x Columns against ``shards.max_pixels``/``min_side`` (:class:`~clip_med.data.images.ImageLimits`,
  the one place limits come from);
* **encapsulated** Pixel Data: every frame's own header, found with pydicom's ``generate_frames`` and,
  for the frame that is decoded, ``get_frame`` (the calls pydicom's decoder makes, with the same
  Basic/Extended Offset Table): JPEG (baseline, extended, lossless) and JPEG-LS from the first
  frame header (SOFn, SOF55, or DHP for hierarchical JPEG), JPEG 2000 / HTJ2K from the SIZ marker
  (inside the ``jp2c`` box of a JP2 file), RLE from its segment count (its frame size is Rows x
  Columns by construction). A frame whose size differs from Rows/Columns, or whose component count
  differs from Samples per Pixel, is refused (``undecodable_dicom``, or ``too_many_pixels`` when it
  is over the limit), and so is a file whose decoded frames together exceed ``max_pixels``. A
  compressed transfer syntax whose frame header clip_med cannot read is refused rather than decoded
  unchecked;
* **native** Pixel Data: its length must be Rows x Columns x Samples x Bits Allocated / 8 x frames
  (one padding byte allowed);
* a **deflated** data set (Deflated Explicit VR Little Endian, which pydicom inflates whole in
  memory) is inflated once in bounded chunks first and refused when it would exceed
  ``shards.max_file_bytes``.

pydicom's chatter (a warning per malformed tag, a logged traceback per failed decoding plugin) is
kept out of the logs without switching process-wide state per call (reads run in threads): its
UserWarnings are ignored by one warnings filter and its loggers get one filter that drops records
while *this* thread (context) is decoding, both installed once, when pydicom is first used.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from struct import error as struct_error
from typing import Any

import numpy as np
from PIL import Image

from clip_med.data.dicom_deid import identifying_values, keyed_hash, load_id_key, scrub
from clip_med.data.images import ImageLimits, ImageRejected, check_dimensions, check_file
from clip_med.data.record import SkipReason
from clip_med.labels import taxonomy
from clip_med.labels.caption_rules import anatomy_from_text, modality_from_text

log = logging.getLogger(__name__)

PIXEL_DATA_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# DICOM objects that are not images of a patient: segmentations, dose grids, reports, plans.
NON_IMAGE_MODALITIES = ("SEG", "RTDOSE", "RTSTRUCT", "RTPLAN", "RTRECORD", "RTIMAGE", "SR", "PR", "KO", "REG",
                        "ECG", "DOC", "PLAN", "FID", "AU", "HD")


def _pydicom():
    import pydicom  # imported lazily: only DICOM sources pay for it

    if not _quiet_installed.is_set():
        _install_quiet_filters()
    return pydicom


# Inside _quiet_pydicom (per thread / asyncio task, unlike a logger's level or warnings.catch_warnings).
_QUIET = contextvars.ContextVar("clip_med_quiet_pydicom", default=False)
_quiet_lock, _quiet_installed = threading.Lock(), threading.Event()


class _QuietFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _QUIET.get()


_QUIET_FILTER = _QuietFilter()


def _install_quiet_filters() -> None:
    """Once per process: ignore pydicom's UserWarnings (each also goes to its logger), and add the filter
    to pydicom's loggers (a logger's filters see only records logged on it, so each one gets it)."""
    import pydicom.pixels  # noqa: F401  (creates the decoders' loggers)

    with _quiet_lock:
        if _quiet_installed.is_set():
            return
        warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
        for name in list(logging.root.manager.loggerDict):
            if name == "pydicom" or name.startswith("pydicom."):
                logger = logging.getLogger(name)
                if _QUIET_FILTER not in logger.filters:
                    logger.addFilter(_QUIET_FILTER)
        _quiet_installed.set()


# ---------------------------------------------------------------------------------------------
# Tags


@dataclass(frozen=True)
class DicomInfo:
    """The tags clip_med maps into labels and text (all strings, empty when absent).

    The descriptions are already cleaned (:func:`clip_med.data.dicom_deid.scrub`: the file's own
    identifying values replaced); :meth:`text_fields` still leaves them, and sex and age, out
    unless asked (see :mod:`clip_med.data.dicom_deid`).
    """

    modality: str = ""
    body_part: str = ""
    study_description: str = ""
    series_description: str = ""
    protocol_name: str = ""
    view_position: str = ""
    laterality: str = ""
    patient_sex: str = ""
    patient_age: str = ""
    photometric: str = ""
    transfer_syntax: str = ""
    frames: int = 1
    rows: int = 0
    columns: int = 0
    # Pseudonymous grouping keys: keyed hashes (HMAC-SHA256), never the identifiers themselves.
    patient_key: str = ""
    study_key: str = ""

    def labels(self) -> tuple[dict[str, str], dict[str, str]]:
        """``(labels, origin)``: Modality and BodyPartExamined through the taxonomy aliases, then
        the study/series/protocol descriptions through the caption rules for what is still unknown."""
        labels = {"modality": taxonomy.normalize("modality", self.modality),
                  "anatomy": taxonomy.normalize("anatomy", self.body_part.replace("_", " "))}
        origin = {task: "metadata" if label != taxonomy.UNKNOWN else "none" for task, label in labels.items()}
        description = ". ".join(part for part in (self.study_description, self.series_description,
                                                  self.protocol_name) if part)
        for task, rule in (("modality", modality_from_text), ("anatomy", anatomy_from_text)):
            if labels[task] == taxonomy.UNKNOWN and description:
                labels[task] = rule(description).label
                origin[task] = "description" if labels[task] != taxonomy.UNKNOWN else "none"
        return labels, origin

    def text_fields(self, keep_descriptions: bool = False, keep_patient_characteristics: bool = False
                    ) -> dict[str, Any]:
        """Fields for a text template; ``description`` is "CT image of the head" or what is known of it.
        The study/series/protocol descriptions, sex and age are empty unless kept (PS3.15's Clean
        Descriptors and Retain Patient Characteristics options)."""
        labels, _ = self.labels()
        modality = taxonomy.display_name("modality", labels["modality"])
        anatomy = taxonomy.display_name("anatomy", labels["anatomy"])
        description = " ".join(part for part in (modality, "image" if modality or anatomy else "",
                                                 f"of the {anatomy}" if anatomy else "") if part)
        return {
            "description": description,
            "modality": modality or self.modality,
            "anatomy": anatomy or self.body_part.lower(),
            "modality_code": self.modality,
            "body_part": self.body_part.lower(),
            "study_description": self.study_description if keep_descriptions else "",
            "series_description": self.series_description if keep_descriptions else "",
            "protocol_name": self.protocol_name if keep_descriptions else "",
            "view_position": self.view_position,
            "laterality": {"L": "left", "R": "right", "B": "bilateral"}.get(self.laterality, self.laterality),
            "sex": {"F": "female", "M": "male"}.get(self.patient_sex, "") if keep_patient_characteristics else "",
            "age": self.patient_age if keep_patient_characteristics else "",
        }


def _text(ds, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if not isinstance(value, str | bytes) and hasattr(value, "__iter__"):
        value = "\\".join(str(part) for part in value)
    return " ".join(str(value).split())


def _pseudonym(key: bytes | None, kind: str, value: str) -> str:
    return keyed_hash(key, kind, value) if value and key is not None else ""


def read_header(path: str | Path, limits: ImageLimits | None = None):
    """The dataset without its pixel data. Raises :class:`ImageRejected` for non-DICOM files."""
    pydicom = _pydicom()
    _check_deflated(str(path), limits or ImageLimits())
    try:
        with _quiet_pydicom():  # its warnings name the file, whose path may name the patient
            return pydicom.dcmread(str(path), stop_before_pixels=True)
    except pydicom.errors.InvalidDicomError:
        raise ImageRejected(SkipReason.NOT_AN_IMAGE, f"{path} is not a DICOM file (no DICM preamble)") from None
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ImageRejected(SkipReason.UNDECODABLE_DICOM, f"{path}: cannot read the header ({exc})") from None


def dicom_tags(source: Any, key: bytes | None = None) -> DicomInfo:
    """The mapped tags of a DICOM file (a path) or an already-read pydicom dataset; the pseudonyms
    are keyed with ``key`` (default: :func:`clip_med.data.dicom_deid.load_id_key`)."""
    ds = read_header(source) if isinstance(source, str | Path) else source
    return _tags(ds, key if key is not None else load_id_key(), clean=True)


def _tags(ds, key: bytes | None, clean: bool = False) -> DicomInfo:
    """The tags; no pseudonyms without ``key``, descriptions cleaned only with ``clean`` (the pixel path
    needs neither)."""
    words, strings = identifying_values(ds) if clean else ([], [])

    def description(keyword: str) -> str:
        return scrub(_text(ds, keyword), words, strings) if clean else ""

    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    return DicomInfo(
        modality=_text(ds, "Modality").upper(),
        body_part=_text(ds, "BodyPartExamined").upper(),
        study_description=description("StudyDescription"),
        series_description=description("SeriesDescription"),
        protocol_name=description("ProtocolName"),
        view_position=_text(ds, "ViewPosition"),
        laterality=_text(ds, "ImageLaterality") or _text(ds, "Laterality"),
        patient_sex=_text(ds, "PatientSex").upper(),
        patient_age=_text(ds, "PatientAge"),
        photometric=_text(ds, "PhotometricInterpretation").upper(),
        transfer_syntax=syntax.name if syntax is not None else "",
        frames=_int(ds.get("NumberOfFrames"), 1),
        rows=_int(ds.get("Rows"), 0),
        columns=_int(ds.get("Columns"), 0),
        patient_key=_pseudonym(key, "patient", _text(ds, "PatientID")),
        study_key=_pseudonym(key, "study", _text(ds, "StudyInstanceUID")),
    )


def _int(value: Any, default: int) -> int:
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


# ---------------------------------------------------------------------------------------------
# Pixels


DEFLATED_SYNTAX = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian: the whole data set is zipped


def _check_deflated(path: str, limits: ImageLimits) -> None:
    """pydicom inflates a deflated data set whole, in memory: measure it first, in bounded chunks."""
    pydicom = _pydicom()
    try:
        with open(path, "rb") as handle:
            if handle.read(132)[128:] != b"DICM":
                return
            # read as dcmread reads it (with or without a group length), leaving the file at the data set
            meta = pydicom.filereader._read_file_meta_info(handle)
            if str(meta.get("TransferSyntaxUID", "")) != DEFLATED_SYNTAX:
                return
            inflater, size = zlib.decompressobj(-zlib.MAX_WBITS), 0
            while chunk := handle.read(1 << 20):
                while chunk:
                    size += len(inflater.decompress(chunk, 1 << 22))
                    chunk = inflater.unconsumed_tail
                    if size > limits.max_file_bytes:
                        raise ImageRejected(SkipReason.FILE_TOO_LARGE,
                                            f"{path}: its deflated data set inflates to more than "
                                            f"shards.max_file_bytes={limits.max_file_bytes} bytes")
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, zlib.error,
            pydicom.errors.InvalidDicomError):
        return  # not readable as DICOM: dcmread reports it with its own reason


def _read_dataset(path: str, limits: ImageLimits):
    pydicom = _pydicom()
    _check_deflated(path, limits)
    try:
        # Deferred: the pixel data is read when one frame is decoded, not here.
        with _quiet_pydicom():
            return pydicom.dcmread(path, defer_size="64 KB")
    except pydicom.errors.InvalidDicomError:
        raise ImageRejected(SkipReason.NOT_AN_IMAGE, f"{path} is not a DICOM file (no DICM preamble)") from None
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ImageRejected(SkipReason.UNDECODABLE_DICOM, f"{path}: cannot read the file ({exc})") from None


@contextlib.contextmanager
def _quiet_pydicom():
    """pydicom logs each failed decoding plugin with a traceback; the reason is reported here instead.
    Only this thread's (context's) records are dropped: no logger level or warnings filter is switched."""
    token = _QUIET.set(True)
    try:
        yield
    finally:
        _QUIET.reset(token)


def _decode_frame(ds, path: str, frames: int) -> np.ndarray:
    from pydicom.pixels import pixel_array

    index = frames // 2 if frames > 1 else None
    try:
        with _quiet_pydicom():
            return pixel_array(ds, index=index)
    except (RuntimeError, NotImplementedError, ValueError, TypeError, KeyError, AttributeError, EOFError,
            OSError, IndexError) as exc:
        syntax = _tags(ds, None).transfer_syntax or "unknown transfer syntax"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ImageRejected(SkipReason.UNDECODABLE_DICOM, f"{path} ({syntax}): {reason}") from None


# JPEG frame headers (ITU T.81 B.2.2; T.87 for JPEG-LS): SOF0..SOF15 except DHT (C4), JPG (C8) and
# DAC (CC), plus DHP (DE, hierarchical: the whole image's size) and SOF55 (F7, JPEG-LS).
_JPEG_FRAME_MARKERS = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xDE, 0xF7})
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


def _jpeg_frame_size(data: bytes) -> tuple[int, int, int] | None:
    """(columns, rows, components) from a JPEG / JPEG-LS stream's first frame header, or None."""
    if data[:2] != b"\xff\xd8":
        return None
    index = 2
    while index + 4 <= len(data):
        if data[index] != 0xFF:
            return None
        marker = data[index + 1]
        if marker == 0xFF:  # fill byte
            index += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            index += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or scan data before any frame header
            return None
        length = int.from_bytes(data[index + 2:index + 4], "big")
        if marker in _JPEG_FRAME_MARKERS:
            header = data[index + 4:index + 10]  # precision, rows, columns, components
            if len(header) < 6:
                return None
            return int.from_bytes(header[3:5], "big"), int.from_bytes(header[1:3], "big"), header[5]
        if length < 2:
            return None
        index += 2 + length
    return None


def _j2k_codestream(data: bytes) -> bytes | None:
    """The codestream of a raw J2K stream, or of the ``jp2c`` box of a JP2 file."""
    if data[:2] == b"\xff\x4f":
        return data
    if not data.startswith(_JP2_SIGNATURE):
        return None
    index = 0
    while index + 8 <= len(data):
        length, kind, header = int.from_bytes(data[index:index + 4], "big"), data[index + 4:index + 8], 8
        if length == 1:  # the length is in the next 8 bytes
            length, header = int.from_bytes(data[index + 8:index + 16], "big"), 16
        elif length == 0:  # the last box runs to the end
            length = len(data) - index
        if kind == b"jp2c":
            return data[index + header:index + length]
        if length < header:
            return None
        index += length
    return None


def _j2k_frame_size(data: bytes) -> tuple[int, int, int] | None:
    """(columns, rows, components) from a JPEG 2000 / HTJ2K codestream's SIZ marker (T.800 A.5.1)."""
    stream = _j2k_codestream(data)
    if stream is None or stream[2:4] != b"\xff\x51" or len(stream) < 42:
        return None
    x, y, x_offset, y_offset = (int.from_bytes(stream[start:start + 4], "big") for start in (8, 12, 16, 20))
    return x - x_offset, y - y_offset, int.from_bytes(stream[40:42], "big")


def _rle_frame_size(data: bytes, columns: int, rows: int) -> tuple[int, int, int] | None:
    """RLE frames decode to Rows x Columns by construction; the header gives the segment count."""
    if len(data) < 64:
        return None
    return columns, rows, int.from_bytes(data[:4], "little")


def _frame_size(syntax: Any, data: bytes, columns: int, rows: int) -> tuple[int, int, int] | None:
    from pydicom import uid

    if syntax in uid.JPEG2000TransferSyntaxes:
        return _j2k_frame_size(data)
    if syntax in uid.JPEGTransferSyntaxes or syntax in uid.JPEGLSTransferSyntaxes:
        return _jpeg_frame_size(data)
    if syntax == uid.RLELossless:
        return _rle_frame_size(data, columns, rows)
    return None


def check_pixel_data(ds, path: str, limits: ImageLimits, decoded: list[int]) -> None:
    """Refuse pixel data that would decode to more than its header says, before decoding anything.

    ``decoded`` are the frame indices that will be decoded (their total is held to ``max_pixels``).
    See the module docstring for what is checked per transfer syntax.
    """
    from pydicom import uid
    from pydicom.encaps import generate_frames, get_frame

    info = _tags(ds, None)
    rows, columns, frames = info.rows, info.columns, max(info.frames, 1)
    samples = _int(ds.get("SamplesPerPixel"), 1)
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if "PixelData" in ds and syntax is not None and syntax.is_encapsulated:
        where = f"{path} ({info.transfer_syntax})"
        expected_components = samples * ((_int(ds.get("BitsAllocated"), 8) + 7) // 8) \
            if syntax == uid.RLELossless else samples
        offsets = None
        if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
            offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
        data = ds.PixelData

        def check(frame: bytes, number: int) -> int:
            size = _frame_size(syntax, frame, columns, rows)
            if size is None:
                raise ImageRejected(SkipReason.UNDECODABLE_DICOM,
                                    f"{where}: cannot read the header of frame {number} to check its size "
                                    "before decoding; not decoded")
            width, height, components = size
            if width * height > limits.max_pixels:
                raise ImageRejected(SkipReason.TOO_MANY_PIXELS,
                                    f"{where}: frame {number} decodes to {width}x{height} = {width * height} pixels "
                                    f"> shards.max_pixels={limits.max_pixels} (Rows x Columns say {columns}x{rows}; "
                                    "a decompression-bomb guard)")
            if (width, height) != (columns, rows) or components != expected_components:
                raise ImageRejected(SkipReason.UNDECODABLE_DICOM,
                                    f"{where}: frame {number} is {width}x{height} with {components} component(s), "
                                    f"but Rows x Columns x Samples per Pixel say {columns}x{rows}x"
                                    f"{expected_components}; not decoded")
            return width * height

        try:
            with _quiet_pydicom():
                count = 0
                for number, frame in enumerate(generate_frames(data, number_of_frames=frames,
                                                               extended_offsets=offsets), 1):
                    check(frame, number)
                    count = number
                total = sum(check(get_frame(data, index, number_of_frames=frames, extended_offsets=offsets),
                                  index + 1) for index in decoded)
        except ImageRejected:
            raise
        except (ValueError, TypeError, KeyError, IndexError, EOFError, OSError, struct_error) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ImageRejected(SkipReason.UNDECODABLE_DICOM,
                                f"{where}: cannot split the pixel data into frames ({reason})") from None
        if count < frames:
            raise ImageRejected(SkipReason.UNDECODABLE_DICOM,
                                f"{where}: Number of Frames says {frames} but the pixel data holds {count}")
        if total > limits.max_pixels:
            raise ImageRejected(SkipReason.TOO_MANY_PIXELS,
                                f"{where}: the {len(decoded)} frame(s) decoded hold {total} pixels "
                                f"> shards.max_pixels={limits.max_pixels}")
        return
    for keyword, bits_default in (("PixelData", 8), ("FloatPixelData", 32), ("DoubleFloatPixelData", 64)):
        if keyword in ds:
            element = ds.get_item(keyword)
            length = getattr(element, "length", None)
            if length is None or length == 0xFFFFFFFF:
                length = len(ds[keyword].value or b"")
            bits = _int(ds.get("BitsAllocated"), bits_default)
            expected = (rows * columns * samples * frames * bits + 7) // 8
            if length not in (expected, expected + 1):
                raise ImageRejected(SkipReason.UNDECODABLE_DICOM,
                                    f"{path}: its pixel data is {length} bytes, but Rows x Columns x Samples per Pixel "
                                    f"x Bits Allocated x frames = {rows}x{columns}x{samples}x{bits}x{frames} bits "
                                    f"= {expected} bytes; not decoded")
            return


def _functional_group_item(ds, sequence: str, item: str):
    groups = ds.get("SharedFunctionalGroupsSequence")
    if groups and sequence in groups[0] and groups[0][sequence].value:
        return groups[0][sequence][0].get(item)
    return None


def _modality_lut(array: np.ndarray, ds) -> np.ndarray:
    """Stored values -> modality units (CT: Hounsfield units), as float64."""
    from pydicom.pixels import apply_modality_lut

    top_slope, top_intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if "ModalityLUTSequence" in ds or (top_slope is not None and top_intercept is not None and float(top_slope) != 0):
        return apply_modality_lut(array, ds).astype(np.float64)
    # pydicom's apply_modality_lut only reads a top-level Rescale Slope *and* Rescale Intercept. Done
    # here instead: an enhanced CT/MR file's values, in its shared functional groups (Pixel Value
    # Transformation Sequence); a slope or an intercept given alone; and a zero slope, which would
    # blank the image and is ignored instead.
    slope = ds.get("RescaleSlope", _functional_group_item(ds, "PixelValueTransformationSequence", "RescaleSlope"))
    intercept = ds.get("RescaleIntercept",
                       _functional_group_item(ds, "PixelValueTransformationSequence", "RescaleIntercept"))
    values = array.astype(np.float64)
    if slope is not None and float(slope) != 0:
        values = values * float(slope)
    if intercept is not None:
        values = values + float(intercept)
    return values


def _first(value: Any) -> float | None:
    if value is None:
        return None
    if not isinstance(value, str | bytes) and hasattr(value, "__getitem__"):
        value = value[0] if len(value) else None
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _window(ds) -> tuple[float, float, str] | None:
    center = _first(ds.get("WindowCenter", _functional_group_item(ds, "FrameVOILUTSequence", "WindowCenter")))
    width = _first(ds.get("WindowWidth", _functional_group_item(ds, "FrameVOILUTSequence", "WindowWidth")))
    if center is None or width is None or width < 1:
        return None
    return center, width, _text(ds, "VOILUTFunction").upper() or "LINEAR"


VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


def apply_window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """The DICOM VOI functions (PS3.3 C.11.2.1.2), output in 0..1: pydicom's ``apply_windowing``.

    pydicom scales its output to the range of the stored values (Bits Stored, Pixel Representation,
    rescale); it is given a 1-bit unsigned range, which is 0..1. The window comes from
    :func:`_window` rather than from the file's own tags because it may sit in an enhanced file's
    functional groups, which pydicom does not read. An unknown VOI LUT Function is LINEAR (pydicom
    would refuse it).
    """
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_windowing

    voi = Dataset()
    voi.PhotometricInterpretation = "MONOCHROME2"
    voi.BitsStored, voi.PixelRepresentation = 1, 0
    voi.WindowCenter, voi.WindowWidth = float(center), float(width)
    voi.VOILUTFunction = function if function in VOI_FUNCTIONS else "LINEAR"
    return apply_windowing(np.asarray(values, dtype=np.float64), voi)


def _stretch(values: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> np.ndarray:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape)
    low, high = np.percentile(finite, [low_pct, high_pct])
    if high <= low:
        low, high = float(finite.min()), float(finite.max())
    if high <= low:
        return np.zeros(values.shape)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    return np.round(np.nan_to_num(unit) * 255.0).astype(np.uint8)


def _grayscale(array: np.ndarray, ds, photometric: str) -> Image.Image:
    values = _modality_lut(array, ds)
    window = _window(ds)
    if "VOILUTSequence" in ds:
        from pydicom.pixels import apply_voi_lut

        unit = _stretch(apply_voi_lut(values, ds, prefer_lut=True).astype(np.float64), 0.0, 100.0)
    elif window is not None:
        unit = apply_window(values, *window)
    else:
        unit = _stretch(values)
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit
    return Image.fromarray(_to_uint8(unit), mode="L")


def _colour(array: np.ndarray, ds, photometric: str) -> Image.Image:
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        array = apply_color_lut(array, ds)
        bits = 16 if array.dtype.itemsize > 1 else 8
    else:
        bits = _int(ds.get("BitsStored"), 8)
    rgb = array[..., :3].astype(np.float64) / float(2 ** bits - 1)
    return Image.fromarray(_to_uint8(np.clip(rgb, 0.0, 1.0)), mode="RGB")


def dataset_to_image(ds, path: str, limits: ImageLimits) -> Image.Image:
    """One 8-bit ``L`` or ``RGB`` image from a dataset (the module docstring gives the steps)."""
    info = _tags(ds, None)
    if not any(tag in ds for tag in PIXEL_DATA_TAGS):
        raise ImageRejected(SkipReason.NO_PIXEL_DATA,
                            f"{path} has no pixel data (modality {info.modality or '?'}): not an image")
    check_dimensions(info.columns, info.rows, limits, path)
    check_pixel_data(ds, path, limits, [info.frames // 2] if info.frames > 1 else [0])
    array = _decode_frame(ds, path, info.frames)
    photometric = info.photometric or "MONOCHROME2"
    if array.ndim == 3 and array.shape[-1] in (3, 4) or photometric == "PALETTE COLOR":
        return _colour(array, ds, photometric)
    if array.ndim != 2:
        raise ImageRejected(SkipReason.UNDECODABLE_DICOM, f"{path}: unexpected pixel array shape {array.shape}")
    return _grayscale(array, ds, photometric)


def read_dicom_file(path: str, limits: ImageLimits, max_side: int | None = None) -> tuple[Image.Image, None]:
    """The ``"dicom"`` decoder: a DICOM file -> (8-bit PIL image, None). ``max_side`` is applied
    later by the writer (DICOM codecs cannot decode at a reduced scale)."""
    check_file(path, limits)
    ds = _read_dataset(path, limits)
    return dataset_to_image(ds, path, limits), None
