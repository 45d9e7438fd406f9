"""What a source reader produces: one :class:`Record` per image–text pair."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass
class Record:
    """One image–caption pair, before its image is read.

    ``image`` is whatever the record's ``decoder`` understands (a file path for ``"pil"`` and
    ``"dicom"``, a generator spec for ``"synthetic"``). ``problem`` is set by a reader that
    already knows the pair is unusable (an empty or undecodable caption); the writer then skips
    the record and reports it with that reason instead of reading the image.
    """

    id: str
    split: str
    image: str
    caption: str
    text: str
    labels: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    decoder: str = "pil"
    problem: str | None = None
    problem_detail: str = ""
    # Where each label came from: "metadata" (a source field or DICOM tag), "description" (DICOM
    # study/series descriptions through the caption rules), "caption" (the rules of
    # clip_med.labels.caption_rules), "folder" (a class-folder name), "config" (source.labels) or "none".
    label_origin: dict[str, str] = field(default_factory=dict)
    # The image's name in what is written (the json's "origin", the manifest's skipped items and their
    # details) when it must not be the locator itself, e.g. a keyed hash for a DICOM file whose path
    # names a patient; "" means ``image``.
    origin: str = ""
    # How the source de-identified the record (one dict per source), recorded in the split's manifest.
    deidentification: dict[str, Any] = field(default_factory=dict)
    # The file the image is read from when ``image`` is a locator inside it (a row of a .npz or HDF5
    # array): its size and time enter the shard writer's fingerprint, so a replaced file is resharded.
    input_file: str = ""

    @property
    def key(self) -> str:
        """The webdataset sample key: no dots (webdataset splits extensions at the first dot)."""
        return _KEY_UNSAFE.sub("_", self.id)

    def fingerprint_fields(self) -> tuple:
        return (self.id, self.split, self.image, self.caption, self.text, self.decoder, self.problem,
                sorted(self.labels.items()), repr(sorted(self.meta.items())),
                # only when set, so that fingerprints of sources that never set it are unchanged
                *((sorted(self.label_origin.items()),) if self.label_origin else ()),
                *((self.origin,) if self.origin else ()),
                *((repr(sorted(self.deidentification.items())),) if self.deidentification else ()))


class SkipReason:
    """Reasons a record is not written; each one appears in the manifest with its count."""

    MISSING_FILE = "missing_file"
    EMPTY_FILE = "empty_file"
    FILE_TOO_LARGE = "file_too_large"
    NOT_AN_IMAGE = "not_an_image"
    TRUNCATED = "truncated_or_corrupt"
    TOO_SMALL = "too_small"
    TOO_MANY_PIXELS = "too_many_pixels"
    UNSUPPORTED_MODE = "unsupported_mode"
    UNDECODABLE_DICOM = "undecodable_dicom"
    NO_PIXEL_DATA = "no_pixel_data"
    EMPTY_CAPTION = "empty_caption"
    CAPTION_NOT_UTF8 = "caption_not_utf8"
    DUPLICATE_IMAGE = "duplicate_image"
    DUPLICATE_ID = "duplicate_id"
    BAD_SPLIT_NAME = "bad_split_name"
    OUTSIDE_ROOT = "outside_root"
    BAD_ROW = "bad_row"
    CAPTION_TOO_LONG = "caption_too_long"
