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

UNKNOWN = "unknown"


@dataclass(frozen=True)
class Label:
    id: str
    names: tuple[str, ...]
    aliases: tuple[str, ...] = field(default=())

    @property
    def display(self) -> str:
        return self.names[0]


@dataclass(frozen=True)
class Task:
    name: str
    labels: tuple[Label, ...]
    prompt_templates: tuple[str, ...]

    @property
    def ids(self) -> list[str]:
        return [label.id for label in self.labels]

    def label(self, label_id: str) -> Label:
        for label in self.labels:
            if label.id == label_id:
                return label
        raise KeyError(f"unknown {self.name} label {label_id!r}; known: {', '.join(self.ids)}")


MODALITY = Task(
    name="modality",
    labels=(
        Label("ct", ("CT", "computed tomography", "CT scan"), ("ct", "cta", "tac", "computed tomography")),
        Label("mr", ("MRI", "MR", "magnetic resonance imaging"), ("mr", "mri", "mra", "magnetic resonance")),
        Label("xray", ("X-ray", "radiograph", "plain film"), ("cr", "dx", "dr", "xr", "x-ray", "radiograph")),
        Label("ultrasound", ("ultrasound", "sonography", "US"), ("us", "ultrasound", "sonography")),
        Label("pet", ("PET", "positron emission tomography"), ("pt", "pet", "pet-ct", "pet/ct")),
        Label(
            "nuclear_medicine",
            ("nuclear medicine scintigraphy", "scintigraphy", "SPECT"),
            ("nm", "st", "scintigraphy", "spect", "nuclear medicine"),
        ),
        Label("angiography", ("angiography", "angiogram"), ("xa", "dsa", "angiography")),
        Label("mammography", ("mammography", "mammogram"), ("mg", "mammography")),
        Label("fluoroscopy", ("fluoroscopy", "fluoroscopic image"), ("rf", "fluoroscopy")),
    ),
    prompt_templates=(
        "{} image.",
        "a {} scan.",
        "a {} image of the patient.",
        "a medical {} image.",
        "{} image of the body.",
    ),
)

ANATOMY = Task(
    name="anatomy",
    labels=(
        Label("head", ("head", "brain", "skull"), ("head", "brain", "skull", "head and neck")),
        Label("neck", ("neck", "cervical soft tissue"), ("neck",)),
        Label("thorax", ("chest", "thorax", "lungs"), ("thorax", "chest", "lung", "breast")),
        Label("abdomen", ("abdomen", "abdominal organs"), ("abdomen",)),
        Label(
            "spine_msk",
            ("spine and musculoskeletal system", "spine", "bones and joints"),
            ("spine and muscles", "spine", "musculoskeletal", "extremity"),
        ),
        Label(
            "urogenital",
            ("reproductive and urinary system", "pelvis", "urinary tract"),
            ("reproductive and urinary system", "genitourinary", "pelvis"),
        ),
    ),
    prompt_templates=(
        "an image of the {}.",
        "a scan of the {}.",
        "a radiology image of the {}.",
        "a medical image showing the {}.",
        "{} imaging.",
    ),
)

TASKS: dict[str, Task] = {MODALITY.name: MODALITY, ANATOMY.name: ANATOMY}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


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


def prompts_for(task: str, labels: list[str], templates: list[str] | None = None) -> dict[str, list[str]]:
    """The default prompt ensemble: every display name of a label in every template."""
    task_def = get_task(task)
    templates = list(templates or task_def.prompt_templates)
    prompts = {}
    for label_id in labels:
        names = task_def.label(label_id).names
        prompts[label_id] = [template.format(name) for template in templates for name in names]
    return prompts
