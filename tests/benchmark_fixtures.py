"""Tiny benchmark sets in their exact published layouts (MedMNIST, PCam, LC25000, RSNA, CheXpert, MIMIC-CXR).

Images carry their class in their pixels (a class-dependent brightness and pattern), so that a
linear probe on even an untrained model's embeddings has something to find.
"""

from __future__ import annotations

import csv
import gzip
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.data import get_testdata_file


def class_image(label: int, seed: int, size: int = 28, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.full((size, size), 40 + 50 * label, dtype=np.float64)
    base[:: 2 + label % 3, :] += 60
    noise = rng.normal(0, 10, (size, size))
    image = np.clip(base + noise, 0, 255).astype(np.uint8)
    if channels == 1:
        return image
    tints = np.array([0, 12, -12]) * (1 if label % 2 else -1)  # colour, as in stained tissue
    return np.clip(image[:, :, None].astype(np.int64) + tints, 0, 255).astype(np.uint8)


def make_medmnist(root: Path, subset: str = "pathmnist", counts: dict[str, int] | None = None, n_classes: int = 9,
                  channels: int = 3, multilabel: int = 0, size: int = 28, compressed: bool = True) -> Path:
    """``<root>/<subset>.npz`` (or ``_<size>.npz``) with MedMNIST's arrays; ``multilabel``: label columns
    (0: one class per image)."""
    counts = counts or {"train": 18, "val": 6, "test": 9}
    arrays = {}
    seed = 0
    for split, count in counts.items():
        images, labels = [], []
        for row in range(count):
            seed += 1
            if multilabel:
                label = np.array([(row + column) % 3 == 0 for column in range(multilabel)], dtype=np.uint8)
                images.append(class_image(int(label[0]), seed, size, channels))
            else:
                label = np.array([row % n_classes], dtype=np.uint8)
                images.append(class_image(int(label[0]), seed, size, channels))
            labels.append(label)
        arrays[f"{split}_images"] = np.stack(images)
        arrays[f"{split}_labels"] = np.stack(labels)
    root.mkdir(parents=True, exist_ok=True)
    path = root / (f"{subset}.npz" if size == 28 else f"{subset}_{size}.npz")
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def make_pcam(root: Path, counts: dict[str, int] | None = None, meta: bool = True) -> Path:
    import h5py

    root.mkdir(parents=True, exist_ok=True)
    for split, count in (counts or {"train": 12, "valid": 4, "test": 6}).items():
        labels = np.array([row % 2 for row in range(count)], dtype=np.uint8)
        images = np.stack([class_image(int(label), row, 96) for row, label in enumerate(labels)])
        prefix = root / f"camelyonpatch_level_2_split_{split}"
        with h5py.File(f"{prefix}_x.h5", "w") as handle:
            handle.create_dataset("x", data=images, chunks=(1, 96, 96, 3), compression="gzip")
        with h5py.File(f"{prefix}_y.h5", "w") as handle:
            handle.create_dataset("y", data=labels.reshape(-1, 1, 1, 1))
        if meta:
            with open(f"{prefix}_meta.csv", "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["", "coord_y", "coord_x", "tumor_patch", "center_tumor_patch", "wsi"])
                for row, label in enumerate(labels):
                    writer.writerow([row, 0, 0, bool(label), bool(label), f"camelyon16_train_{row // 3:03d}"])
    return root


LC25000_FOLDERS = {"colon_aca": "colonca", "colon_n": "colonn", "lung_aca": "lungaca", "lung_n": "lungn",
                   "lung_scc": "lungscc"}


def make_lc25000(root: Path, per_class: int = 6) -> Path:
    """``<root>/lung_colon_image_set/{colon,lung}_image_sets/<class>/<prefix><n>.jpeg``."""
    for label, (folder, prefix) in enumerate(LC25000_FOLDERS.items()):
        organ = folder.split("_")[0]
        target = root / "lung_colon_image_set" / f"{organ}_image_sets" / folder
        target.mkdir(parents=True, exist_ok=True)
        for number in range(1, per_class + 1):
            Image.fromarray(class_image(label, 100 * label + number, 32)).save(target / f"{prefix}{number}.jpeg",
                                                                                 quality=95)
    return root


def make_rsna(root: Path, patients: int = 10) -> Path:
    """``stage_2_train_labels.csv`` (two box rows for each pneumonia patient) and ``stage_2_train_images/*.dcm``."""
    import pydicom

    images = root / "stage_2_train_images"
    images.mkdir(parents=True)
    source = get_testdata_file("CT_small.dcm")
    rows = []
    for number in range(patients):
        patient = f"00{number:02d}a1b2-c3d4-4e5f-8a9b-0c1d2e3f4a{number:02d}"
        dataset = pydicom.dcmread(source)
        dataset.PatientID = patient
        dataset.save_as(images / f"{patient}.dcm")
        if number % 2:
            rows += [[patient, 264.0, 152.0, 213.0, 379.0, 1], [patient, 562.0, 152.0, 256.0, 453.0, 1]]
        else:
            rows.append([patient, "", "", "", "", 0])
    with open(root / "stage_2_train_labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patientId", "x", "y", "width", "height", "Target"])
        writer.writerows(rows)
    return root


CHEXPERT_COLUMNS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                    "Pleural Other", "Fracture", "Support Devices"]
# Cells cycled through the label columns: positive, negative, uncertain, blank.
CELLS = ["1.0", "0.0", "-1.0", ""]


def chexpert_cells(row: int) -> list[str]:
    return [CELLS[(row + column) % 4] for column in range(len(CHEXPERT_COLUMNS))]


def make_chexpert(root: Path, counts: dict[str, int] | None = None) -> Path:
    """``<root>`` = ``CheXpert-v1.0-small`` with train.csv / valid.csv, paths starting with that folder name."""
    root.mkdir(parents=True, exist_ok=True)
    for split, count in (counts or {"train": 8, "valid": 4}).items():
        with open(root / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_COLUMNS])
            for row in range(count):
                view = "lateral" if row % 4 == 3 else "frontal"
                relative = Path(split) / f"patient{row // 2:05d}" / "study1" / f"view1_{view}.jpg"
                image = root / relative
                image.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(class_image(row % 2, row, 32, channels=1)).save(image)
                writer.writerow([f"{root.name}/{relative.as_posix()}", "Female", 60, view.capitalize(),
                                 "AP" if view == "frontal" else "", *chexpert_cells(row)])
    return root


def make_mimic(root: Path, studies: int = 6) -> Path:
    """MIMIC-CXR-JPG: the three gzipped tables and ``files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg``."""
    root.mkdir(parents=True, exist_ok=True)
    labels, split_rows, metadata = [], [], []
    for number in range(studies):
        subject, study = f"1{number:07d}", f"5{number:07d}"
        labels.append([subject, study, *chexpert_cells(number)])
        for view in ("PA", "LATERAL"):
            dicom = f"{number:08x}-{'0000000a' if view == 'PA' else '0000000b'}"
            split = "test" if number % 3 == 2 else "train"
            split_rows.append([dicom, study, subject, split])
            metadata.append([dicom, subject, study, view])
            image = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"
            image.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(class_image(number % 2, number, 32, channels=1)).save(image)
    for kind, header, rows in (("chexpert", ["subject_id", "study_id", *CHEXPERT_COLUMNS], labels),
                               ("split", ["dicom_id", "study_id", "subject_id", "split"], split_rows),
                               ("metadata", ["dicom_id", "subject_id", "study_id", "ViewPosition"], metadata)):
        with gzip.open(root / f"mimic-cxr-2.0.0-{kind}.csv.gz", "wt", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)
    return root


def copy_ct(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(get_testdata_file("CT_small.dcm"), target)
    return target
