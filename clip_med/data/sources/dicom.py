"""A folder of DICOM files (a PACS export, a TCIA download) as image–text pairs.

Every file under ``root`` ending in ``.dcm``/``.dicom`` (and, with ``extensionless: true``, every
file without an extension, as PACS exports name them) is one record. Its header is read here;
its pixels are decoded by the writer with :func:`clip_med.data.dicom.read_dicom_file` (windowing,
MONOCHROME1 inversion, the middle frame of multi-frame files, ...).

* **Labels**: Modality and BodyPartExamined mapped through the taxonomy aliases (``CT`` -> ct,
  ``CR``/``DX`` -> xray, ``PT`` -> pet, ``NM`` -> nuclear_medicine, ``CSPINE`` -> spine_msk, ...);
  what they leave unknown is read from the study/series/protocol descriptions by the caption rules.
* **Text**: ``text_template`` filled with the mapped tags, by default
  ``"{description}. {study_description}. {series_description}."`` where ``description`` reads
  "CT image of the head" (or "CT image", "image of the head" when a label is unknown).
  Fields: description, modality, anatomy, modality_code, body_part, study_description,
  series_description, protocol_name, view_position, laterality, sex, age.
* **De-identification** (:mod:`clip_med.data.dicom_deid`, after DICOM PS3.15's Basic Application
  Level Confidentiality Profile): no patient name or id is written; the study/series/protocol
  descriptions and the patient's sex and age are left out of ``txt`` and ``json`` unless
  ``source.keep_descriptions=true`` (kept *cleaned*: the file's own names, ids, accession
  numbers, dates, institution, ... replaced by ``[removed]``) or
  ``source.keep_patient_characteristics=true``; the group key (``case_id``, which keeps a patient
  on one side of ``holdout`` and of the linear probe's folds) is a keyed hash (HMAC-SHA256) of the
  PatientID; record ids, sample keys and ``origin`` (and the manifest's skipped items) are keyed
  hashes of the file's path under the root, since folders are often named after patients
  (``source.hash_paths=false`` keeps the paths, for data already de-identified). The key is
  ``source.id_secret_file`` (default ``~/.config/clip_med/id_secret``, made on first use) and never
  leaves that file. The manifest's ``deidentification`` says what was kept, dropped and hashed.
* Files that are not DICOM, have no pixel data, or hold a non-image object (SEG, RTDOSE, SR, ...;
  ``skip_modalities``) are listed in the manifest with the reason; nothing stops the run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from clip_med.data import dicom_deid
from clip_med.data.dicom import NON_IMAGE_MODALITIES, dicom_tags, read_header
from clip_med.data.images import ImageRejected
from clip_med.data.record import Record, SkipReason
from clip_med.data.sources import register_source
from clip_med.data.sources.common import (
    HoldoutSourceConfig,
    PairInput,
    build_records,
    check_root,
    list_files,
    records_by_split_folder,
    relative_id,
)
from clip_med.data.text import render_text

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "{description}. {study_description}. {series_description}."


@dataclass
class DicomSourceConfig(HoldoutSourceConfig):
    name: str = "dicom"
    root: Optional[str] = None
    extensions: list[str] = field(default_factory=lambda: [".dcm", ".dicom"])
    extensionless: bool = True
    skip_modalities: list[str] = field(default_factory=lambda: list(NON_IMAGE_MODALITIES))
    progress: bool = True
    # De-identification (clip_med.data.dicom_deid): keep the study/series/protocol descriptions, cleaned
    # (PS3.15's Clean Descriptors Option); keep sex and age (its Retain Patient Characteristics Option).
    keep_descriptions: bool = False
    keep_patient_characteristics: bool = False
    # Ids, keys and origins are keyed hashes of the file's path (false: the paths, for de-identified data).
    hash_paths: bool = True
    # The HMAC key's file (None: $CLIP_MED_ID_SECRET_FILE or ~/.config/clip_med/id_secret, made on first use).
    id_secret_file: Optional[str] = None


def public_id(relative: str, key: bytes) -> str:
    """The record id (and sample key) of the file at ``relative`` (its path under the split folder)."""
    return "dcm-" + dicom_deid.keyed_hash(key, "path", relative, 24)


def _dicom_pair(path: Path, folder: Path, split: str, cfg: DicomSourceConfig,
                key: bytes) -> tuple[PairInput, dict]:
    relative = relative_id(path, folder)
    record_id = public_id(relative, key) if cfg.hash_paths else relative
    pair = PairInput(id=record_id, split=split, image=str(path), caption=None, meta={}, decoder="dicom")
    try:
        info = dicom_tags(read_header(path), key)
    except ImageRejected as rejected:
        pair.problem, pair.problem_detail = rejected.reason, rejected.detail
        return pair, {}
    labels, origin = info.labels()
    pair.labels, pair.label_origin = labels, origin
    pair.meta = {"case_id": info.patient_key or info.study_key or record_id, "study": info.study_key,
                 "modality_code": info.modality, "body_part": info.body_part,
                 "transfer_syntax": info.transfer_syntax, "frames": info.frames}
    if info.modality in cfg.skip_modalities:
        pair.problem = SkipReason.NOT_AN_IMAGE
        pair.problem_detail = f"{path}: modality {info.modality} is not an image (source.skip_modalities)"
    return pair, info.text_fields(cfg.keep_descriptions, cfg.keep_patient_characteristics)


def _dicom_records(folder: Path, split: str, cfg: DicomSourceConfig, template: str) -> list[Record]:
    key = dicom_deid.load_id_key(cfg.id_secret_file)
    files = list_files(folder, cfg.extensions, recursive=True, extensionless=cfg.extensionless)
    pairs = []
    for path in tqdm(files, desc=f"read DICOM headers ({split})", unit="file", disable=not cfg.progress,
                     dynamic_ncols=True):
        pair, fields = _dicom_pair(path, folder, split, cfg, key)
        if fields:  # the text built from the tags is the caption: it is what the shard's json records
            pair.meta = {**fields, **pair.meta}
            pair.caption = render_text(template, {**fields, **pair.meta})
        pairs.append(pair)
    records = build_records(pairs, "{caption}", label_texts=[""] * len(pairs))
    summary = dicom_deid.summary(cfg.keep_descriptions, cfg.keep_patient_characteristics, cfg.hash_paths, key)
    for record in records:
        record.deidentification = summary
        if cfg.hash_paths:  # the path stays the locator; what is written names the record by its hash
            record.origin = record.id
    return records


@register_source("dicom", DicomSourceConfig)
def read_dicom_folder(cfg: DicomSourceConfig) -> dict[str, list[Record]]:
    root = check_root(cfg.root, "DICOM", "Point source.root at a folder of .dcm files (searched recursively).")
    template = cfg.text_template or DEFAULT_TEMPLATE
    return records_by_split_folder(
        root, lambda folder, split: _dicom_records(folder, split, cfg, template), cfg,
        f"no DICOM files ({', '.join(cfg.extensions)} or without an extension) under {root}")
