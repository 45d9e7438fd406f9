"""Med-MAT as a CLIP benchmark: read its multiple-choice questions, answer them by scoring the options.

Med-MAT (FreedomIntelligence, "On the Compositional Generalization of Multimodal LLMs for Medical
Imaging") turns 106 medical classification sets into single-choice questions with up to four
options, and groups them into 53 subsets by **M**\\ odality, **A**\\ natomical area and **T**\\ ask.
Its README lays the files out as::

    <root>/
      med-mat/<dataset folder>/...                     the images (downloaded per data set)
      Aggregated_Subsets/Subset--01-train.json ...     questions of the 53 MAT subsets
      Original_Medical_Datasets/Ori--01-train.json ... questions of the original data sets

and a record reads::

    {"id": 1, "caption": "Cyst",
     "image": "med-mat/CT_Kindney_Dataset/.../Cyst/Cyst- (561).jpg",
     "Question": "Review this kidney CT scan and determine the possible condition it represents.",
     "Answer": "Cyst",
     "Question-choice": "Review this kidney CT scan ...\\nA: Stone\\nB: Cyst\\nC: Normal\\nD: Tumor\\n"
                        "Answer with the option's letter from the given choices directly.",
     "Answer-choice": "B", "data-no": "2"}

A question is answered as a CLIP model answers zero-shot classification: each option is embedded
as a text (``template``, default ``"{option}"``; ``"{question} {option}"`` puts the question's
wording in front), the image is embedded, and the option with the highest cosine similarity
(normalised image embedding · normalised text embedding) is the answer. Ties go to the earliest
option and are counted. Option texts are embedded once and cached across questions (Med-MAT
draws the distractors from the labels of the same subset, so a subset has a handful of distinct
option texts, and six question wordings).

The default template is the option alone: the question is the same for every option of a question,
so prepending it adds one shared component to every option text, which shrinks the differences
between the options that the image has to pick from; the questions are instructions ("Review
this kidney CT scan and determine ...") rather than the captions a CLIP model is trained on; and
a long question pushes the option towards the end of the text encoder's context (77 tokens),
where truncation cuts it first. Where labels are terse ("0", "Normal") the question's wording can
help, hence the option; neither choice has been measured on the real Med-MAT data here.

The modality, anatomical area and task of a file come from the README's two tables (the records
themselves do not carry them): ``Subset--NN`` from the 53-subset table, ``Ori--NN`` from the
original-data-set table, both copied below. The original table spells two modalities unlike the
subset table (``X-Ray``, ``Ultrasound``); they are reported as the subset table spells them
(``X-ray``, ``US``) so that the two kinds of file group together. Other abbreviations are kept as
the README gives them (Co, Der, DP, End, FP, Mic, ...).

Where the README is silent, the reader is tolerant and says what it did:

* the container: a file may hold a JSON array of records (assumed to be the published form), a
  single record, an object with one list of records under any key, or JSON Lines;
* the file names: ``<Subset|Ori>--<NN>[-<split>].json`` give the kind, the number and the split
  (the README shows ``-train``; any suffix is kept as the split); a file named otherwise is read
  with modality, area and task ``unknown``;
* ``Ori`` number 57 (COVIDGR) has no number in the README's table; it is taken to be 57 from its
  place between 56 and 58;
* options are read one per line after the question, as ``A: text`` (also ``A.``, ``A)``,
  ``(A)``), lettered A, B, C, ... in order; lines after the options (the "Answer with the
  option's letter ..." instruction) are not part of the question; the question's wording is the
  text before the options (``Question`` where that is empty);
* ``Answer-choice`` may be ``B``, ``B:``, ``(B)`` or ``B: Cyst``; without a usable letter, an
  ``Answer`` equal to exactly one option's text is taken; an ``Answer`` that disagrees with the
  lettered option is counted (the letter is scored);
* ``image`` is a path relative to the folder that holds ``med-mat/``; the root may also be the
  ``med-mat`` folder itself, and a path without the ``med-mat/`` prefix is also looked for under
  ``<root>/med-mat``. Without a root, a file's root is the folder above ``Aggregated_Subsets`` /
  ``Original_Medical_Datasets`` (else the file's own folder). Image paths that lead outside the
  root (absolute, ``../``, symlinks out) are refused unless ``allow_outside_root``;
* the detection/segmentation subsets (38-53) are in the tables, but the README shows no record of
  theirs; a record of any subset that does not read as lettered options is skipped with its reason;
* ``id`` may be missing or repeated across files: a question is named by its file and its index
  in the file (and its id where there is one); ``data-no`` may be a string or a number.

A record that cannot be read as a question (not an object, no image, no options, fewer than two
options, no usable answer, ...) is skipped with its file, index and reason, and counted. A missing
image is counted and listed by file, index, id and path; an image that cannot be decoded likewise
(``unreadable``). Neither is fatal, neither counts in the accuracy. The report gives, overall, per
file (subset), per modality, area, task and number of options: questions, answered, correct,
accuracy, the mean chance level of the answered questions (1 / number of options of each) and the
accuracy above it.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np
from tqdm.auto import tqdm

from clip_med.core.bounds import bounded
from clip_med.core.io import atomic_write, write_json_atomic, write_text_atomic
from clip_med.core.templates import check_template, fill_template
from clip_med.data.images import ImageRejected

log = logging.getLogger(__name__)

SUBSETS_FOLDER = "Aggregated_Subsets"
ORIGINALS_FOLDER = "Original_Medical_Datasets"
IMAGES_FOLDER = "med-mat"
DEFAULT_FILES = f"{SUBSETS_FOLDER}/Subset--*.json"
TEMPLATE_FIELDS = ("question", "option")
UNKNOWN = "unknown"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
LISTED = 20  # items of a long list shown in the Markdown report (the JSON report has them all)

# The README's "Aggregated_Subsets" table: number -> (modality, area, task).
SUBSET_TABLE: dict[int, tuple[str, str, str]] = {
    1: ("Co", "Cervix", "Cervical Picture Quality Evaluation"),
    2: ("CT", "Kidney", "Kidney Diseases Classification"),
    3: ("CT", "Lung", "COVID-19 Classification"),
    4: ("CT", "Lung", "Lung Cancer Classification"),
    5: ("CT", "Brain", "Brain Hemorrhage Classification"),
    6: ("CT", "Brain", "Brain Cancer Classification"),
    7: ("Der", "Skin", "Melanoma Type Classification"),
    8: ("Der", "Skin", "Skin Diseases Classification"),
    9: ("DP", "Mouth", "Teeth Condition Classification"),
    10: ("DP", "Mouth", "Oral Cancer Classification"),
    11: ("End", "Intestine", "Intestine Cleanliness Level"),
    12: ("End", "Bladder", "Cancer Degree Classification"),
    13: ("End", "Intestine", "Intestine Diseases Classification"),
    14: ("FP", "Fundus", "Eye Diseases Classification"),
    15: ("FP", "Fundus", "Multiple-labels Eye Diseases Classification"),
    16: ("FP", "Fundus", "Blindness Level"),
    17: ("FP", "Fundus", "Retinal Images Quality Evaluation"),
    18: ("Mic", "Cell", "Cell Type Classification"),
    19: ("Mic", "Cell", "Prostate Cancer Degree Classification"),
    20: ("Mic", "Cell", "Multiple-labels Blood Cell Classification"),
    21: ("Mic", "Cell", "Cancer Classification"),
    22: ("MRI", "Brain", "Head Diseases Classification"),
    23: ("OCT", "Retina", "Retina Diseases Classification"),
    24: ("US", "Breast", "Breast Cancer Classification"),
    25: ("X-ray", "Bones", "Degree Classification of Knee"),
    26: ("X-ray", "Bones", "Fractured Classification"),
    27: ("X-ray", "Bones", "Vertebrae Diseases Classification"),
    28: ("X-ray", "Lung", "COVID-19 and Pneumonia Classification"),
    29: ("X-ray", "Breast", "Breast Diseases Classification"),
    30: ("X-ray", "Lung", "Tuberculosis Classification"),
    31: ("X-ray", "Chest", "Multiple-labels Chest Classification"),
    32: ("X-ray", "Brain", "Tumor Classification"),
    33: ("Mic", "Cell", "Multi-labels Diseases"),
    34: ("FP", "Fundus", "Level Identification"),
    35: ("X-ray", "Bones", "Level Identification"),
    36: ("X-ray", "Bones", "Spinal lesion Classification"),
    37: ("X-ray", "Breast", "Multi-labels Diseases"),
    38: ("Der", "Skin", "Lesion Det/Seg"),
    39: ("End", "Intestine", "PolyP Det/Seg"),
    40: ("End", "Intestine", "Surgical Procedures Det/Seg"),
    41: ("End", "Intestine", "Multi-labels Det/Seg"),
    42: ("Mic", "Cell", "Cancer Cell Det/Seg"),
    43: ("US", "Chest", "Cancer Det/Seg"),
    44: ("US", "Thyroid", "Thyroid Nodule Region Det/Seg"),
    45: ("MRI", "Intestine", "Multi-labels Det/Seg"),
    46: ("MRI", "Liver", "Liver Det/Seg"),
    47: ("X-ray", "Lung", "Lung Det/Seg"),
    48: ("X-ray", "Lung", "Pneumothorax Det/Seg"),
    49: ("X-ray", "Bones", "Spinal Anomaly Det"),
    50: ("X-ray", "Chest", "Multi-labels Det"),
    51: ("FP", "Fundus", "Vessel Seg"),
    52: ("FP", "Fundus", "Optic Disc and Cup Seg"),
    53: ("FP", "Fundus", "Optic Disc Seg"),
}

# The README's "Original_Medical_Datasets" table: number -> (data set, modality, area, task), as given.
ORIGINAL_TABLE: dict[int, tuple[str, str, str, str]] = {
    1: ("Intel and MobileODT Cervical Screening", "Co", "Cervix", "Cervix Type in Screening"),
    2: ("CT Kindney Dataset", "CT", "Kidney", "Normal or Cyst or Tumor"),
    3: ("SARS-COV-2 Ct-Scan", "CT", "Lung", "COVID19, Classification Dataset"),
    4: ("COVID CT COVID-CT", "CT", "Lung", "COVID19, Classification Dataset."),
    5: ("Chest CT-Scan", "CT", "Lung", "Cancer, 3 Cancer Categories, Multiple Classification Dataset"),
    6: ("COVID-19-CT SCAN IMAGES", "CT", "Lung", "COVID19, Classification"),
    7: ("Head CT", "CT", "Brain", "Head Hemorrhage"),
    8: ("CT of Brain", "CT", "Brain", "Head Cancer"),
    9: ("MED-NODE", "Der", "Skin", "Melanoma or Naevus"),
    10: ("ISIC 2020", "Der", "Skin", "Melanoma, Benign or Malignant"),
    11: ("PED-UFES-20", "Der", "Skin", "Skin Multi Classification"),
    12: ("Web-scraped Skin Image", "Der", "Skin", "Skin Desease Multi Classification"),
    13: ("ISBI 2016", "Der", "Skin", "Skin Lesion Classification"),
    14: ("ISIC 2019", "Der", "Skin", "Skin Desease Multi Classification"),
    15: ("Skin Cancer ISIC", "Der", "Skin", "Skin Cancer Multi Classification"),
    16: ("Dental Condition Dataset", "DP", "Teeth", "Teeth condition classification"),
    17: ("Oral Cancer Dataset", "DP", "Teeth", "Oral cancer Classification"),
    18: ("The Nerthus Dataset", "End", "Intestine", "Cleanliness level"),
    19: ("Endoscopic Bladder Tissue", "End", "Bladder", "Canser Degree Classification"),
    20: ("Kvasir", "End", "Intestine", "Multi Disease Classification"),
    21: ("ACRIMA", "FP", "Fundus", "Glaucoma"),
    22: ("Augemnted ocular diseases AOD", "FP", "Fundus", "Multi Classification of eye diseases"),
    23: ("JSIEC", "FP", "Fundus", "Multi Classification of eye diseases"),
    24: ("Multi-Label Retinal Diseases", "FP", "Fundus", "Multi Classification of eye diseases"),
    25: ("RFMiD 2.0", "FP", "Fundus", "Multi Classification of eye diseases"),
    26: ("ToxoFundus(Data Processed Paper)", "FP", "Fundus", "Ocular toxoplasmosis"),
    27: ("ToxoFundus(Data Raw 6class All)", "FP", "Fundus", "Ocular toxoplasmosis"),
    28: ("Adam dataset", "FP", "Fundus", "Age-related Macular Degeneration"),
    29: ("APTOS 2019 Blindness", "FP", "Fundus", "Blindness Level Identification 0~4"),
    30: ("DRIMBD", "FP", "Fundus", "Quality Testing of Retinal Images"),
    31: ("Glaucoma Detection", "FP", "Fundus", "Glaucoma Classification"),
    32: ("AIROGS", "FP", "Fundus", "Glaucoma Classification"),
    33: ("ICPR-HEp-2", "Mic", "Cell", "Multi Classification"),
    34: ("SICAPv2", "Mic", "Cell", "Cancer Degree Classification"),
    35: ("Blood Cell Images", "Mic", "Cell", "Blood Cell Classificaion (Multi)"),
    36: ("BreakHis", "Mic", "Cell", "Cell type and beginormag"),
    37: ("Chaoyang", "Mic", "Cell", "Multi Classification of pathologists"),
    38: ("HuSHeM", "Mic", "Cell", "Sperm Head Morphology Classificaion"),
    39: ("Bone Marrow Cell Classification", "Mic", "Cell", "Bone Marrow Cell Classification"),
    40: ("NCT-CRC-HE-100K", "Mic", "Cell", "Multi Classification"),
    41: ("Malignant Lymphoma Classification", "Mic", "Cell", "Multi Classification"),
    42: ("Histopathologic Cancer Detection", "Mic", "Cell", "Cancer Classification"),
    43: ("LC25000", "Mic", "Cell", "Multi Classification of Lung and Colon"),
    44: ("Brain Tumor 17 Classes", "MRI", "Brain", "Multi Classification"),
    45: ("Tumor Classification", "MRI", "Brain", "Pituitary or Glioma or Meningioma or Notumor"),
    46: ("Malignant Lymphoma Classification", "OCT", "Retina", "Multi Classification of eye diseases"),
    47: ("Retinal OCT-C8", "OCT", "Retina", "Multi Classification of eye diseases"),
    48: ("BUSI", "US", "Breast", "Breast Cancer"),
    49: ("Digital Knee X-Ray Images", "X-Ray", "Bones", "Degree Classification of Knee"),
    50: ("Bone Fracture Multi-Region X-ray Data", "X-Ray", "Bones", "Fractured Classification"),
    51: ("Fracture detection", "X-Ray", "Bones", "Fractured Classification"),
    52: ("The vertebrae X-ray image", "X-Ray", "Bones", "Vertebrae"),
    53: ("Knee Osteoarthritis Dataset", "X-Ray", "Bones", "Knee Osteoarthritis with severity grading"),
    54: ("Shenzhen Chest X-Ray Set", "X-Ray", "Lung", "COVID19, Classification Dataset."),
    55: ("Chest X-ray PD", "X-Ray", "Lung", "COVID and Pneumonia"),
    56: ("COVID-19 CHEST X-RAY DATABASE", "X-Ray", "Lung", "COVID and Pneumonia"),
    57: ("COVIDGR", "X-Ray", "Lung", "COVID19, Classification"),  # unnumbered in the README's table
    58: ("MIAS", "X-Ray", "Breast", "Multi Classification of Breast"),
    59: ("Tuberculosis Chest X-Ray Database", "X-Ray", "Lung", "Tuberculosis"),
    60: ("Pediatric Pneumonia Chest X-Ray", "X-Ray", "Lung", "Pneumonia Classification"),
    61: ("Random Sample of NIH Chest X-Ray Dataset", "X-Ray", "Chest", "Multi Classificaiton of Chest"),
    62: ("CoronaHack-Chest X-Ray", "X-Ray", "Lung", "Pnemonia Classifcition with Virus type"),
    63: ("Brain Tumor Dataset", "X-Ray", "Brain", "Tumor Classification"),
    64: ("Fitzpatrick 17k (Nine Labels)", "Der", "Skin", "Multi Classification"),
    65: ("BioMediTech", "Mic", "Cell", "Multi Classification"),
    66: ("Diabetic retinopathy", "FP", "Fundus", "Diabetic Retinopathy Level"),
    67: ("Leukemia", "Mic", "Cell", "Cancer Classification"),
    68: ("ODIR-5K", "FP", "Fundus", "Multiple Labels Classification"),
    69: ("Arthrosis", "X-Ray", "Bones", "Bone Age Classification"),
    70: ("HSA-NRL", "Mic", "Cell", "Multi Classification of pathologists"),
    71: ("ISIC 2018 (Task 3)", "Der", "Skin", "Multi Classification"),
    72: ("ISIC 2017 (Task 3)", "Der", "Skin", "Multi Classification"),
    73: ("ChestX-Det", "X-Ray", "Chest", "Multi Classification"),
    74: ("Monkeypox Skin Lesion Dataset", "Der", "Skin", "Only Monkeypox"),
    75: ("Cataract Dataset", "FP", "Fundus", "Multi Classification"),
    76: ("ChestX-rays IndianaUniversity", "X-Ray", "Chest", "Multi-label Classification"),
    77: ("CheXpert v1.0 small", "X-Ray", "Chest", "Multi-label Classification"),
    78: ("CBIS-DDSM", "X-Ray", "Breast", "Multi Classification"),
    79: ("NLM-TB", "X-Ray", "Lung", "Tuberculosis"),
    80: ("ChestXray-NIHCC", "X-Ray", "Chest", "Multi-label Classification"),
    81: ("COVIDx CXR-4", "X-Ray", "Lung", "COVID19, Classification"),
    82: ("VinDr-Mammo", "X-Ray", "Breast", "Multi-label Classification"),
    83: ("PBC dataset normal DIB", "Mic", "Cell", "Multi Classification"),
    84: ("Human Protein Atlas", "Mic", "Cell", "Multi-label Classification (Only green)"),
    85: ("RSNA Pneumonia Detection Challenge 2018", "X-Ray", "Chest", "Multi-label Classification"),
    86: ("VinDr-SpineXR", "X-Ray", "Bones", "Multi Classification of Bones Diseases"),
    87: ("VinDr-PCXR", "X-Ray", "Chest", "Multi-label Classification"),
    88: ("PH2", "Der", "Skin", "Melanoma Segmentation"),
    89: ("ISBI 2016 (Task3B)", "Der", "Skin", "Melanoma Segmentation"),
    90: ("ISIC 2016 (Task 1)", "Der", "Skin", "Melanoma Segmentation"),
    91: ("ISIC 2017", "Der", "Skin", "Melanoma Segmentation"),
    92: ("CVC-ClinicDB", "End", "Intestine", "Polyp Segmentation"),
    93: ("Kvasir-SEG", "End", "Intestine", "Polyp segmentation"),
    94: ("m2caiseg", "End", "Intestine", "Surgical Instrument Segmentation"),
    95: ("EDD 2020", "End", "Intestine", "Multiple Diseases Segmentation in Intestine"),
    96: ("SICAPv2", "Mic", "Cell", "Cancer Cells Segmentation"),
    97: ("BUSI", "Ultrasound", "Breast", "Cancer Segmentation"),
    98: ("TN3K", "Ultrasound", "Thyroid", "Thyroid Nodule Segmentation"),
    99: ("NLM-TB", "X-Ray", "Lung", "Lung Segmentation (With left or right)"),
    100: ("VinDr-SpineXR", "X-Ray", "Bones", "Spinal X-ray Anaomaly Detection"),
    101: ("VinDr-PCXR", "X-Ray", "Chest", "Multiple Diseases Segmentation in Chest"),
    102: ("ChestX-Det", "X-Ray", "Chest", "Multiple Diseases Segmentation in Chest"),
    103: ("UW-Madison Gl Tract Image Segmentation", "MRI", "Intestine", "Surgical Instrument Segmentation"),
    104: ("Duke Liver Dataset MRI v1", "MRI", "Liver", "Liver Segmentation"),
    105: ("Duke Liver Dataset MRI v2", "MRI", "Liver", "Liver Segmentation"),
    106: ("SIIM-ACR Pneumothorax Segmentation", "X-Ray", "Lung", "Pneumothorax Segmentation"),
    107: ("FIVES", "FP", "Fundus", "Fundus Vascular Segmentation"),
    108: ("RIM-ONE DL", "FP", "Fundus", "Optic Disc and Cup Segmentation"),
    109: ("PALM19", "FP", "Fundus", "Optic Disc Segmentation"),
}
# The original table's spellings of a modality that the subset table spells otherwise.
MODALITY_SPELLING = {"X-Ray": "X-ray", "Ultrasound": "US"}

_FILE_NAME = re.compile(r"^(Subset|Ori)--(\d+)(?:-(.+))?$", re.IGNORECASE)
_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])\s*[:.)]\)?\s*(.*?)\s*$")
_ANSWER_LETTER = re.compile(r"^\s*\(?\s*([A-Z])\s*\)?\s*(?:[:.)]|$|\s)")


class MalformedRecord(ValueError):
    """A record that cannot be read as a multiple-choice question (the message is the reason)."""


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class MedMatFile:
    """One question file, its kind (``subset``, ``original`` or ``other``) and what the README says of it."""

    path: str
    name: str  # the file name without .json: Subset--02-train
    kind: str
    number: Optional[int]
    split: Optional[str]
    modality: str = UNKNOWN
    area: str = UNKNOWN
    task: str = UNKNOWN
    dataset: Optional[str] = None  # the original data set's name (Ori files)

    @classmethod
    def from_path(cls, path: str | Path) -> MedMatFile:
        path = Path(path)
        match = _FILE_NAME.match(path.stem)
        if match is None:
            return cls(str(path), path.stem, "other", None, None)
        prefix, number, split = match.group(1).lower(), int(match.group(2)), match.group(3)
        if prefix == "subset":
            modality, area, task = SUBSET_TABLE.get(number, (UNKNOWN, UNKNOWN, UNKNOWN))
            return cls(str(path), path.stem, "subset", number, split, modality, area, task)
        dataset, modality, area, task = ORIGINAL_TABLE.get(number, (None, UNKNOWN, UNKNOWN, UNKNOWN))
        return cls(str(path), path.stem, "original", number, split, MODALITY_SPELLING.get(modality, modality),
                   area, task, dataset)

    def info(self) -> dict[str, Any]:
        return {"file": self.path, "kind": self.kind, "number": self.number, "split": self.split,
                "modality": self.modality, "area": self.area, "task": self.task, "dataset": self.dataset}


@dataclass(frozen=True)
class MedMatQuestion:
    file: MedMatFile
    index: int  # position of the record in its file
    id: Optional[str]
    image: str  # as the record gives it
    image_path: str  # where it was looked for (the first candidate that exists, else the first)
    image_exists: bool
    question: str
    options: tuple[str, ...]
    answer: int  # index into options
    caption: Optional[str] = None
    data_no: Optional[str] = None

    @property
    def chance(self) -> float:
        """The accuracy of a uniform guess: 1 / the number of options."""
        return 1.0 / len(self.options)

    def where(self) -> dict[str, Any]:
        return {"file": self.file.name, "index": self.index, "id": self.id}


@dataclass(frozen=True)
class SkippedRecord:
    file: str
    index: int
    id: Optional[str]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "index": self.index, "id": self.id, "reason": self.reason}


@dataclass
class MedMatData:
    files: list[MedMatFile] = field(default_factory=list)
    questions: list[MedMatQuestion] = field(default_factory=list)
    skipped: list[SkippedRecord] = field(default_factory=list)
    answer_disagrees: list[dict[str, Any]] = field(default_factory=list)  # Answer text != the lettered option


def find_files(root: str | Path | None = None, files: str | Path | Sequence[str | Path] | None = None) -> list[Path]:
    """The question files: ``files`` (paths, globs, folders; relative ones under ``root``), by default
    ``<root>/Aggregated_Subsets/Subset--*.json``. A pattern or folder that finds nothing is an error."""
    if root is None and files is None:
        raise ValueError("give the Med-MAT folder (root=<folder holding med-mat/ and Aggregated_Subsets/>) "
                         "or the question files (files=<path|glob|list>)")
    base = Path(root).expanduser() if root is not None else None
    if base is not None and not base.is_dir():
        raise FileNotFoundError(f"the Med-MAT folder {base} does not exist")
    items = [DEFAULT_FILES] if files is None else [files] if isinstance(files, (str, Path)) else list(files)
    found: list[Path] = []
    for item in items:
        path = Path(str(item)).expanduser()
        if base is not None and not path.is_absolute():
            path = base / path
        if path.is_dir():
            matches = sorted(path.glob("*.json"))
        elif any(char in str(item) for char in "*?["):
            matches = sorted(Path(match) for match in glob.glob(str(path)))
        else:
            if not path.is_file():
                raise FileNotFoundError(f"Med-MAT question file {path} does not exist")
            matches = [path]
        if not matches:
            raise FileNotFoundError(f"no Med-MAT question file matches {str(path)!r}")
        found += [match for match in matches if match not in found]
    return found


def file_root(path: Path, root: str | Path | None) -> Path:
    """The folder a file's image paths are relative to."""
    if root is not None:
        return Path(root).expanduser()
    parent = path.resolve().parent
    return parent.parent if parent.name in (SUBSETS_FOLDER, ORIGINALS_FOLDER) else parent


def load_records(path: Path) -> list[Any]:
    """The records of one file: a JSON array, one record, an object with one list of records, or JSON Lines."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        lines = [line for line in text.splitlines() if line.strip()]
        if len(lines) < 2:
            raise ValueError(f"{path} is not JSON: {exc}") from None
        return [_json_line(line) for line in lines]
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        lists = [value for value in data.values() if isinstance(value, list)]
        if "image" not in data and len(lists) == 1:
            return lists[0]
        return [data]
    raise ValueError(f"{path} holds a JSON {type(data).__name__}, not Med-MAT records")


class _BadLine:
    """A JSON Lines line that does not parse (skipped as a malformed record)."""

    def __init__(self, error: str):
        self.error = error


def _json_line(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        return _BadLine(str(exc))


def _text(record: dict, key: str) -> Optional[str]:
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise MalformedRecord(f"{key!r} is a {type(value).__name__}, not a string")
    return value


def _scalar(value: Any) -> Optional[str]:
    """An informative field (caption, data-no) as text; anything but a string or a number is dropped."""
    return str(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else None


def parse_choices(text: str) -> tuple[str, list[str]]:
    """``Question-choice`` -> (the question's wording, the option texts in letter order)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if (m := _OPTION_LINE.match(line)) and m.group(1) == "A"), None)
    if start is None:
        return " ".join(" ".join(lines).split()), []
    options: list[str] = []
    for line in lines[start:]:
        match = _OPTION_LINE.match(line)
        if match is None or len(options) == len(LETTERS) or match.group(1) != LETTERS[len(options)]:
            break
        options.append(" ".join(match.group(2).split()))
    return " ".join(" ".join(lines[:start]).split()), options


def _same_text(a: str, b: str) -> bool:
    return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()


def parse_record(record: Any) -> tuple[str, str, list[str], int, Optional[str]]:
    """(image, question, options, answer index, answer text) of one record; raises :class:`MalformedRecord`."""
    if isinstance(record, _BadLine):
        raise MalformedRecord(f"not JSON: {record.error}")
    if not isinstance(record, dict):
        raise MalformedRecord(f"a JSON {type(record).__name__}, not an object")
    image = record.get("image")
    if isinstance(image, list) and len(image) == 1:
        image = image[0]
    if not isinstance(image, str) or not image.strip():
        raise MalformedRecord("no 'image' path" if image in (None, "", []) else
                              f"'image' is {type(image).__name__} {str(image)[:80]!r}, not one path")
    choice = _text(record, "Question-choice")
    if not choice or not choice.strip():
        raise MalformedRecord("no 'Question-choice'")
    question, options = parse_choices(choice)
    if not options:
        raise MalformedRecord("'Question-choice' has no lettered options (A: ..., B: ...)")
    if len(options) < 2:
        raise MalformedRecord(f"one option only ({options[0]!r}): nothing to choose between")
    if not all(options):
        raise MalformedRecord(f"an empty option: {options}")
    question = question or " ".join((_text(record, "Question") or "").split())
    answer_text = _text(record, "Answer")
    letter = _text(record, "Answer-choice")
    match = _ANSWER_LETTER.match(letter.upper()) if letter else None
    if match is not None:
        answer = LETTERS.index(match.group(1))
        if answer >= len(options):
            raise MalformedRecord(f"'Answer-choice' {letter!r} is not one of the options A-{LETTERS[len(options) - 1]}")
    else:
        same = [i for i, option in enumerate(options) if answer_text and _same_text(option, answer_text)]
        if len(same) != 1:
            raise MalformedRecord(f"no usable 'Answer-choice' ({letter!r}) and 'Answer' {answer_text!r} "
                                  f"names {'no' if not same else 'more than one'} option")
        answer = same[0]
    return image.strip().replace("\\", "/"), question, options, answer, answer_text


def image_candidates(image: str, root: Path) -> list[Path]:
    """Where an image path of a record may be, in the order tried."""
    path = Path(image).expanduser()
    if path.is_absolute():
        return [path]
    prefix = IMAGES_FOLDER + "/"
    rel = image[2:] if image.startswith("./") else image
    if rel.startswith(prefix):
        return [root / rel, root / rel[len(prefix):]]  # the root may be the med-mat folder itself
    return [root / rel, root / IMAGES_FOLDER / rel]


def _inside(path: Path, root: Path) -> bool:
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real_root, real]) == real_root


def read_file(path: str | Path, root: str | Path | None = None, limit: Optional[int] = None,
              allow_outside_root: bool = False) -> MedMatData:
    """The questions of one Med-MAT JSON file; malformed records are skipped with a reason."""
    path = Path(path)
    info = MedMatFile.from_path(path)
    base = file_root(path, root)
    out = MedMatData(files=[info])
    records = load_records(path)
    for index, record in enumerate(records[:limit] if limit is not None else records):
        raw_id = record.get("id") if isinstance(record, dict) else None
        item_id = None if raw_id is None or isinstance(raw_id, (dict, list)) else str(raw_id)
        try:
            image, question, options, answer, answer_text = parse_record(record)
            candidates = image_candidates(image, base)
            chosen = next((candidate for candidate in candidates if candidate.is_file()), candidates[0])
            if not allow_outside_root and not _inside(chosen, base):
                raise MalformedRecord(f"the image {image!r} lies outside {base} (allow_outside_root=true reads it)")
            caption, data_no = _scalar(record.get("caption")), _scalar(record.get("data-no"))
        except MalformedRecord as exc:
            out.skipped.append(SkippedRecord(info.name, index, item_id, str(exc)))
            continue
        item = MedMatQuestion(info, index, item_id, image, str(chosen), chosen.is_file(), question, tuple(options),
                              answer, caption, data_no)
        if answer_text is not None and not _same_text(answer_text, options[answer]):
            out.answer_disagrees.append({**item.where(), "answer": answer_text, "option": options[answer]})
        out.questions.append(item)
    return out


def read_med_mat(root: str | Path | None = None, files: str | Path | Sequence[str | Path] | None = None,
                 limit: Optional[int] = None, allow_outside_root: bool = False) -> MedMatData:
    """Every question of the selected files (see :func:`find_files`); ``limit``: the first N records of each."""
    data = MedMatData()
    for path in find_files(root, files):
        part = read_file(path, root, limit, allow_outside_root)
        data.files += part.files
        data.questions += part.questions
        data.skipped += part.skipped
        data.answer_disagrees += part.answer_disagrees
    kinds = {item.kind for item in data.files}
    if {"subset", "original"} <= kinds:
        log.warning("both Aggregated_Subsets and Original_Medical_Datasets files are selected: the subsets merge "
                    "the original sets, so the overall figures count those questions twice")
    missing = sum(not question.image_exists for question in data.questions)
    log.info("Med-MAT: %d questions in %d file(s); %d record(s) skipped, %d image(s) missing",
             len(data.questions), len(data.files), len(data.skipped), missing)
    return data


# ---------------------------------------------------------------------------------------------
# Answering


class EmbeddingModel(Protocol):
    """What answering needs of a model (``clip_med.load(...)`` gives one): image files and texts -> (N, D)
    embeddings. An unusable image raises :class:`~clip_med.data.images.ImageRejected`."""

    def embed_images(self, images: Sequence[str]) -> np.ndarray: ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass
class MedMatOptions:
    # The text scored for each option: {option}, optionally {question} (e.g. "{question} {option}").
    template: str = "{option}"
    batch_size: int = bounded(32, minimum=1)  # images embedded at a time
    text_batch_size: int = bounded(256, minimum=1)  # option texts embedded at a time
    limit: Optional[int] = bounded(None, minimum=1)  # only the first N records of each file
    allow_outside_root: bool = False  # read image paths that lead outside the Med-MAT folder
    progress: bool = True


@dataclass(frozen=True)
class Outcome:
    """What happened to one question."""

    question: MedMatQuestion
    status: str  # answered | missing_image | unreadable_image
    predicted: Optional[int] = None
    scores: tuple[float, ...] = ()
    tie: bool = False
    detail: str = ""

    @property
    def correct(self) -> bool:
        return self.status == "answered" and self.predicted == self.question.answer


def check_option_template(template: str) -> None:
    fields = check_template(template, TEMPLATE_FIELDS)
    if "option" not in fields:
        raise ValueError(f"the option template {template!r} must contain {{option}}")


def option_texts(question: MedMatQuestion, template: str) -> list[str]:
    return [" ".join(fill_template(template, {"question": question.question, "option": option}).split())
            for option in question.options]


def _normalise(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)


class TextCache:
    """Normalised text embeddings by text, embedded in batches only for texts not seen yet."""

    def __init__(self, model: EmbeddingModel, batch_size: int = 256):
        self.model, self.batch_size = model, batch_size
        self.vectors: dict[str, np.ndarray] = {}

    def add(self, texts: Iterable[str]) -> None:
        new = list(dict.fromkeys(text for text in texts if text not in self.vectors))
        for start in range(0, len(new), self.batch_size):
            chunk = new[start:start + self.batch_size]
            embedded = _normalise(self.model.embed_texts(chunk))
            if embedded.shape[0] != len(chunk):
                raise ValueError(f"the model gave {embedded.shape[0]} text embeddings for {len(chunk)} texts")
            self.vectors.update(zip(chunk, embedded))

    def matrix(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self.vectors[text] for text in texts])


def _embed_images(model: EmbeddingModel, paths: list[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Normalised embeddings by path, and the paths that could not be read (with why)."""
    try:
        embedded = _normalise(model.embed_images(paths))
        return dict(zip(paths, embedded)), {}
    except ImageRejected as rejected:  # one bad file in the batch: embed one by one to find it
        log.debug("a batch of %d images holds an unreadable one (%s): embedding them one by one",
                  len(paths), rejected.reason)
    vectors, bad = {}, {}
    for path in paths:
        try:
            vectors[path] = _normalise(model.embed_images([path]))[0]
        except ImageRejected as rejected:
            bad[path] = f"{rejected.reason}: {rejected.detail}" if rejected.detail else rejected.reason
    return vectors, bad


def answer_questions(model: EmbeddingModel, questions: Sequence[MedMatQuestion],
                     options: MedMatOptions | None = None) -> list[Outcome]:
    """Answer each question by the option whose text is most similar to the image (see the module docstring)."""
    options = options or MedMatOptions()
    check_option_template(options.template)
    cache = TextCache(model, options.text_batch_size)
    outcomes: dict[int, Outcome] = {}
    present = [position for position, question in enumerate(questions) if question.image_exists]
    for position, question in enumerate(questions):
        if not question.image_exists:
            outcomes[position] = Outcome(question, "missing_image", detail=question.image_path)
    with tqdm(total=len(questions), desc="Med-MAT", unit="question", disable=not options.progress) as bar:
        bar.update(len(questions) - len(present))
        for start in range(0, len(present), options.batch_size):
            batch = present[start:start + options.batch_size]
            paths = list(dict.fromkeys(questions[position].image_path for position in batch))
            images, unreadable = _embed_images(model, paths)
            texts = {position: option_texts(questions[position], options.template) for position in batch}
            cache.add(text for position in batch if questions[position].image_path in images
                      for text in texts[position])
            for position in batch:
                question = questions[position]
                if question.image_path not in images:
                    outcomes[position] = Outcome(question, "unreadable_image", detail=unreadable[question.image_path])
                    continue
                scores = cache.matrix(texts[position]) @ images[question.image_path]
                best = int(np.argmax(scores))
                tie = int(np.sum(np.isclose(scores, scores[best], rtol=0, atol=1e-6))) > 1
                outcomes[position] = Outcome(question, "answered", best, tuple(float(s) for s in scores), tie)
            bar.update(len(batch))
    return [outcomes[position] for position in range(len(questions))]


# ---------------------------------------------------------------------------------------------
# Report


@dataclass
class Tally:
    questions: int = 0  # readable questions
    answered: int = 0
    correct: int = 0
    chance_sum: float = 0.0
    ties: int = 0
    missing_images: int = 0
    unreadable_images: int = 0
    skipped_records: int = 0

    def add(self, outcome: Outcome) -> None:
        self.questions += 1
        if outcome.status == "missing_image":
            self.missing_images += 1
        elif outcome.status == "unreadable_image":
            self.unreadable_images += 1
        else:
            self.answered += 1
            self.correct += int(outcome.correct)
            self.chance_sum += outcome.question.chance
            self.ties += int(outcome.tie)

    def to_dict(self) -> dict[str, Any]:
        accuracy = self.correct / self.answered if self.answered else None
        chance = self.chance_sum / self.answered if self.answered else None
        return {"questions": self.questions, "answered": self.answered, "correct": self.correct,
                "accuracy": accuracy, "chance": chance,
                "above_chance": accuracy - chance if accuracy is not None and chance is not None else None,
                "ties": self.ties, "missing_images": self.missing_images,
                "unreadable_images": self.unreadable_images, "skipped_records": self.skipped_records}


GROUPS = ("modality", "area", "task")


def summarise(data: MedMatData, outcomes: Sequence[Outcome], template: str = "{option}",
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report: overall, per file (subset), per modality / area / task and per number of options."""
    overall = Tally()
    by_file = {item.name: Tally() for item in data.files}
    by_group: dict[str, dict[str, Tally]] = {group: {} for group in GROUPS}
    by_options: dict[str, Tally] = {}
    files = {item.name: item for item in data.files}
    for outcome in outcomes:
        question = outcome.question
        for tally in (overall, by_file.setdefault(question.file.name, Tally()),
                      by_options.setdefault(str(len(question.options)), Tally()),
                      *(by_group[group].setdefault(getattr(question.file, group), Tally()) for group in GROUPS)):
            tally.add(outcome)
    for skipped in data.skipped:
        info = files[skipped.file]
        overall.skipped_records += 1
        by_file.setdefault(info.name, Tally()).skipped_records += 1
        for group in GROUPS:
            by_group[group].setdefault(getattr(info, group), Tally()).skipped_records += 1
    missing = [{**outcome.question.where(), "image": outcome.question.image, "path": outcome.detail}
               for outcome in outcomes if outcome.status == "missing_image"]
    unreadable = [{**outcome.question.where(), "image": outcome.question.image, "reason": outcome.detail}
                  for outcome in outcomes if outcome.status == "unreadable_image"]
    return {
        "benchmark": "Med-MAT", "template": template, **(extra or {}),
        "overall": overall.to_dict(),
        "by_subset": {name: {**files[name].info(), **tally.to_dict()} for name, tally in by_file.items()},
        **{f"by_{group}": {key: tally.to_dict() for key, tally in sorted(tallies.items())}
           for group, tallies in by_group.items()},
        "by_options": {key: {**tally.to_dict(), "chance_per_question": 1 / int(key)}
                       for key, tally in sorted(by_options.items(), key=lambda item: int(item[0]))},
        "missing_images": missing,
        "unreadable_images": unreadable,
        "skipped_records": [item.to_dict() for item in data.skipped],
        "answer_disagrees": data.answer_disagrees,
    }


def _number(value: Optional[float]) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


_COLUMNS = ("answered", "correct", "accuracy", "chance", "above_chance", "missing_images", "unreadable_images",
            "skipped_records")


def _row(label: Sequence[Any], stats: dict[str, Any]) -> str:
    values = [_number(stats[key]) if key in ("accuracy", "chance", "above_chance") else str(stats[key])
              for key in _COLUMNS]
    return "| " + " | ".join([*(_cell(item) for item in label), *values]) + " |"


def _table(title: str, heads: Sequence[str], rows: Iterable[tuple[Sequence[Any], dict[str, Any]]]) -> list[str]:
    lines = [f"## {title}", "", "| " + " | ".join([*heads, *(key.replace("_", " ") for key in _COLUMNS)]) + " |",
             "|" + "---|" * (len(heads) + len(_COLUMNS))]
    return lines + [_row(label, stats) for label, stats in rows] + [""]


def _listing(title: str, items: list[dict[str, Any]], keys: Sequence[str]) -> list[str]:
    if not items:
        return []
    shown = items[:LISTED]
    more = f", the first {LISTED} shown; all in med_mat.json" if len(items) > LISTED else ""
    lines = [f"## {title} ({len(items)}{more})", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(item.get(key)) for key in keys) + " |" for item in shown]
    return lines + [""]


def render_markdown(report: dict[str, Any]) -> str:
    lines = ["# Med-MAT multiple choice", ""]
    for key in ("model", "checkpoint", "root"):
        if report.get(key):
            lines.append(f"- {key}: `{report[key]}`")
    lines += [f"- option text: `{report['template']}` (each option scored against the image; the highest wins)",
              "- accuracy over answered questions; chance: the mean of 1 / options over the same questions", ""]
    lines += _table("Overall", ["questions"], [([report["overall"]["questions"]], report["overall"])])
    lines += _table("Per subset", ["file", "modality", "area", "task"],
                    (([name, stats["modality"], stats["area"], stats["task"]], stats)
                     for name, stats in report["by_subset"].items()))
    for group in GROUPS:
        lines += _table(f"Per {group}", [group], (([key], stats) for key, stats in report[f"by_{group}"].items()))
    lines += _table("Per number of options", ["options"],
                    (([key], stats) for key, stats in report["by_options"].items()))
    lines += _listing("Missing images", report["missing_images"], ("file", "index", "id", "image"))
    lines += _listing("Unreadable images", report["unreadable_images"], ("file", "index", "id", "reason"))
    lines += _listing("Skipped records", report["skipped_records"], ("file", "index", "id", "reason"))
    lines += _listing("Answer text disagreeing with the lettered option", report["answer_disagrees"],
                      ("file", "index", "id", "answer", "option"))
    return "\n".join(lines)


def write_predictions(path: Path, outcomes: Sequence[Outcome]) -> None:
    with atomic_write(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "index", "id", "status", "options", "answer", "predicted", "correct", "chance",
                         "scores", "image"])
        for outcome in outcomes:
            question = outcome.question
            writer.writerow([question.file.name, question.index, question.id, outcome.status,
                             json.dumps(list(question.options), ensure_ascii=False), LETTERS[question.answer],
                             "" if outcome.predicted is None else LETTERS[outcome.predicted], int(outcome.correct),
                             f"{question.chance:.6f}", json.dumps([round(s, 6) for s in outcome.scores]),
                             question.image])


def write_med_mat_report(report: dict[str, Any], outcomes: Sequence[Outcome], out_dir: str | Path) -> dict[str, Path]:
    """``med_mat.json``, ``med_mat.md`` and ``med_mat_predictions.csv`` (one row per question) in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "med_mat.json", "md": out_dir / "med_mat.md",
             "predictions": out_dir / "med_mat_predictions.csv"}
    write_json_atomic(paths["json"], report)
    write_text_atomic(paths["md"], render_markdown(report))
    write_predictions(paths["predictions"], outcomes)
    return paths


def evaluate_med_mat(model: EmbeddingModel, root: str | Path | None = None,
                     files: str | Path | Sequence[str | Path] | None = None, options: MedMatOptions | None = None,
                     out_dir: str | Path | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read, answer and report (written to ``out_dir`` when given); returns the report."""
    options = options or MedMatOptions()
    check_option_template(options.template)  # before reading thousands of records
    data = read_med_mat(root, files, options.limit, options.allow_outside_root)
    outcomes = answer_questions(model, data.questions, options)
    report = summarise(data, outcomes, options.template,
                       {"root": str(root) if root is not None else None, **(extra or {})})
    if out_dir is not None:
        paths = write_med_mat_report(report, outcomes, out_dir)
        log.info("Med-MAT report written to %s", paths["md"])
    return report


def render_summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal: overall and per subset."""
    overall = report["overall"]
    lines = [f"Med-MAT: {overall['answered']} answered of {overall['questions']} questions, accuracy "
             f"{_number(overall['accuracy'])} (chance {_number(overall['chance'])}); "
             f"{overall['missing_images']} image(s) missing, {overall['unreadable_images']} unreadable, "
             f"{overall['skipped_records']} record(s) skipped"]
    for name, stats in report["by_subset"].items():
        lines.append(f"  {name:28s} {stats['modality']:6s} {stats['area']:10s} n={stats['answered']:<6d} "
                     f"accuracy {_number(stats['accuracy'])}  chance {_number(stats['chance'])}")
    return "\n".join(lines)
