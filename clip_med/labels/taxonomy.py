"""The label taxonomy shared by every source, the trainer and the classifiers.

Two tasks: ``modality`` (how the image was acquired) and ``anatomy`` (which body region it
shows). Every label has an id (stored in shard metadata), display names (the first one is used
in training-text templates, all of them in zero-shot prompt ensembles) and aliases (strings
found in source metadata such as DICOM ``Modality`` codes or MedPix location categories).

The anatomy labels are coarse body regions chosen so that MedPix 2.0's five location
categories map onto them one to one; finer anatomy words (``knee``, ``liver``) are aliases.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from clip_med.core.errors import UnknownName

UNKNOWN = "unknown"


@dataclass(frozen=True)
class Label:
    id: str
    names: tuple[str, ...]
    aliases: tuple[str, ...] = field(default=())
    # Noun phrases with their article, as radiology text writes them ("a CT scan", "an axial MRI"):
    # the medical prompts for models pretrained elsewhere use them in place of the names.
    phrases: tuple[str, ...] = field(default=())

    @property
    def display(self) -> str:
        return self.names[0]


@dataclass(frozen=True)
class Task:
    name: str
    labels: tuple[Label, ...]
    prompt_templates: tuple[str, ...]
    # Templates in the phrasing of medical captions for models pretrained elsewhere (BiomedCLIP, ...):
    # "{}" and "{task}" are filled with the labels' phrases where they have some, else their names.
    medical_templates: tuple[str, ...] = ()

    @property
    def ids(self) -> list[str]:
        return [label.id for label in self.labels]

    def label(self, label_id: str) -> Label:
        for label in self.labels:
            if label.id == label_id:
                return label
        raise UnknownName(f"unknown {self.name} label {label_id!r}; known: {', '.join(self.ids)}")


MODALITY = Task(
    name="modality",
    labels=(
        Label("ct", ("CT", "computed tomography", "CT scan"),
              ("ct", "cta", "tac", "computed tomography", "ct scan", "cbct", "hrct"),
              ("a CT scan", "an axial CT image", "a computed tomography image")),
        Label("mr", ("MRI", "MR", "magnetic resonance imaging"),
              ("mr", "mri", "mra", "magnetic resonance", "magnetic resonance imaging", "mrcp"),
              ("an MRI", "an axial MRI", "an MR image", "a magnetic resonance image")),
        Label("xray", ("X-ray", "radiograph", "plain film"),
              ("cr", "dx", "dr", "xr", "px", "io", "x-ray", "xray", "radiograph", "radiography", "plain film"),
              ("an X-ray", "a radiograph", "a plain film")),
        Label("ultrasound", ("ultrasound", "sonography", "US"),
              ("us", "ivus", "ultrasound", "sonography", "ultrasonography"),
              ("an ultrasound image", "a sonogram", "an ultrasound scan")),
        Label("pet", ("PET", "positron emission tomography"), ("pt", "pet", "pet-ct", "pet/ct"),
              ("a PET scan", "a PET image", "a positron emission tomography image")),
        Label(
            "nuclear_medicine",
            ("nuclear medicine scintigraphy", "scintigraphy", "SPECT"),
            ("nm", "st", "scintigraphy", "spect", "nuclear medicine"),
            ("a nuclear medicine scan", "a scintigraphy image", "a SPECT image"),
        ),
        Label("angiography", ("angiography", "angiogram"), ("xa", "dsa", "angiography", "angiogram"),
              ("an angiogram", "an angiography image", "a digital subtraction angiogram")),
        Label("mammography", ("mammography", "mammogram"), ("mg", "mammography", "mammogram"),
              ("a mammogram", "a mammography image")),
        Label("fluoroscopy", ("fluoroscopy", "fluoroscopic image"), ("rf", "fluoroscopy"),
              ("a fluoroscopy image", "a fluoroscopic image")),
    ),
    # "{anatomy}" is filled with each body region (see clip_med.eval.zero_shot.label_prompts).
    prompt_templates=(
        "{} image of the {anatomy}.",
        "{} image.",
        "a {} scan.",
        "a medical {} image.",
    ),
    medical_templates=(
        "{} of the {anatomy}.",  # "a CT scan of the brain.", "an axial MRI of the abdomen."
        "{} showing the {anatomy}.",
        "{}.",
    ),
)

ANATOMY = Task(
    name="anatomy",
    labels=(
        Label("head", ("head", "brain", "skull"),
              ("head", "brain", "skull", "head and neck", "headneck", "head neck", "iac", "orbit", "sinus", "jaw",
               "tmj", "face", "eye", "cranium")),
        Label("neck", ("neck", "cervical soft tissue"), ("neck", "thyroid", "larynx", "pharynx")),
        Label("thorax", ("chest", "thorax", "lungs"), ("thorax", "chest", "lung", "breast", "heart", "mediastinum")),
        Label("abdomen", ("abdomen", "abdominal organs"),
              ("abdomen", "liver", "pancreas", "spleen", "stomach", "gallbladder", "colon", "bowel")),
        Label(
            "spine_msk",
            ("spine and musculoskeletal system", "spine", "bones and joints"),
            ("spine and muscles", "spine", "musculoskeletal", "extremity", "cspine", "tspine", "lspine", "sspine",
             "lsspine", "coccyx", "sacrum", "shoulder", "elbow", "wrist", "hand", "finger", "hip", "knee", "ankle",
             "foot", "leg", "arm", "femur", "humerus", "clavicle", "scapula", "lowerlimb", "upperlimb"),
        ),
        Label(
            "urogenital",
            ("reproductive and urinary system", "pelvis", "urinary tract"),
            ("reproductive and urinary system", "genitourinary", "pelvis", "kidney", "bladder", "prostate", "uterus",
             "ovary", "testis", "scrotum", "urinary tract"),
        ),
    ),
    prompt_templates=(
        "{modality} image of the {}.",
        "an image of the {}.",
        "a scan of the {}.",
        "a radiology image of the {}.",
    ),
    medical_templates=(
        "{modality} of the {}.",  # "a CT scan of the brain.", "an X-ray of the chest."
        "a medical image of the {}.",
        "a radiology image of the {}.",
    ),
)

TASKS: dict[str, Task] = {MODALITY.name: MODALITY, ANATOMY.name: ANATOMY}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownName(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def _key(value: str) -> str:
    return re.sub(r"\s+", " ", value.strip().lower())


def normalize(task: str, value: str | None) -> str:
    """Map a metadata string (``"MR"``, ``"Spine and Muscles"``, DICOM ``"CR"``) to a label id.

    Returns :data:`UNKNOWN` rather than guessing when nothing matches.
    """
    if value is None or not str(value).strip():
        return UNKNOWN
    key = _key(str(value))
    for label in get_task(task).labels:
        if key == label.id or key in label.aliases:
            return label.id
    return UNKNOWN


def display_name(task: str, label_id: str) -> str:
    if label_id == UNKNOWN:
        return ""
    return get_task(task).label(label_id).display
