"""Resumability under SIGKILL: a real writer process killed midway, then re-run, equals an uninterrupted run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip_med.data.manifest import load_manifest
from clip_med.data.shardset import ShardCommandConfig, shard_source
from clip_med.data.sources.generic import TableSourceConfig
from clip_med.data.writer import ShardConfig

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 300
MAX_SAMPLES = 20

SCRIPT = textwrap.dedent("""
    import sys
    from clip_med.data.shardset import ShardCommandConfig, shard_source
    from clip_med.data.sources.generic import TableSourceConfig
    from clip_med.data.writer import ShardConfig
    if __name__ == "__main__":
        table, out, workers, max_samples = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        shard_source(ShardCommandConfig(source=TableSourceConfig(path=table),
                                        shards=ShardConfig(max_samples=max_samples, workers=workers, progress=False),
                                        out=out))
""")


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    lines = ["image,caption"]
    for index in range(N_IMAGES):
        pixels = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "img" / f"{index:04d}.jpg", quality=90)
        lines.append(f"img/{index:04d}.jpg,Axial CT of the chest number {index}.")
    lines.append("img/missing.jpg,A row whose image is missing.")
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")
    return root / "pairs.csv"


@pytest.fixture(scope="module")
def reference(table, tmp_path_factory):
    """An uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    return out, _run(table, out)


def _run(table: Path, out: Path, workers: int = 0):
    cfg = ShardCommandConfig(source=TableSourceConfig(path=str(table)),
                             shards=ShardConfig(max_samples=MAX_SAMPLES, workers=workers, progress=False), out=str(out))
    return shard_source(cfg).manifests["train"]


def _keys(out: Path) -> list[str]:
    keys = []
    for shard in sorted(out.glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            keys += [member.name.split(".")[0] for member in tar.getmembers() if member.name.endswith(".json")]
    return keys


def _journal_shards(out: Path) -> int:
    journal = out / ".progress" / "train.jsonl"
    if not journal.is_file():
        return 0
    return sum('"shard": {' in line for line in journal.read_text().splitlines())


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _kill_midway(table: Path, out: Path, workers: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-c", SCRIPT, str(table), str(out), str(workers),
                                str(MAX_SAMPLES)], env=env,
                               start_new_session=True, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _journal_shards(out) < 3:
        assert process.poll() is None, f"the writer ended before it could be killed: {process.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "the writer made no progress in 120 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)  # the main writer process only, as `kill -9 <pid>` would
    process.wait()
    deadline = time.monotonic() + 30
    while _group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _group_alive(process.pid):
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("worker processes outlived the killed writer")
    assert process.returncode == -signal.SIGKILL


def test_sigkill_midway_then_rerun_equals_uninterrupted_run(table, reference, tmp_path):
    reference_dir, reference = reference
    assert reference.written_count == N_IMAGES and len(reference.shards) == N_IMAGES // MAX_SAMPLES

    out = tmp_path / "killed"
    _kill_midway(table, out, workers=2)
    assert not (out / "train.manifest.json").exists(), "the writer finished before the kill"
    assert (out / ".progress" / "train.jsonl").is_file()
    done = len(list(out.glob("train-*.tar")))
    assert 3 <= done < len(reference.shards)

    resumed = _run(table, out)
    assert _keys(out) == _keys(reference_dir)
    assert resumed.to_dict() == reference.to_dict()
    assert resumed.skipped_by_reason() == {"missing_file": 1}
    for shard in reference.shards:
        assert (out / shard.name).read_bytes() == (reference_dir / shard.name).read_bytes()
    assert not list(out.glob("*.tmp")) and not (out / ".progress" / "train.jsonl").exists()
    saved = json.loads((out / "train.manifest.json").read_text())
    assert saved["written_count"] + saved["skipped_count"] == saved["input_count"] == N_IMAGES + 1


def test_debris_of_a_kill_is_cleaned_up(table, reference, tmp_path):
    """Shards the journal does not cover (renamed just before a kill) and a half-written .tmp shard
    are deleted and redone."""
    reference_dir, reference = reference
    out = tmp_path / "out"
    shutil.copytree(reference_dir, out)
    (out / "train.manifest.json").unlink()
    (out / ".progress").mkdir(exist_ok=True)
    (out / ".progress" / "train.jsonl").write_text(json.dumps({"fingerprint": reference.fingerprint}) + "\n")
    (out / "train-000006.tar.tmp").write_bytes(b"half a tar")
    resumed = _run(table, out)
    assert resumed.to_dict() == reference.to_dict()
    assert not (out / "train-000006.tar.tmp").exists()
    assert load_manifest(out, "train").written_count == N_IMAGES
