import csv
import json

import pytest
from api_helpers import save_checkpoint, synthetic_shards
from helpers import make_medpix
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from clip_med.cli.common import register_command
from clip_med.cli.config import CONF_DIR, to_object
from clip_med.data.sources import all_sources
from clip_med.eval.datasets import ShardsData
from clip_med.eval.evaluator import EvalConfig
from clip_med.inference.commands import ClassifyConfig, EmbedConfig, SearchConfig
from clip_med.inference.evaluation import EvaluateConfig, evaluate_checkpoint
from clip_med.inference.service import ServeConfig

COMMANDS = {"evaluate": EvaluateConfig, "classify": ClassifyConfig, "embed": EmbedConfig, "search": SearchConfig,
            "serve": ServeConfig}
for _name, _schema in COMMANDS.items():
    register_command(_name, _schema)
from clip_med.inference.probing import ProbeConfig  # noqa: E402

register_command("probe", ProbeConfig)


def _compose(command, overrides=()):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return to_object(compose(command, overrides=list(overrides)))


def test_evaluate_data_options_compose_with_root_and_split(monkeypatch):
    monkeypatch.setenv("MEDPIX_ROOT", "/from/env")
    cfg = _compose("evaluate", ["checkpoint=c.pt", "data=medpix", "data.root=/data/MedPix-2-0", "data.split=test"])
    assert isinstance(cfg, EvaluateConfig)
    assert (cfg.data.name, cfg.data.root, cfg.data.split, cfg.data.train_split) == \
        ("medpix", "/data/MedPix-2-0", "test", "train")
    assert _compose("evaluate", ["checkpoint=c.pt"]).data.root == "/from/env"  # the source's own YAML survives
    synthetic = _compose("evaluate", ["checkpoint=c.pt", "data=synthetic", "data.seed=3", "data.split=dev"])
    assert (synthetic.data.name, synthetic.data.seed, synthetic.data.image_size) == ("synthetic", 3, 96)
    shards = _compose("evaluate", ["checkpoint=c.pt", "data=shards", "data.dir=shards/medpix"])
    assert isinstance(shards.data, ShardsData) and shards.data.dir == "shards/medpix"


@pytest.mark.parametrize("source", sorted(all_sources()))
def test_every_registered_source_is_a_data_option(source):
    cfg = _compose("evaluate", ["checkpoint=c.pt", f"data={source}", "data.split=test", "data.train_split=tr"])
    assert cfg.data.name == source and cfg.data.split == "test" and cfg.data.train_split == "tr"
    assert isinstance(cfg.data, all_sources()[source].config_class)


@pytest.mark.parametrize("command", sorted(COMMANDS) + ["probe"])
def test_every_command_config_composes_and_refuses_typos(command):
    required = {"evaluate": ["checkpoint=c.pt"], "probe": ["checkpoint=c.pt"], "serve": ["checkpoint=c.pt"],
                "classify": ["checkpoint=c.pt", "images=a.png"], "search": ["index=out"],
                "embed": ["checkpoint=c.pt", "shards=s.tar", "out=o"]}[command]
    assert _compose(command, required) is not None
    with pytest.raises(Exception, match="chekpoint|Could not override"):
        _compose(command, required + ["chekpoint=x"])


def test_a_missing_checkpoint_is_named():
    # checkpoint= or model= (a pretrained model by name): the loader names both when neither is given.
    with pytest.raises(ValueError, match="give a checkpoint .*checkpoint=.* or a pretrained model .*model=hf-hub:"):
        evaluate_checkpoint(_compose("evaluate", ["data=synthetic"]))


def test_evaluate_writes_a_complete_report_for_a_medpix_test_split(tmp_path):
    root = make_medpix(tmp_path / "medpix", {"train": 5, "dev": 2, "test": 3}, images_per_case=2)
    cfg = _compose("evaluate", ["checkpoint=" + str(save_checkpoint(tmp_path / "run", max_side=40)), "data=medpix",
                                f"data.root={root}", "data.split=test", f"shards.root={tmp_path / 'shards'}",
                                "shards.workers=0", f"out={tmp_path / 'eval'}", "progress=false", "eval.workers=0",
                                "eval.probe_folds=2", "eval.probe_Cs=[1.0]"])
    report = evaluate_checkpoint(cfg)
    out = tmp_path / "eval"
    saved = json.loads((out / "report.json").read_text())
    assert saved["split"] == "test" and saved["train_split"] == "train" and saved["n_images"] == 6
    assert saved["checkpoint"].endswith("step-00000005.pt") and saved["source"] == "medpix"
    for method in ("zero_shot", "linear_probe"):
        for task in ("modality", "anatomy"):
            metrics = saved[method][task]
            assert set(metrics) >= {"accuracy", "balanced_accuracy", "macro_f1", "auroc", "confusion_matrix",
                                    "per_class"}
            assert sum(c["support"] for c in metrics["per_class"].values()) == metrics["n"] == 6
            assert (out / f"confusion_{method}_{task}.png").stat().st_size > 1000
    for direction in ("image_to_text", "text_to_image"):
        assert set(saved["retrieval"][direction]) >= {"R@1", "R@5", "R@10", "median_rank"}
    markdown = (out / "report.md").read_text()
    assert "Evaluation on split `test`" in markdown and "per class" in markdown and "median rank" in markdown
    records = json.loads((out / "clip_benchmark.json").read_text())
    tasks = {record["task"] for record in records}
    assert tasks == {"zeroshot_classification", "linear_probe", "zeroshot_retrieval"}
    for record in records:
        assert set(record) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
    zero_shot = next(r for r in records if r["dataset"] == "medpix/test/modality" and r["task"] ==
                     "zeroshot_classification")
    assert zero_shot["metrics"]["acc1"] == report["zero_shot"]["modality"]["accuracy"]
    assert zero_shot["metrics"]["acc5"] is None  # two classes, as CLIP_benchmark reports it
    retrieval = next(r for r in records if r["task"] == "zeroshot_retrieval")["metrics"]
    assert retrieval["image_retrieval_recall@10"] == saved["retrieval"]["text_to_image"]["R@10"]
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 4 * 6 and {row["method"] for row in rows} == {"zero_shot", "linear_probe"}
    # The eval shards are the evaluation's own, prepared with the checkpoint's max_side.
    shard_dirs = list((tmp_path / "shards" / "eval").iterdir())
    manifest = json.loads((shard_dirs[0] / "test.manifest.json").read_text())
    assert len(shard_dirs) == 1 and manifest["options"]["max_side"] == 40


def test_evaluate_without_a_training_split_skips_the_probe(tmp_path):
    shard_set = synthetic_shards(tmp_path / "shards", {"test": 20})
    cfg = EvaluateConfig(checkpoint=str(save_checkpoint(tmp_path / "run")), data=ShardsData(dir=str(
        shard_set.out_dir)), out=str(tmp_path / "eval"), progress=False, eval=EvalConfig(workers=0))
    report = evaluate_checkpoint(cfg)
    assert report["split"] == "test" and report["train_split"] is None and report["linear_probe"] == {}
    assert report["zero_shot"]["modality"]["n"] == 20


def test_evaluate_names_a_missing_split(tmp_path):
    shard_set = synthetic_shards(tmp_path / "shards", {"train": 16, "dev": 16})
    cfg = EvaluateConfig(checkpoint=str(save_checkpoint(tmp_path / "run")),
                         data=ShardsData(dir=str(shard_set.out_dir), split="test"), progress=False)
    with pytest.raises(KeyError, match="no split 'test'"):
        evaluate_checkpoint(cfg)
