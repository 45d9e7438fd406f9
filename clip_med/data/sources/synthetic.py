"""A synthetic image–caption set the package generates itself (the no-download default).

Each image is a cartoon of a body region (``head``: skull ring; ``thorax``: two lungs and a
heart; ``abdomen``: liver, kidneys and bowel; ``spine_msk``: a column of vertebrae) rendered in
the intensity style of a modality (``ct``: bright bone, grey soft tissue; ``mr``: dark bone,
bright fluid, Rician-like noise; ``xray``: a blurred projection; ``ultrasound``: a speckled
fan-shaped sector). Position, size, rotation, contrast and noise vary per image, and captions
name the modality and region in varied wording, with distractor findings. Everything is
deterministic in the seed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFilter

from clip_med.core.bounds import bounded
from clip_med.data.images import ImageLimits, check_dimensions
from clip_med.data.record import Record
from clip_med.data.sources import SourceConfig, register_source
from clip_med.data.text import render_text
from clip_med.labels import taxonomy

CAPTION_TEMPLATES = (
    "{modality} of the {anatomy} showing {finding}.",
    "{finding} seen on this {modality} of the {anatomy}.",
    "{plane} {modality} image of the {anatomy}: {finding}.",
    "The {anatomy} on {modality} demonstrates {finding}.",
    "{modality}, {anatomy}. {finding}.",
)
FINDINGS = (
    "no acute abnormality", "a small nodule", "a well circumscribed mass", "mild inflammation",
    "a cystic lesion", "postoperative change", "a calcified focus", "normal appearance",
)
PLANES = ("axial", "coronal", "sagittal")
WORDING = {
    "ct": ("CT", "computed tomography", "CT scan"),
    "mr": ("MRI", "MR", "magnetic resonance imaging"),
    "xray": ("X-ray", "radiograph", "plain film"),
    "ultrasound": ("ultrasound", "sonography", "US"),
    "head": ("head", "brain", "skull"),
    "thorax": ("chest", "thorax", "lungs"),
    "abdomen": ("abdomen", "abdominal organs", "abdomen"),
    "spine_msk": ("spine", "spine and musculoskeletal system", "vertebral column"),
}


@dataclass
class SyntheticSourceConfig(SourceConfig):
    name: str = "synthetic"
    seed: int = 0
    image_size: int = bounded(96, minimum=8)
    # Number of images per split; splits are named by the keys.
    sizes: dict[str, int] = field(default_factory=lambda: {"train": 960, "dev": 240})
    modalities: list[str] = field(default_factory=lambda: ["ct", "mr", "xray", "ultrasound"])
    anatomies: list[str] = field(default_factory=lambda: ["head", "thorax", "abdomen", "spine_msk"])


# ---------------------------------------------------------------------------------------------
# Rendering: tissue maps first (0 = air, 1 = fat/soft tissue, 2 = organ, 3 = fluid, 4 = bone,
# 5 = lung), then a modality-specific intensity lookup and noise model.

_INTENSITY = {  # air, soft tissue, organ, fluid, bone, lung
    "ct": (0.0, 0.45, 0.55, 0.35, 1.0, 0.08),
    "mr": (0.02, 0.6, 0.45, 0.95, 0.08, 0.05),
    "xray": (0.0, 0.35, 0.4, 0.35, 0.95, 0.12),
    "ultrasound": (0.0, 0.5, 0.35, 0.05, 0.95, 0.15),
}


def _ellipse(grid, cx, cy, rx, ry, angle=0.0):
    x, y = grid
    cos, sin = np.cos(angle), np.sin(angle)
    u = ((x - cx) * cos + (y - cy) * sin) / rx
    v = (-(x - cx) * sin + (y - cy) * cos) / ry
    return u * u + v * v <= 1.0


def _tissue_map(anatomy: str, size: int, rng: np.random.Generator) -> np.ndarray:
    coords = np.linspace(-1, 1, size)
    grid = np.meshgrid(coords, coords)
    angle = rng.uniform(-0.25, 0.25)
    cx, cy = rng.uniform(-0.08, 0.08, 2)
    scale = rng.uniform(0.8, 1.0)
    tissue = np.zeros((size, size), dtype=np.uint8)

    def put(label, dx, dy, rx, ry, extra_angle=0.0):
        tissue[_ellipse(grid, cx + dx * scale, cy + dy * scale, rx * scale, ry * scale, angle + extra_angle)] = label

    if anatomy == "head":
        put(4, 0, 0, 0.78, 0.9)
        put(1, 0, 0, 0.7, 0.82)
        put(2, 0, 0, 0.62, 0.74)
        put(3, -0.12, -0.05, 0.07, 0.22, 0.2)
        put(3, 0.12, -0.05, 0.07, 0.22, -0.2)
    elif anatomy == "thorax":
        put(1, 0, 0, 0.92, 0.62)
        put(5, -0.42, -0.02, 0.32, 0.45)
        put(5, 0.42, -0.02, 0.32, 0.45)
        put(2, 0.08, 0.12, 0.22, 0.2)
        put(4, 0, 0.48, 0.08, 0.08)
    elif anatomy == "abdomen":
        put(1, 0, 0, 0.9, 0.7)
        put(2, -0.35, -0.2, 0.38, 0.28)
        put(2, -0.45, 0.3, 0.12, 0.18)
        put(2, 0.45, 0.3, 0.12, 0.18)
        put(3, 0.25, -0.1, 0.15, 0.12)
        put(4, 0, 0.52, 0.1, 0.1)
    elif anatomy == "spine_msk":
        put(1, 0, 0, 0.45, 0.98)
        for i in range(-3, 4):
            put(4, 0, i * 0.26, 0.26, 0.1)
            put(3, 0, i * 0.26 + 0.13, 0.22, 0.03)
    else:
        raise ValueError(f"the synthetic source cannot draw anatomy {anatomy!r}")
    return tissue


def _render_array(modality: str, anatomy: str, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tissue = _tissue_map(anatomy, size, rng)
    levels = np.array(_INTENSITY[modality]) * rng.uniform(0.85, 1.1)
    image = levels[tissue].astype(np.float64)
    blur = {"ct": 0.6, "mr": 1.0, "xray": 2.5, "ultrasound": 0.8}[modality]
    pil = Image.fromarray(np.clip(image * 255, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(blur))
    image = np.asarray(pil, dtype=np.float64) / 255.0
    if modality == "ct":
        image += rng.normal(0, 0.03, image.shape)
    elif modality == "mr":
        real = image + rng.normal(0, 0.05, image.shape)
        imag = rng.normal(0, 0.05, image.shape)
        image = np.sqrt(real**2 + imag**2)
    elif modality == "xray":
        ramp = np.linspace(0.0, 0.15, size)[None, :]
        image = image * 0.85 + ramp + rng.normal(0, 0.02, image.shape)
    elif modality == "ultrasound":
        image = image * rng.gamma(1.5, 1 / 1.5, image.shape)
        coords = np.linspace(-1, 1, size)
        x, y = np.meshgrid(coords, coords)
        radius, theta = np.hypot(x, y + 1), np.arctan2(x, y + 1)
        image[(radius > 1.9) | (np.abs(theta) > 0.6)] = 0.0
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def render(modality: str, anatomy: str, size: int, seed: int) -> Image.Image:
    return Image.fromarray(_render_array(modality, anatomy, size, seed), mode="L")


def render_locator(locator: str, limits: ImageLimits, max_side: int | None) -> tuple[Image.Image, None]:
    """The ``synthetic`` decoder: ``"<modality>/<anatomy>/<size>/<seed>"`` -> image."""
    modality, anatomy, size, seed = locator.split("/")
    check_dimensions(int(size), int(size), limits, f"synthetic:{locator}")
    return render(modality, anatomy, int(size), int(seed)), None


def _item_seed(seed: int, split: str, index: int) -> int:
    digest = hashlib.sha256(f"{seed}/{split}/{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _record(cfg: SyntheticSourceConfig, split: str, index: int) -> Record:
    item_seed = _item_seed(cfg.seed, split, index)
    rng = np.random.default_rng(item_seed)
    modality = cfg.modalities[index % len(cfg.modalities)]
    anatomy = cfg.anatomies[(index // len(cfg.modalities)) % len(cfg.anatomies)]
    words = {
        "modality": str(rng.choice(WORDING[modality])),
        "anatomy": str(rng.choice(WORDING[anatomy])),
        "finding": str(rng.choice(FINDINGS)),
        "plane": str(rng.choice(PLANES)),
    }
    caption = render_text(str(rng.choice(CAPTION_TEMPLATES)), words)
    caption = caption[0].upper() + caption[1:]
    fields = {"caption": caption, "modality": taxonomy.display_name("modality", modality),
              "anatomy": taxonomy.display_name("anatomy", anatomy)}
    return Record(
        id=f"synthetic_{split}_{index:06d}",
        split=split,
        image=f"{modality}/{anatomy}/{cfg.image_size}/{item_seed}",
        caption=caption,
        text=render_text(cfg.text_template or "{caption}", fields),
        labels={"modality": modality, "anatomy": anatomy},
        meta={"finding": words["finding"], "plane": words["plane"]},
        decoder="synthetic",
    )


@register_source("synthetic", SyntheticSourceConfig)
def read_synthetic(cfg: SyntheticSourceConfig) -> dict[str, list[Record]]:
    for task, values in (("modality", cfg.modalities), ("anatomy", cfg.anatomies)):
        for value in values:
            taxonomy.get_task(task).label(value)
            if value not in WORDING:
                raise ValueError(f"the synthetic source cannot draw {task} {value!r}; it knows {sorted(WORDING)}")
    return {split: [_record(cfg, split, index) for index in range(count)] for split, count in cfg.sizes.items()}
