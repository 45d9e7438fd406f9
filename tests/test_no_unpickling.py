"""No command ever unpickles a shard member.

Shards get ``.pyd``, ``.pkl``, ``.pickle`` and ``.pth`` members planted beside their samples (one
set attached to a valid sample, one set as a sample of its own), each a real payload that
creates a marker file when it is unpickled (or ``torch.load``-ed). Every command that reads
shards then runs over them: training, evaluation, probing, embedding, search over the embedding
folder and the service's index load. No marker may appear, and every valid sample is still used.
The control test shows that the payloads do run code through webdataset's default decoder.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import pytest
import torch
from api_helpers import save_checkpoint, synthetic_shards
from fastapi.testclient import TestClient
from helpers import tiny_train_config

from clip_med.eval.datasets import ShardsData
from clip_med.eval.evaluator import EvalConfig
from clip_med.inference.commands import EmbedConfig, SearchConfig, format_search, run_embed, run_search
from clip_med.inference.evaluation import EvaluateConfig, evaluate_checkpoint
from clip_med.inference.probing import ProbeConfig, probe_checkpoint
from clip_med.inference.service import ServeConfig, build_service
from clip_med.training.trainer import train

SIZES = {"train": 16, "dev": 16}  # 8 samples per shard: 2 shards per split
SHARDS = {"train": 2, "dev": 2}
BATCH = 8
PLANTED = ("pyd", "pkl", "pickle", "pth")
PER_SHARD = 2 * len(PLANTED)  # one set next to a valid sample, one set as a sample of its own


class _Payload:
    """Unpickling this creates ``path`` (``open(path, "w")``): the stand-in for arbitrary code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _payloads(markers: Path) -> dict[str, bytes]:
    payloads = {ext: pickle.dumps(_Payload(markers / ext)) for ext in ("pyd", "pkl", "pickle")}
    buffer = io.BytesIO()
    torch.save(_Payload(markers / "pth"), buffer)
    payloads["pth"] = buffer.getvalue()
    return payloads


def _plant(shard: Path, payloads: dict[str, bytes]) -> None:
    """Rewrite ``shard`` with the payloads after its first sample's members and as a last sample of their own."""
    with tarfile.open(shard) as tar:
        members = [(info.name, tar.extractfile(info).read()) for info in tar.getmembers() if info.isfile()]
    key = members[0][0].split(".", 1)[0]
    first = next(i for i, (name, _) in enumerate(members) if name.split(".", 1)[0] != key)
    planted = lambda prefix: [(f"{prefix}.{ext}", data) for ext, data in payloads.items()]  # noqa: E731
    with tarfile.open(shard, "w") as tar:
        for name, data in members[:first] + planted(key) + members[first:] + planted("planted"):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))


def _no_markers(markers: Path) -> None:
    assert sorted(path.name for path in markers.iterdir()) == []


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """(shard folder, marker folder, checkpoint): synthetic shards with payload members in every shard."""
    root = tmp_path_factory.mktemp("planted")
    markers = root / "markers"
    markers.mkdir()
    shard_set = synthetic_shards(root / "shards", SIZES, max_samples=8)
    tars = sorted(shard_set.out_dir.glob("*.tar"))
    assert len(tars) == sum(SHARDS.values())
    payloads = _payloads(markers)
    for tar in tars:
        _plant(tar, payloads)
    return shard_set.out_dir, markers, save_checkpoint(root / "run")


@pytest.fixture(scope="module")
def embedded(planted, tmp_path_factory):
    shards, markers, checkpoint = planted
    out = tmp_path_factory.mktemp("embedded") / "out"
    result = run_embed(EmbedConfig(checkpoint=str(checkpoint), shards=str(shards), out=str(out), device="cpu",
                                   workers=0, progress=False))
    _no_markers(markers)
    return result, out


def test_the_planted_members_run_code_when_unpickled(tmp_path):
    """The control: webdataset's default decoder (``decode("pil")``, what extraction used) runs the payloads."""
    import webdataset as wds

    markers = tmp_path / "markers"
    markers.mkdir()
    shard = synthetic_shards(tmp_path / "shards", {"dev": 4}).urls("dev")[0]
    _plant(Path(shard), _payloads(markers))
    samples = list(wds.WebDataset(shard, shardshuffle=False).decode("pil"))
    assert len(samples) == 4 + 1 and samples[0]["pyd"] is not None  # the planted sample of its own is the last
    assert sorted(path.name for path in markers.iterdir()) == sorted(PLANTED)


def test_embedding_uses_every_sample_and_unpickles_nothing(planted, embedded):
    result, out = embedded
    assert result["status"] == "complete" and result["count"] == sum(SIZES.values())
    assert set(result["rows_per_shard"].values()) == {8} and len(result["rows_per_shard"]) == sum(SHARDS.values())
    assert result["read_errors"]["foreign_member"] == PER_SHARD * sum(SHARDS.values())


def test_search_and_the_service_over_the_embeddings_unpickle_nothing(planted, embedded):
    shards, markers, checkpoint = planted
    _, out = embedded
    output = run_search(SearchConfig(index=str(out), text="an MRI of the spine", k=5, device="cpu", recall=True))
    assert len(output.hits) == 5 and set(output.recall) == {"R@1", "R@5", "R@10"}
    assert f"top 5 of {sum(SIZES.values())}" in format_search(output)
    client = TestClient(build_service(ServeConfig(checkpoint=str(checkpoint), index=str(out), device="cpu")))
    answer = client.get("/search", params={"text": "a CT of the head", "k": 3})
    assert answer.status_code == 200 and answer.json()["index_size"] == sum(SIZES.values())
    _no_markers(markers)


def test_evaluation_and_probing_use_every_sample_and_unpickle_nothing(planted, tmp_path):
    shards, markers, checkpoint = planted
    report = evaluate_checkpoint(EvaluateConfig(checkpoint=str(checkpoint), data=ShardsData(dir=str(shards)),
                                                out=str(tmp_path / "eval"), device="cpu", progress=False,
                                                eval=EvalConfig(workers=0, probe_folds=2, probe_Cs=[1.0],
                                                                tasks=["modality"])))
    assert report["zero_shot"]["modality"]["n"] == SIZES["dev"]
    assert report["linear_probe"]["modality"]["n_train"] == SIZES["train"]
    assert report["read_errors"]["foreign_member"] == PER_SHARD * SHARDS["dev"]
    _no_markers(markers)
    probe = probe_checkpoint(ProbeConfig(checkpoint=str(checkpoint), data=ShardsData(dir=str(shards)),
                                         out=str(tmp_path / "heads"), device="cpu", tasks=["modality"], Cs=[1.0],
                                         folds=2, workers=0, progress=False))
    metrics = probe["linear_probe"]["modality"]
    assert metrics["n"] == SIZES["dev"] and metrics["n_train"] == SIZES["train"]
    _no_markers(markers)


def test_training_uses_every_sample_and_unpickles_nothing(planted, tmp_path):
    shards, markers, _ = planted
    cfg = tiny_train_config(tmp_path)  # no loader workers
    cfg.trainer.epochs, cfg.data.loader.batch_size = 1, BATCH
    cfg.eval.tasks, cfg.eval.probe_Cs = ["modality"], [1.0]
    cfg.data.train_shards = str(shards / f"train-{{000000..{SHARDS['train'] - 1:06d}}}.tar")
    cfg.data.eval_shards = str(shards / "dev.manifest.json")
    report = train(cfg)
    assert report["step"] == SIZES["train"] // BATCH and report["samples_seen"] == SIZES["train"]
    assert report["data_errors"]["foreign_member"] == PER_SHARD * SHARDS["train"]
    assert report["zero_shot"]["modality"]["n"] == SIZES["dev"]
    _no_markers(markers)
