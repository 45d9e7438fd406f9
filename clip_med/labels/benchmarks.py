"""Class names and medical prompts of the benchmark sets medical CLIP papers report.

Each set's classes form a task of their own (a :class:`~clip_med.labels.taxonomy.Task`, the type
of the taxonomy's ``modality`` and ``anatomy``): label ids (what records and shards store),
display names and synonyms (the prompt ensemble uses them as the taxonomy's), and prompt
templates (``{}`` is a class name). :func:`find_task` looks a task up in the taxonomy first,
then here, so zero-shot evaluation and ``classify`` build these sets' prompts like the
taxonomy's.

Multi-label sets (CheXpert, MIMIC-CXR, ChestMNIST) are one binary task per finding, labels
``negative`` and ``positive``, so that each finding is scored on its own (per-label AUROC) and
an uncertain or missing value simply leaves that finding unknown for the image.

MedMNIST's class names are those of ``medmnist.INFO`` (v2/v3, github.com/MedMNIST/MedMNIST),
written here so that clip_med does not depend on the package.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from clip_med.labels import taxonomy
from clip_med.labels.taxonomy import Label, Task

NEGATIVE, POSITIVE = "negative", "positive"

HISTOLOGY = ("a histopathology image of {}.", "an H&E stained tissue image showing {}.", "histology: {}.")
CYTOLOGY = ("a microscopy image of a {}.", "a blood smear image of a {}.", "a {} cell.")
DERMOSCOPY = ("a dermoscopy image of {}.", "a skin lesion showing {}.", "a close-up photo of {}.")
RETINAL_OCT = ("an optical coherence tomography image of the retina showing {}.", "a retinal OCT scan: {}.",
               "OCT: {}.")
FUNDUS = ("a retinal fundus photograph with {}.", "a fundus image showing {}.", "fundus: {}.")
BREAST_US = ("a breast ultrasound image of a {} lesion.", "a breast ultrasound showing {}.", "ultrasound: {}.")
CHEST_XRAY = ("a chest X-ray showing {}.", "a chest radiograph with {}.", "chest X-ray: {}.")
KIDNEY_HISTOLOGY = ("a microscopy image of kidney tissue showing {}.", "a kidney cortex cell of the {}.",
                    "kidney histology: {}.")
ABDOMINAL_CT = ("an abdominal CT image of the {}.", "a CT scan showing the {}.", "CT: {}.")


def label_id(name: str) -> str:
    """A label id from a published class name: lower case, words joined by ``_``."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _task(name: str, templates: Sequence[str], classes: Sequence[tuple[str, ...]]) -> Task:
    """``classes``: per class, its published name, then more names for the prompts (the first of them,
    or the published name, is its display name)."""
    labels = []
    for published, *names in classes:
        labels.append(Label(label_id(published), tuple(names) or (published,), (published.lower(),)))
    return Task(name=name, labels=tuple(labels), prompt_templates=tuple(templates))


@dataclass(frozen=True)
class MedMnistSubset:
    """One MedMNIST 2D subset: its INFO class names (in label order), whether it is multi-label, the
    number of image channels and the imaging family the suite groups it under."""

    name: str
    classes: tuple[str, ...]
    modality: str
    channels: int
    multilabel: bool = False

    @property
    def task(self) -> str:
        return self.name


# Findings of chest X-ray label sets: id -> (CheXpert / ChestX-ray14 column names, prompt names).
CHEST_FINDINGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "no_finding": (("No Finding",), ("no finding", "a normal chest")),
    "enlarged_cardiomediastinum": (("Enlarged Cardiomediastinum",), ("an enlarged cardiomediastinum",
                                                                     "a widened mediastinum")),
    "cardiomegaly": (("Cardiomegaly", "cardiomegaly"), ("cardiomegaly", "an enlarged heart")),
    "lung_opacity": (("Lung Opacity",), ("a lung opacity", "an airspace opacity")),
    "lung_lesion": (("Lung Lesion",), ("a lung lesion", "a pulmonary nodule or mass")),
    "edema": (("Edema", "edema"), ("pulmonary edema", "edema")),
    "consolidation": (("Consolidation", "consolidation"), ("consolidation", "lung consolidation")),
    "pneumonia": (("Pneumonia", "pneumonia"), ("pneumonia",)),
    "atelectasis": (("Atelectasis", "atelectasis"), ("atelectasis", "collapsed lung tissue")),
    "pneumothorax": (("Pneumothorax", "pneumothorax"), ("pneumothorax", "air in the pleural space")),
    "pleural_effusion": (("Pleural Effusion", "effusion"), ("a pleural effusion", "fluid in the pleural space")),
    "pleural_other": (("Pleural Other",), ("a pleural abnormality", "pleural thickening")),
    "fracture": (("Fracture",), ("a fracture", "a rib fracture")),
    "support_devices": (("Support Devices",), ("support devices", "a tube or line")),
    "infiltration": (("infiltration",), ("an infiltration", "a pulmonary infiltrate")),
    "mass": (("mass",), ("a mass", "a lung mass")),
    "nodule": (("nodule",), ("a nodule", "a lung nodule")),
    "emphysema": (("emphysema",), ("emphysema", "hyperinflated lungs")),
    "fibrosis": (("fibrosis",), ("fibrosis", "pulmonary fibrosis")),
    "pleural_thickening": (("pleural",), ("pleural thickening", "a thickened pleura")),
    "hernia": (("hernia",), ("a hernia", "a hiatal hernia")),
}
CHEXPERT_FINDINGS = ["no_finding", "enlarged_cardiomediastinum", "cardiomegaly", "lung_opacity", "lung_lesion",
                     "edema", "consolidation", "pneumonia", "atelectasis", "pneumothorax", "pleural_effusion",
                     "pleural_other", "fracture", "support_devices"]
# ChestMNIST (NIH ChestX-ray14) label columns, in INFO's order.
CHESTMNIST_FINDINGS = ["atelectasis", "cardiomegaly", "pleural_effusion", "infiltration", "mass", "nodule",
                       "pneumonia", "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis",
                       "pleural_thickening", "hernia"]


def _finding_task(finding: str) -> Task:
    names = CHEST_FINDINGS[finding][1]
    bare = re.sub(r"^(a|an) ", "", names[0])
    absent = ("an abnormal finding",) if finding == "no_finding" else (f"no {bare}",)
    return Task(name=finding, labels=(Label(NEGATIVE, absent, ("0", "0.0", "false")),
                                      Label(POSITIVE, names, ("1", "1.0", "true"))),
                prompt_templates=CHEST_XRAY)


ORGANS = ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver", "lung-left",
          "lung-right", "pancreas", "spleen")
_ORGAN_CLASSES = tuple((organ, organ.replace("-left", " (left)").replace("-right", " (right)")) for organ in ORGANS)

MEDMNIST_SUBSETS: dict[str, MedMnistSubset] = {subset.name: subset for subset in (
    MedMnistSubset("pathmnist", ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                                 "normal colon mucosa", "cancer-associated stroma",
                                 "colorectal adenocarcinoma epithelium"), "pathology", 3),
    MedMnistSubset("chestmnist", tuple(CHESTMNIST_FINDINGS), "radiology", 1, multilabel=True),
    MedMnistSubset("dermamnist", ("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                                  "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
                                  "vascular lesions"), "dermatology", 3),
    MedMnistSubset("octmnist", ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
                   "ophthalmology", 1),
    MedMnistSubset("pneumoniamnist", ("normal", "pneumonia"), "radiology", 1),
    MedMnistSubset("retinamnist", ("0", "1", "2", "3", "4"), "ophthalmology", 3),
    MedMnistSubset("breastmnist", ("malignant", "normal, benign"), "radiology", 1),
    MedMnistSubset("bloodmnist", ("basophil", "eosinophil", "erythroblast",
                                  "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "lymphocyte",
                                  "monocyte", "neutrophil", "platelet"), "pathology", 3),
    MedMnistSubset("tissuemnist", ("Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
                                   "Glomerular endothelial cells", "Interstitial endothelial cells", "Leukocytes",
                                   "Podocytes", "Proximal Tubule Segments", "Thick Ascending Limb"), "pathology", 1),
    MedMnistSubset("organamnist", ORGANS, "radiology", 1),
    MedMnistSubset("organcmnist", ORGANS, "radiology", 1),
    MedMnistSubset("organsmnist", ORGANS, "radiology", 1),
)}

_MEDMNIST_TASKS = (
    _task("pathmnist", HISTOLOGY, (
        ("adipose", "adipose tissue", "fat tissue"), ("background", "background without tissue", "empty background"),
        ("debris", "debris", "necrotic debris"), ("lymphocytes", "lymphocytes", "immune cells"),
        ("mucus", "mucus",), ("smooth muscle", "smooth muscle", "muscle tissue"),
        ("normal colon mucosa", "normal colon mucosa", "healthy colon mucosa"),
        ("cancer-associated stroma", "cancer-associated stroma", "tumour stroma"),
        ("colorectal adenocarcinoma epithelium", "colorectal adenocarcinoma epithelium", "colorectal cancer"))),
    _task("dermamnist", DERMOSCOPY, (
        ("actinic keratoses and intraepithelial carcinoma", "actinic keratosis", "Bowen's disease"),
        ("basal cell carcinoma", "basal cell carcinoma"), ("benign keratosis-like lesions", "benign keratosis",
                                                          "seborrheic keratosis"),
        ("dermatofibroma", "dermatofibroma"), ("melanoma", "melanoma"), ("melanocytic nevi", "a melanocytic nevus",
                                                                         "a mole"),
        ("vascular lesions", "a vascular lesion", "an angioma"))),
    _task("octmnist", RETINAL_OCT, (
        ("choroidal neovascularization", "choroidal neovascularization"),
        ("diabetic macular edema", "diabetic macular edema"), ("drusen", "drusen"),
        ("normal", "a normal retina", "no retinal disease"))),
    _task("pneumoniamnist", CHEST_XRAY, (("normal", "normal lungs", "no pneumonia"), ("pneumonia", "pneumonia"))),
    _task("retinamnist", FUNDUS, (
        ("0", "no diabetic retinopathy"), ("1", "mild diabetic retinopathy"), ("2", "moderate diabetic retinopathy"),
        ("3", "severe diabetic retinopathy"), ("4", "proliferative diabetic retinopathy"))),
    _task("breastmnist", BREAST_US, (("malignant", "malignant", "a breast cancer"),
                                     ("normal, benign", "benign", "normal breast tissue"))),
    _task("bloodmnist", CYTOLOGY, (
        ("basophil", "basophil"), ("eosinophil", "eosinophil"), ("erythroblast", "erythroblast"),
        ("immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "immature granulocyte",
         "myelocyte"),
        ("lymphocyte", "lymphocyte"), ("monocyte", "monocyte"), ("neutrophil", "neutrophil"),
        ("platelet", "platelet", "thrombocyte"))),
    _task("tissuemnist", KIDNEY_HISTOLOGY, (
        ("Collecting Duct, Connecting Tubule", "collecting duct", "connecting tubule"),
        ("Distal Convoluted Tubule", "distal convoluted tubule"),
        ("Glomerular endothelial cells", "glomerular endothelial cells"),
        ("Interstitial endothelial cells", "interstitial endothelial cells"), ("Leukocytes", "leukocytes"),
        ("Podocytes", "podocytes"), ("Proximal Tubule Segments", "proximal tubule"),
        ("Thick Ascending Limb", "thick ascending limb"))),
    *(_task(name, ABDOMINAL_CT, _ORGAN_CLASSES) for name in ("organamnist", "organcmnist", "organsmnist")),
)

LC25000_CLASSES = {
    "colon_aca": ("colon_aca", "colon adenocarcinoma", "colon cancer tissue"),
    "colon_n": ("colon_n", "benign colonic tissue", "normal colon tissue"),
    "lung_aca": ("lung_aca", "lung adenocarcinoma", "lung cancer tissue"),
    "lung_n": ("lung_n", "benign lung tissue", "normal lung tissue"),
    "lung_scc": ("lung_scc", "lung squamous cell carcinoma", "squamous cell carcinoma of the lung"),
}
# LC25000's task per organ (BiomedCLIP reports lung and colon apart); None: all five classes.
LC25000_TASKS = {None: "lc25000", "lung": "lc25000_lung", "colon": "lc25000_colon"}

_OTHER_TASKS = (
    *(_task(task, HISTOLOGY, [classes for folder, classes in LC25000_CLASSES.items()
                              if organ is None or folder.startswith(organ)])
      for organ, task in LC25000_TASKS.items()),
    _task("pcam", ("a histopathology image of lymph node tissue with {}.",
                   "an H&E stained lymph node patch showing {}.", "histology: {}."),
          (("normal", "normal tissue", "no tumour"), ("tumor", "metastatic tumour", "breast cancer metastasis"))),
    _task("rsna_pneumonia", CHEST_XRAY, (("normal", "normal lungs", "no lung opacity"),
                                         ("pneumonia", "pneumonia", "lung opacity from pneumonia"))),
)

TASKS: dict[str, Task] = {task.name: task for task in (*_MEDMNIST_TASKS, *_OTHER_TASKS,
                                                          *(_finding_task(name) for name in CHEST_FINDINGS))}


def find_task(name: str) -> Task | None:
    """The taxonomy's task of that name, else a benchmark set's, else None."""
    return taxonomy.TASKS.get(name) or TASKS.get(name)


def is_finding(name: str) -> bool:
    """Whether ``name`` is one binary finding of a multi-label set (labels negative / positive)."""
    return name in CHEST_FINDINGS


def finding_for_column(column: str) -> str | None:
    """The finding task a CheXpert / MIMIC-CXR / ChestX-ray14 label column names, if any."""
    key = column.strip().lower()
    for finding, (columns, _) in CHEST_FINDINGS.items():
        if key == finding or key in (name.lower() for name in columns):
            return finding
    return None


def caption(task: str, label: str) -> str:
    """A one-sentence caption of a class: the task's first template with the class's display name."""
    found = find_task(task)
    if found is None:
        return label.replace("_", " ")
    return found.prompt_templates[0].replace("{}", found.label(label).display)
