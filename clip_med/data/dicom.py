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

The size guard runs on the Rows/Columns tags *before* any pixel data is decoded.

pydicom's chatter (a warning per malformed tag, a logged traceback per failed decoding plugin) is
kept out of the logs without switching process-wide state per call (reads run in threads): its
UserWarnings are ignored by one warnings filter and its loggers get one filter that drops records
while *this* thread (context) is decoding, both installed once, when pydicom is first used.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

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
    """The tags clip_med maps into labels and text (all strings, empty when absent)."""

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
    # Pseudonymous grouping keys: SHA-256 prefixes, never the identifiers themselves.
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

    def text_fields(self) -> dict[str, Any]:
        """Fields for a text template; ``description`` is "CT image of the head" or what is known of it."""
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
            "study_description": self.study_description,
            "series_description": self.series_description,
            "protocol_name": self.protocol_name,
            "view_position": self.view_position,
            "laterality": {"L": "left", "R": "right", "B": "bilateral"}.get(self.laterality, self.laterality),
            "sex": {"F": "female", "M": "male"}.get(self.patient_sex, ""),
            "age": self.patient_age,
        }


def _text(ds, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if not isinstance(value, str | bytes) and hasattr(value, "__iter__"):
        value = "\\".join(str(part) for part in value)
    return " ".join(str(value).split())


def _pseudonym(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()[:16] if value else ""


def read_header(path: str | Path):
    """The dataset without its pixel data. Raises :class:`ImageRejected` for non-DICOM files."""
    pydicom = _pydicom()
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except pydicom.errors.InvalidDicomError:
        raise ImageRejected(SkipReason.NOT_AN_IMAGE, f"{path} is not a DICOM file (no DICM preamble)") from None
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ImageRejected(SkipReason.UNDECODABLE_DICOM, f"{path}: cannot read the header ({exc})") from None


def dicom_tags(source: Any) -> DicomInfo:
    """The mapped tags of a DICOM file (a path) or an already-read pydicom dataset."""
    ds = read_header(source) if isinstance(source, str | Path) else source
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    return DicomInfo(
        modality=_text(ds, "Modality").upper(),
        body_part=_text(ds, "BodyPartExamined").upper(),
        study_description=_text(ds, "StudyDescription"),
        series_description=_text(ds, "SeriesDescription"),
        protocol_name=_text(ds, "ProtocolName"),
        view_position=_text(ds, "ViewPosition"),
        laterality=_text(ds, "ImageLaterality") or _text(ds, "Laterality"),
        patient_sex=_text(ds, "PatientSex").upper(),
        patient_age=_text(ds, "PatientAge"),
        photometric=_text(ds, "PhotometricInterpretation").upper(),
        transfer_syntax=syntax.name if syntax is not None else "",
        frames=_int(ds.get("NumberOfFrames"), 1),
        rows=_int(ds.get("Rows"), 0),
        columns=_int(ds.get("Columns"), 0),
        patient_key=_pseudonym(_text(ds, "PatientID")),
        study_key=_pseudonym(_text(ds, "StudyInstanceUID")),
    )


def _int(value: Any, default: int) -> int:
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


# ---------------------------------------------------------------------------------------------
# Pixels


def _read_dataset(path: str):
    pydicom = _pydicom()
    try:
        # Deferred: the pixel data is read when one frame is decoded, not here.
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
        syntax = dicom_tags(ds).transfer_syntax or "unknown transfer syntax"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ImageRejected(SkipReason.UNDECODABLE_DICOM, f"{path} ({syntax}): {reason}") from None


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
    if not any(tag in ds for tag in PIXEL_DATA_TAGS):
        info = dicom_tags(ds)
        raise ImageRejected(SkipReason.NO_PIXEL_DATA,
                            f"{path} has no pixel data (modality {info.modality or '?'}): not an image")
    info = dicom_tags(ds)
    check_dimensions(info.columns, info.rows, limits, path)
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
    ds = _read_dataset(path)
    return dataset_to_image(ds, path, limits), None
