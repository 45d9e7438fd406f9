"""clip_med.core.io.atomic_write: the one way files are published (temporary, fsync, rename)."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest

import clip_med
from clip_med.core import io as cio
from clip_med.core.io import atomic_write, temporaries, temporary_target, write_json_atomic, write_text_atomic

PACKAGE = Path(clip_med.__file__).parent


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_binary_text_and_json_writes(tmp_path):
    with atomic_write(tmp_path / "a.bin") as handle:
        handle.write(b"\x00\x01")
    with atomic_write(tmp_path / "a.csv", "w", newline="") as handle:
        handle.write("x,é\r\n")
    write_json_atomic(tmp_path / "a.json", {"b": 1, "a": "é"})
    write_text_atomic(tmp_path / "a.txt", "hello\n")
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "a.csv").read_bytes() == "x,é\r\n".encode()
    written = (tmp_path / "a.json").read_text(encoding="utf-8")
    assert json.loads(written) == {"a": "é", "b": 1} and written.index('"a"') < written.index('"b"') and "é" in written
    assert (tmp_path / "a.txt").read_text() == "hello\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "a.csv", "a.json", "a.txt"]


def test_the_temporary_sits_beside_the_destination_with_a_recognisable_name(tmp_path):
    with atomic_write(tmp_path / "step-00000003.pt") as handle:
        handle.write(b"x")
        [tmp] = [p for p in tmp_path.iterdir()]
        assert re.fullmatch(r"\.step-00000003\.pt\.[0-9a-f]{8}\.tmp", tmp.name)
        assert temporary_target(tmp.name) == "step-00000003.pt"
        assert temporaries(tmp_path, "step-*.pt") == [tmp]
        assert not (tmp_path / "step-00000003.pt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000003.pt"]
    assert temporary_target("train-000006.tar.tmp") == "train-000006.tar"  # earlier versions' names
    assert temporary_target("train-000006.tar") is None


@pytest.mark.parametrize("mode", ["wb", "w", "path"])
def test_an_exception_leaves_the_old_file_untouched_and_no_temporary(tmp_path, mode):
    path = tmp_path / "report.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(path, mode) as target:
            if mode == "path":
                target.write_text("half")
            else:
                target.write(b"half" if mode == "wb" else "half")
            raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_failing_fsync_leaves_the_old_file_untouched(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    path.write_text("old")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cio.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_json_atomic(path, {"new": True})
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_a_path_for_libraries_that_write_by_name(tmp_path):
    faiss = pytest.importorskip("faiss")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    from safetensors.numpy import load_file, save_file

    index = faiss.IndexFlatIP(4)
    index.add(np.eye(4, dtype=np.float32))
    with atomic_write(tmp_path / "index.faiss", "path") as tmp:
        assert tmp.parent == tmp_path and not tmp.name.endswith(".faiss")
        faiss.write_index(index, str(tmp))
    with atomic_write(tmp_path / "head.safetensors", "path") as tmp:
        save_file({"w": np.ones(3, np.float32)}, str(tmp))
    with atomic_write(tmp_path / "part.parquet", "path") as tmp:
        pq.write_table(pa.table({"a": [1, 2]}), tmp)
    with atomic_write(tmp_path / "vectors.npy", "wb") as handle:  # np.save on a path would add ".npy"
        np.save(handle, np.arange(3))
    assert faiss.read_index(str(tmp_path / "index.faiss")).ntotal == 4
    assert load_file(str(tmp_path / "head.safetensors"))["w"].tolist() == [1, 1, 1]
    assert pq.read_table(tmp_path / "part.parquet").column("a").to_pylist() == [1, 2]
    assert np.load(tmp_path / "vectors.npy").tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.safetensors", "index.faiss", "part.parquet",
                                                          "vectors.npy"]


def test_a_missing_temporary_is_an_error_not_a_silent_success(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic_write(tmp_path / "a.npy", "path") as tmp:
            np.save(tmp, np.arange(3))  # writes <tmp>.npy, and removes nothing
            tmp.unlink()
    assert not (tmp_path / "a.npy").exists()


@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_get_the_umask_permissions_not_0600(tmp_path, umask, expected):
    from safetensors.numpy import save_file

    old = os.umask(umask)
    try:
        with atomic_write(tmp_path / "a.bin") as handle:
            handle.write(b"x")
        with atomic_write(tmp_path / "b.safetensors", "path") as tmp:
            save_file({"w": np.ones(2, np.float32)}, str(tmp))
        write_text_atomic(tmp_path / "c.txt", "x")
    finally:
        os.umask(old)
    for name in ("a.bin", "b.safetensors", "c.txt"):
        assert _mode(tmp_path / name) == expected, name


def test_export_shards_and_manifests_are_readable_by_others_under_umask_022(tmp_path, umask_022):
    """An export in a shared folder must be readable by other users (safetensors alone creates 0600)."""
    import torch
    from helpers import tiny_train_config, write_png

    from clip_med.data.record import Record
    from clip_med.data.writer import ShardConfig, write_split
    from clip_med.modeling.export import ExportConfig, export_checkpoint
    from clip_med.modeling.factory import create_model
    from clip_med.training.checkpoint import rng_state, save_checkpoint
    from clip_med.training.state import TrainState, checkpoint_payload

    (tmp_path / "images").mkdir()
    records = []
    for index in range(3):
        path = write_png(tmp_path / "images" / f"{index}.png", size=(32, 32), mode="L", seed=index)
        records.append(Record(id=f"r{index}", split="train", image=str(path), caption=f"scan {index}",
                              text=f"scan {index}"))
    out = tmp_path / "shards"
    write_split(records, "train", out, ShardConfig(workers=0, progress=False, max_samples=2), "test")
    published = sorted(out.glob("train-*.tar")) + [out / "train.manifest.json"]
    assert len(published) == 3
    for path in published:
        assert _mode(path) == 0o644, path.name

    cfg = tiny_train_config(tmp_path)
    bundle = create_model(cfg.model, "cpu")
    meta = {"model_name": bundle.name, "model_cfg": bundle.model_cfg, "config": dataclasses.asdict(cfg),
            "world_size": 1, "workers": 0, "batch_size": 16, "accum_freq": 1}
    optimizer = torch.optim.AdamW(bundle.model.parameters())
    payload = checkpoint_payload(bundle.model, optimizer, None, TrainState(step=1), [rng_state()], meta)
    checkpoint = save_checkpoint(payload, tmp_path / "run", 1, keep_last=1)
    assert _mode(checkpoint) == 0o644
    export = export_checkpoint(ExportConfig(checkpoint=str(checkpoint), out=str(tmp_path / "export"), verify=False))
    files = sorted(export.iterdir())
    assert "open_clip_model.safetensors" in [p.name for p in files]
    for path in files:
        assert _mode(path) == 0o644, path.name


# ---------------------------------------------------------------------------------------------
# No hand-written variant comes back


FORBIDDEN_CALLS = {"replace", "rename", "renames", "fsync", "fdatasync"}


def hand_written_durable_writes(source: str) -> list[str]:
    """``os.replace`` / ``os.rename`` / ``os.fsync`` / ``os.fdatasync`` (also imported from ``os``) and
    hand-made ``".tmp"`` names: everything that belongs in clip_med.core.io."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_CALLS and isinstance(node.value, ast.Name)
                and node.value.id == "os"):
            problems.append(f"{node.lineno}: os.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            problems += [f"{node.lineno}: from os import {alias.name}" for alias in node.names
                         if alias.name in FORBIDDEN_CALLS]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and re.search(r"\.tmp\b", node.value):
            problems.append(f"{node.lineno}: temporary name {node.value!r}")
    return problems


def test_no_module_but_core_io_renames_or_fsyncs():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "core" / "io.py":
            continue
        found += [f"{path.relative_to(PACKAGE.parent)}:{problem}"
                  for problem in hand_written_durable_writes(path.read_text(encoding="utf-8"))]
    assert found == [], "write these through clip_med.core.io.atomic_write / append_text"


def test_the_check_sees_a_hand_written_variant():
    source = ("import os\nfrom os import fsync\n"
              "def save(path, data):\n    tmp = path + '.tmp'\n    with open(tmp, 'w') as f:\n"
              "        f.write(data)\n        os.fsync(f.fileno())\n    os.replace(tmp, path)\n")
    assert len(hand_written_durable_writes(source)) == 4
    assert hand_written_durable_writes("x = 'a'.replace('b', 'c')\n") == []
    assert hand_written_durable_writes((PACKAGE / "core" / "io.py").read_text(encoding="utf-8"))  # it does see io.py
