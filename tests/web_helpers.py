"""Fixture builders for the web tests: a tiny model, synthetic shards plus one hostile shard, their embeddings."""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import uvicorn
from api_helpers import gradient, png_bytes, save_checkpoint, synthetic_shards
from PIL import Image

import clip_med
from clip_med.eval.linear_probe import fit_probe
from clip_med.eval.probe_head import ProbeHead
from clip_med.inference.extract import ExtractConfig, extract

# Markup and script in every text field of the hostile shard: the page and the API must treat it as text.
HOSTILE_CAPTION = ('<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
                   ' a CT of the head & "quotes" </td></table>')
HOSTILE_SOURCE = "<script>window.__pwned=3</script>"
HOSTILE_ID = '<b onmouseover="window.__pwned=4">evil</b>'
TOKEN = "correct-horse-battery-staple-0123456789"


@dataclass
class Archive:
    root: Path
    model: object
    head: ProbeHead
    folder: Path  # the embedding folder
    shards: list[str]
    hostile_shard: Path


def write_hostile_shard(path: Path, count: int = 3) -> Path:
    """A shard in the writer's layout whose captions, ids, sources and meta hold HTML and script."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for number in range(count):
            key = f"evil-{number:06d}"
            meta = {"id": f"{HOSTILE_ID}{number}", "source": HOSTILE_SOURCE, "split": "dev",
                    "caption": HOSTILE_CAPTION, "labels": {"modality": "ct", "anatomy": "head"},
                    "meta": {"note": '<svg onload="window.__pwned=5">', "path": "../../etc/passwd"},
                    "origin": "/etc/passwd"}
            members = {"png": png_bytes(gradient(48, 40, seed=100 + number)), "txt": HOSTILE_CAPTION.encode(),
                       "json": json.dumps(meta).encode()}
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size, info.mtime = len(data), 1_700_000_000
                tar.addfile(info, io.BytesIO(data))
    return path


def build_archive(root: Path, dev: int = 16) -> Archive:
    model = clip_med.load(save_checkpoint(root / "run"))
    shard_set = synthetic_shards(root / "shards", {"dev": dev}, max_samples=8)
    hostile = write_hostile_shard(root / "shards" / "hostile" / "dev-000000.tar")
    urls = [*shard_set.urls("dev"), str(hostile)]
    extract(model, urls, root / "out", ExtractConfig(workers=0, progress=False))
    x = model.embed_images([gradient(seed=seed) for seed in range(8)])
    head = ProbeHead.from_fitted(fit_probe(x, ["ct", "mr"] * 4, Cs=[1.0]), "modality", model.fingerprint, model.name)
    return Archive(root, model, head, root / "out", urls, hostile)


def member_image(shard: str, key: str) -> Image.Image:
    """The image member of ``key`` read straight from the tar (what the service must show)."""
    with tarfile.open(shard) as tar:
        for info in tar:
            if info.name.split(".", 1)[0] == key and info.name.rsplit(".", 1)[-1] in ("png", "jpg", "jpeg", "webp"):
                handle = tar.extractfile(info)
                assert handle is not None
                image = Image.open(io.BytesIO(handle.read()))
                image.load()
                return image
    raise KeyError(key)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"))


class Server:
    """uvicorn on a free localhost port, in a thread."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
