"""CLIP_benchmark both ways (clip_med.eval.clip_benchmark_wds, clip_med.data.sources.clip_benchmark).

The cross-check: a clip_med model, exported for open_clip, scored by CLIP_benchmark's own
zero-shot classification and retrieval code on a set clip_med wrote in CLIP_benchmark's layout
(with prompt lists of unequal length per class), gives the numbers clip_med's own evaluation gives
on the same images and prompts. CLIP_benchmark 1.6.2's ``accuracy()`` fails under NumPy 2; it is
replaced by :func:`clip_med.eval.clip_benchmark_wds.patch_clip_benchmark_accuracy` (the same
formula, with the one-element array indexed before ``float``).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from helpers import tiny_train_config

from clip_med.core.templates import TemplateError
from clip_med.data.shardset import ShardSet
from clip_med.data.sources import read_source
from clip_med.data.sources.clip_benchmark import ClipBenchmarkSourceConfig
from clip_med.data.sources.synthetic import SyntheticSourceConfig
from clip_med.data.writer import ShardConfig, write_shards
from clip_med.eval.clip_benchmark_wds import (
    TEMPLATES_JSON,
    clip_benchmark_prompts,
    evaluate_clip_benchmark_wds,
    from_clip_benchmark_template,
    patch_clip_benchmark_accuracy,
    to_clip_benchmark_template,
    write_clip_benchmark_wds,
)
from clip_med.eval.datasets import EvalData
from clip_med.eval.evaluator import EvalConfig
from clip_med.labels import taxonomy
from clip_med.modeling.export import ExportConfig, export_checkpoint
from clip_med.training.checkpoint import latest_checkpoint
from clip_med.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 48
RECALL_KS = [1, 5, 10]
# modality with explicit prompt lists of 1, 2, 3 and 4 prompts
MODALITY_PROMPTS = {
    "ct": ["a CT scan."],
    "mr": ["an MRI.", "a magnetic resonance image."],
    "xray": ["a radiograph.", "an X-ray image.", "a plain film."],
    "ultrasound": ["an ultrasound image.", "sonography.", "a US scan.", "an ultrasound of the abdomen."],
}


def _checkpoint(tmp_path: Path) -> Path:
    """A tiny model trained for a few seconds on the synthetic set (so that its predictions are not constant)."""
    cfg = tiny_train_config(tmp_path)
    cfg.trainer.epochs = 8
    train(cfg)
    checkpoint = latest_checkpoint(cfg.run_dir)
    assert checkpoint is not None
    return checkpoint


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The model (clip_med), its export, a synthetic held-out split and two CLIP_benchmark folders of it."""
    from clip_med.inference.model import load

    tmp = tmp_path_factory.mktemp("cb")
    checkpoint = _checkpoint(tmp)
    export = export_checkpoint(ExportConfig(checkpoint=str(checkpoint), out=str(tmp / "export"), name="cb-tiny"))
    source = SyntheticSourceConfig(seed=5, image_size=48, sizes={"test": N_IMAGES})
    shard_cfg = ShardConfig(out=str(tmp / "shards"), max_samples=20, workers=0, progress=False)
    shard_set = ShardSet(tmp / "shards", write_shards(read_source(source), tmp / "shards", shard_cfg, "synthetic"))
    model = load(checkpoint, device="cpu")
    # anatomy: the taxonomy's templates x every synonym (2 or 3 per region) x the split's modalities
    anatomy = write_clip_benchmark_wds(shard_set, "test", "anatomy", tmp / "cb" / "synth_anatomy",
                                       templates=list(taxonomy.TASKS["anatomy"].prompt_templates), synonyms=True,
                                       max_samples=20)
    modality = write_clip_benchmark_wds(shard_set, "test", "modality", tmp / "cb" / "synth_modality",
                                        prompts=MODALITY_PROMPTS)
    return {"tmp": tmp, "model": model, "export": export, "shard_set": shard_set,
            "sets": {"modality": (tmp / "cb" / "synth_modality", modality),
                     "anatomy": (tmp / "cb" / "synth_anatomy", anatomy)}}


def test_templates_map_between_c_and_positional_fields():
    assert to_clip_benchmark_template("a {} scan, {{literal}}.") == "a {c} scan, {{literal}}."
    assert from_clip_benchmark_template("a {c} scan, {{literal}}.") == "a {} scan, {{literal}}."
    for bad in ("a {c.__class__} scan", "{c!r}", "{0}", "{}", "{c:>999999}", "a {c"):
        with pytest.raises(TemplateError):
            from_clip_benchmark_template(bad)
    with pytest.raises(TemplateError):
        to_clip_benchmark_template("{} image of the {anatomy}.")


def test_written_layout_is_clip_benchmarks(built):
    folder, info = built["sets"]["anatomy"]
    labels = info["labels"]
    assert (folder / "classnames.txt").read_text().splitlines() == [taxonomy.TASKS["anatomy"].label(x).names[0]
                                                                     for x in labels]
    templates = (folder / "zeroshot_classification_templates.txt").read_text().splitlines()
    # the "{modality} image of the {}." template is not expressible with {c} alone
    assert templates == ["an image of the {c}.", "a scan of the {c}.", "a radiology image of the {c}."]
    assert not info["templates_exact"]
    lengths = set(info["prompts_per_class"].values())
    assert len(lengths) > 1, info["prompts_per_class"]  # unequal prompt lists
    assert (folder / "test" / "nshards.txt").read_text().strip() == "3"  # 48 samples, 20 per shard
    assert (folder / "retrieval" / "dataset_type.txt").read_text().strip() == "retrieval"
    with tarfile.open(folder / "test" / "0.tar") as archive:
        extensions = {name.rsplit(".", 1)[1] for name in archive.getnames()}
    assert extensions == {"png", "cls", "txt"}
    names, prompts = clip_benchmark_prompts(folder)
    per_class = json.loads((folder / TEMPLATES_JSON).read_text())["wds/synth_anatomy"]
    assert prompts == per_class and list(prompts) == names


def _clip_benchmark_numbers(export: Path, folder: Path, name: str) -> dict[str, dict[str, float]]:
    """CLIP_benchmark's own dataset builder and metrics, on the open_clip-loaded export (no clip_med model)."""
    import open_clip
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval

    patch_clip_benchmark_accuracy()
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{export}")
    model.eval()

    def loader(dataset):  # as clip_benchmark's CLI does for wds/ sets
        return torch.utils.data.DataLoader(dataset.batched(16), batch_size=None, shuffle=False, num_workers=0)

    classification = build_dataset(f"wds/{name}", root=str(folder), transform=preprocess, split="test",
                                   task="zeroshot_classification", custom_template_file=str(folder / TEMPLATES_JSON))
    assert isinstance(classification.templates, dict)  # per-class prompts
    found = {"classification": zeroshot_classification.evaluate(
        model, loader(classification), tokenizer, classification.classes, classification.templates, device="cpu",
        amp=False)}
    retrieval = build_dataset(f"wds/{name}", root=str(folder / "retrieval"), transform=preprocess, split="test",
                              task="zeroshot_retrieval")
    found["retrieval"] = zeroshot_retrieval.evaluate(model, loader(retrieval), tokenizer, device="cpu", amp=False,
                                                     recall_k_list=RECALL_KS)
    return found


def _assert_same(cb: dict[str, dict[str, float]], mine: dict[str, dict], n: int) -> None:
    ours = mine["zeroshot_classification"]
    assert ours["n"] == n
    assert abs(cb["classification"]["acc1"] - ours["acc1"]) < 1e-6, (cb, ours)
    assert round(cb["classification"]["acc1"] * n) == ours["correct"]
    assert abs(cb["classification"]["mean_per_class_recall"] - ours["mean_per_class_recall"]) < 1e-6
    for key, value in mine["zeroshot_retrieval"].items():
        assert round(cb["retrieval"][key] * n) == round(value * n), (key, cb["retrieval"][key], value)


@pytest.mark.parametrize("task", ["modality", "anatomy"])
def test_clip_benchmark_gives_clip_meds_numbers(built, task):
    pytest.importorskip("clip_benchmark", reason="CLIP_benchmark is not installed (pip install clip-benchmark)")
    folder, info = built["sets"][task]
    assert info["n"] == N_IMAGES and len(set(info["prompts_per_class"].values())) > 1
    cb = _clip_benchmark_numbers(built["export"], folder, folder.name)
    # clip_med reading the folder back: its classes, its per-class prompts, clip_med's own pipeline
    shards = ShardConfig(root=str(built["tmp"] / "eval-shards"), workers=0, progress=False)
    mine = evaluate_clip_benchmark_wds(built["model"], folder, shards=shards, recall_ks=RECALL_KS)
    _assert_same(cb, mine, N_IMAGES)
    print(f"\n{task}: CLIP_benchmark {json.dumps(cb)}\n{task}: clip_med {json.dumps(mine['zeroshot_classification'])}"
          f" {json.dumps(mine['zeroshot_retrieval'])}")


def test_clip_meds_own_evaluation_of_the_source_split_agrees(built):
    """``python -m clip_med.evaluate``'s path on the original shards, with the same prompt options, gives
    the anatomy numbers CLIP_benchmark gives on the written folder (and the same retrieval recall)."""
    pytest.importorskip("clip_benchmark", reason="CLIP_benchmark is not installed (pip install clip-benchmark)")
    from clip_med.inference.evaluation import evaluate_model

    folder, _ = built["sets"]["anatomy"]
    cfg = EvalConfig(tasks=["modality", "anatomy"], batch_size=16, workers=0, recall_ks=RECALL_KS,
                     prompt_templates={"anatomy": list(taxonomy.TASKS["anatomy"].prompt_templates)},
                     prompt_synonyms=True)
    data = EvalData(built["shard_set"], "test", None, "synthetic")
    report = evaluate_model(built["model"], data, cfg, built["tmp"] / "report", progress=False)
    cb = _clip_benchmark_numbers(built["export"], folder, folder.name)
    zero_shot = report["zero_shot"]["anatomy"]
    mine = {"zeroshot_classification": {"acc1": zero_shot["accuracy"], "n": zero_shot["n"],
                                        "correct": round(zero_shot["accuracy"] * zero_shot["n"]),
                                        "mean_per_class_recall": zero_shot["balanced_accuracy"]},
            "zeroshot_retrieval": {**{f"image_retrieval_recall@{k}": report["retrieval"]["text_to_image"][f"R@{k}"]
                                      for k in RECALL_KS},
                                   **{f"text_retrieval_recall@{k}": report["retrieval"]["image_to_text"][f"R@{k}"]
                                      for k in RECALL_KS}}}
    _assert_same(cb, mine, N_IMAGES)


@pytest.mark.slow
def test_clip_benchmark_command_line_on_the_export(built, tmp_path):
    """``clip_benchmark eval`` itself (through the module's wrapper, which only adds the NumPy 2 fix); about
    15 s more (two processes importing torch). The fast tests above run CLIP_benchmark's same functions."""
    pytest.importorskip("clip_benchmark", reason="CLIP_benchmark is not installed (pip install clip-benchmark)")
    try:
        import clip_benchmark.cli  # noqa: F401  (imports pycocoevalcap and requests)
    except ImportError as exc:
        pytest.skip(f"CLIP_benchmark's command line cannot be imported: {exc}")
    folder, _ = built["sets"]["modality"]
    results = {}
    for task, root, extra in (("zeroshot_classification", folder, ["--custom_template_file",
                                                                   str(folder / TEMPLATES_JSON)]),
                              ("zeroshot_retrieval", folder / "retrieval", ["--recall_k", "1", "5", "10"])):
        output = tmp_path / f"{task}.json"
        command = [sys.executable, "-m", "clip_med.cli.clip_benchmark_wds", "clip_benchmark", "eval",
                   "--dataset", f"wds/{folder.name}", "--dataset_root", str(root), "--task", task,
                   "--model", f"local-dir:{built['export']}", "--pretrained", "none", "--model_type", "open_clip",
                   "--no_amp", "--num_workers", "0", "--batch_size", "16", "--output", str(output), *extra]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
        results[task] = json.loads(output.read_text())["metrics"]
    shards = ShardConfig(root=str(built["tmp"] / "eval-shards"), workers=0, progress=False)
    mine = evaluate_clip_benchmark_wds(built["model"], folder, shards=shards, recall_ks=RECALL_KS)
    _assert_same({"classification": results["zeroshot_classification"], "retrieval": results["zeroshot_retrieval"]},
                 mine, N_IMAGES)


def test_a_foreign_folder_reads_with_restricted_members(tmp_path):
    """A CLIP_benchmark folder written by someone else: class names as labels, {c} templates, and a
    pickled member that is skipped unread."""
    from PIL import Image
    from webdataset import TarWriter

    root = tmp_path / "foreign"
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("cat scan\nchest film\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n{c}\n")
    (root / "test" / "nshards.txt").write_text("1\n")
    with TarWriter(str(root / "test" / "0.tar"), encoder=False) as writer:
        for index in range(4):
            buffer = io.BytesIO()
            Image.new("L", (20, 20), color=index * 40).save(buffer, format="webp", lossless=True)
            writer.write({"__key__": f"s{index}", "webp": buffer.getvalue(), "cls": str(index % 2).encode(),
                          "pyd": b"cos\nsystem\n(S'echo pwned'\ntR.", "txt": b"caption one\ncaption two"})
    records = read_source(ClipBenchmarkSourceConfig(root=str(root)))["test"]
    assert [r.labels for r in records] == [{"class": "cat scan"}, {"class": "chest film"}] * 2
    assert all(r.problem is None and r.caption == "caption one" for r in records)
    names, prompts = clip_benchmark_prompts(root)
    assert prompts == {"cat scan": ["a photo of a cat scan.", "cat scan"],
                       "chest film": ["a photo of a chest film.", "chest film"]}
    (root / "zeroshot_classification_templates.txt").write_text("{c.__class__}\n")
    with pytest.raises(TemplateError):
        clip_benchmark_prompts(root)
