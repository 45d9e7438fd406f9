"""The benchmark suite: cells planned and scored, CLIP_benchmark JSON per cell, CSV, Markdown, plot, and resume."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from api_helpers import save_checkpoint
from benchmark_fixtures import make_lc25000, make_medmnist
from helpers import make_medpix
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

import clip_med.cli.benchmark  # noqa: F401  (registers the benchmark and suite schemas)
from clip_med.cli.config import CONF_DIR, to_object
from clip_med.data.writer import ShardConfig
from clip_med.eval import suite as suite_eval
from clip_med.eval import suite_report
from clip_med.eval.embeddings import Embedded
from clip_med.eval.evaluator import EvalConfig
from clip_med.eval.suite import SuiteConfig, SuiteOptions, SuiteSet, few_shot_rows, multilabel_metrics, plan_cells
from clip_med.inference import benchmark
from clip_med.inference.benchmark import BenchmarkConfig, run_benchmark, source_config

SUITES = sorted(path.stem for path in (CONF_DIR / "suite").glob("*.yaml"))


def test_a_set_of_several_tasks_is_one_data_set_per_task_and_a_multilabel_set_is_one():
    options = SuiteOptions(few_shot_ks=[1, 4], few_shot_seeds=2)
    cells = plan_cells("medpix", SuiteSet(), ["modality", "anatomy"], True, options)
    assert [(cell.dataset, cell.family) for cell in cells] == [
        ("medpix/modality", "zero-shot"), ("medpix/modality", "linear probe"), ("medpix/modality", "1-shot"),
        ("medpix/modality", "4-shot"), ("medpix/anatomy", "zero-shot"), ("medpix/anatomy", "linear probe"),
        ("medpix/anatomy", "1-shot"), ("medpix/anatomy", "4-shot"), ("medpix", "retrieval")]
    findings = plan_cells("chexpert", SuiteSet(few_shot=False), ["cardiomegaly", "edema"], False, options)
    assert [(cell.dataset, cell.kind, cell.tasks, cell.main_metric) for cell in findings] == [
        ("chexpert", "multilabel", ("cardiomegaly", "edema"), "auroc"),
        ("chexpert", "multilabel", ("cardiomegaly", "edema"), "lp_auroc")]
    assert [cell.method for cell in plan_cells("roco", SuiteSet(), [], True, options)] == ["retrieval"]
    assert plan_cells("x", SuiteSet(retrieval=False, few_shot=False), ["pathmnist"], True, options)[-1].method \
        == "linear_probe"
    assert "retrieval" not in [cell.method for cell in plan_cells("x", SuiteSet(), ["pathmnist"], False, options)]
    with pytest.raises(ValueError, match="at least 1"):
        plan_cells("x", SuiteSet(), ["pathmnist"], False, SuiteOptions(few_shot_ks=[0]))


def test_few_shot_rows_take_k_per_class_reproducibly():
    labels = ["a"] * 5 + ["b"] * 2 + ["c"] * 4
    rows = few_shot_rows(labels, ["a", "b", "c", "absent"], 3, seed=0)
    picked = [labels[row] for row in rows]
    assert picked.count("a") == 3 and picked.count("b") == 2 and picked.count("c") == 3
    assert list(rows) == sorted(rows) and len(set(rows)) == len(rows)
    assert list(rows) == list(few_shot_rows(labels, ["a", "b", "c"], 3, seed=0))
    assert any(list(few_shot_rows(labels, ["a", "b", "c"], 3, seed=s)) != list(rows) for s in range(1, 6))


def test_multilabel_metrics_are_each_findings_auroc_and_their_mean():
    y_one = ["positive", "negative", "positive", "negative"]
    scores_one = np.array([0.9, 0.2, 0.4, 0.6])
    y_two = ["negative", "negative", "positive", "negative"]
    scores_two = np.array([0.1, 0.3, 0.8, 0.2])
    metrics = multilabel_metrics({"edema": (y_one, scores_one), "mass": (y_two, scores_two),
                                  "hernia": (["negative"] * 4, np.zeros(4))}, "lp_")
    truth = np.array(y_one) == "positive"
    assert metrics["lp_auroc/edema"] == pytest.approx(roc_auc_score(truth, scores_one)) == 0.75
    assert metrics["lp_auroc/mass"] == 1.0 and metrics["lp_auroc/hernia"] is None  # one value only: not scored
    assert metrics["lp_auroc"] == pytest.approx(0.875) and metrics["findings_scored"] == 2
    assert metrics["lp_mean_average_precision"] == pytest.approx(
        (average_precision_score(truth, scores_one) + 1.0) / 2)


@pytest.mark.parametrize("suite", SUITES)
def test_every_suite_composes_and_its_sources_are_valid(suite, monkeypatch):
    for variable in ("MEDMNIST_ROOT", "PCAM_ROOT", "LC25000_ROOT", "RSNA_ROOT", "ROCO_ROOT", "CHEXPERT_ROOT",
                     "MIMIC_CXR_ROOT", "MEDPIX_ROOT"):
        monkeypatch.setenv(variable, "/data/x")
    monkeypatch.delenv("MEDMNIST_SIZE", raising=False)
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = to_object(compose("benchmark", overrides=[f"suite={suite}", "models=[a.pt]"]))
    assert isinstance(cfg, BenchmarkConfig) and isinstance(cfg.suite, SuiteConfig)
    assert cfg.suite.name == suite and cfg.suite.sets
    for name, set_cfg in cfg.suite.sets.items():
        source = source_config(name, set_cfg.source)
        assert source.root == "/data/x"
        tasks = suite_eval.set_tasks(set_cfg, source.class_tasks())
        cells = plan_cells(name, set_cfg, tasks, not source.captions_from_class_names, cfg)
        assert cells and (any(cell.method == "retrieval" for cell in cells) == (name in ("roco", "medpix")))


def test_medmnist_size_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("MEDMNIST_SIZE", "224")
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = to_object(compose("benchmark", overrides=["suite=medmnist", "models=[a.pt]"]))
    assert source_config("pathmnist", cfg.suite.sets["pathmnist"].source).size == 224


def test_a_bad_set_config_names_the_set():
    with pytest.raises(ValueError, match="suite set 'p': source medmnist has no option.*subsett"):
        source_config("p", {"name": "medmnist", "subsett": "pathmnist"})
    with pytest.raises(ValueError, match="names no source"):
        source_config("p", {"root": "/x"})


# ---------------------------------------------------------------------------------------------
# A suite over fixtures with two tiny models


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    make_medmnist(root / "medmnist", "pathmnist", {"train": 18, "val": 3, "test": 9})
    make_lc25000(root / "lc25000", per_class=5)
    make_medpix(root / "medpix", {"train": 5, "test": 3}, images_per_case=2)
    models = [str(save_checkpoint(root / "run_a", seed=0)), str(save_checkpoint(root / "run_b", seed=1))]
    suite = SuiteConfig(name="tiny", sets={
        "pathmnist": SuiteSet(source={"name": "medmnist", "root": str(root / "medmnist"), "subset": "pathmnist"},
                              modality="pathology"),
        "lc25000_colon": SuiteSet(source={"name": "lc25000", "root": str(root / "lc25000"), "organ": "colon",
                                          "holdout": 0.4}, modality="pathology", few_shot=False),
        "medpix": SuiteSet(source={"name": "medpix", "root": str(root / "medpix")}, modality="radiology",
                           tasks=["modality"], linear_probe=False, few_shot=False),
    })
    return root, models, suite


def _config(root: Path, models: list[str], suite: SuiteConfig, out: Path, **changes) -> BenchmarkConfig:
    eval_cfg = EvalConfig(batch_size=16, workers=0, probe_folds=2, probe_Cs=[1.0])
    return BenchmarkConfig(**{"models": models, "suite": suite, "device": "cpu", "eval": eval_cfg,
                              "few_shot_ks": [2], "few_shot_seeds": 2, "out": str(out), "progress": False,
                              "shards": ShardConfig(root=str(root / "shards"), workers=0, progress=False, dedup=False),
                              **changes})


class Killed(Exception):
    pass


def _counting(monkeypatch, kill_after: int | None = None) -> list[tuple[str, str]]:
    """Record every cell compute_cell scores (model folder unknown here: the dataset and family), optionally
    raising after ``kill_after`` of them, as a kill mid-run would stop it."""
    scored: list[tuple[str, str]] = []
    real = suite_eval.compute_cell

    def counted(cell, *args, **kwargs):
        if kill_after is not None and len(scored) >= kill_after:
            raise Killed("simulated kill")
        scored.append((cell.dataset, cell.family))
        return real(cell, *args, **kwargs)

    monkeypatch.setattr(suite_eval, "compute_cell", counted)
    return scored


EXPECTED_CELLS = {("pathmnist", "zero-shot"), ("pathmnist", "linear probe"), ("pathmnist", "2-shot"),
                  ("lc25000_colon", "zero-shot"), ("lc25000_colon", "linear probe"),
                  ("medpix", "zero-shot"), ("medpix", "retrieval")}


def test_a_suite_writes_every_cell_the_csv_the_table_and_the_plot_and_resumes_after_a_kill(fixtures, tmp_path,
                                                                                          monkeypatch):
    root, models, suite = fixtures
    out = tmp_path / "bench"
    cfg = _config(root, models, suite, out)
    killed_at = 5
    with pytest.raises(Killed), monkeypatch.context() as patch:
        _counting(patch, kill_after=killed_at)
        run_benchmark(cfg)
    files = sorted((out / "results").rglob("*.json"))
    assert len(files) == killed_at  # each finished cell is on disk the moment it is scored
    before = {path: path.read_bytes() for path in files}
    assert not list((out / "results").rglob("*.tmp"))

    scored = _counting(monkeypatch)
    run = run_benchmark(cfg)
    total = len(EXPECTED_CELLS) * len(models)
    assert len(scored) == total - killed_at and (run.computed, run.reused, run.failed) == (total - killed_at,
                                                                                          killed_at, 0)
    assert all(path.read_bytes() == content for path, content in before.items())  # finished cells untouched
    files = sorted((out / "results").rglob("*.json"))
    assert len(files) == total and not run.problems

    records = [json.loads(path.read_text()) for path in files]
    for record in records:  # CLIP_benchmark's result shape
        assert {"dataset", "model", "pretrained", "task", "metrics", "language"} <= set(record)
        assert record["task"] in ("zeroshot_classification", "linear_probe", "zeroshot_retrieval")
        assert record["clip_med"]["main_metric"] in record["metrics"] and record["pretrained"] in models
    assert {(r["dataset"], r["clip_med"]["family"]) for r in records} == EXPECTED_CELLS
    few_shot = next(r for r in records if r["clip_med"]["family"] == "2-shot")
    assert few_shot["fewshot_k"] == 2 and few_shot["metrics"]["seeds"] == [0, 1]
    assert "lp_acc1_std" in few_shot["metrics"]
    retrieval = next(r for r in records if r["task"] == "zeroshot_retrieval")
    assert {"image_retrieval_recall@1", "text_retrieval_recall@5", "mean_recall"} <= set(retrieval["metrics"])

    with open(run.paths["csv"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["model"] for row in rows} == {"run_a/step-00000005", "run_b/step-00000005"}
    main_rows = [row for row in rows if row["main"] == "True"]
    assert len(main_rows) == total
    table = run.paths["md"].read_text()
    assert "| run_a/step-00000005 | run_b/step-00000005 |" in table
    for line in ("| zero-shot | top-1 accuracy | all | 3 |", "| zero-shot | top-1 accuracy | pathology | 2 |",
                 "| zero-shot | mean per-class recall | radiology | 1 |",
                 "| linear probe | top-1 accuracy | all | 2 |", "| 2-shot | mean per-class recall | all | 1 |",
                 "| retrieval | mean recall@k (both directions) | all | 1 |",
                 "| medpix | radiology | top-1 accuracy |", "| pathmnist | pathology | mean per-class recall |",
                 "- lc25000_colon: LC25000 has no published split", "fixed at 1.0"):
        assert line in table, line
    assert " ± " in table.split("## 2-shot")[1].split("\n## ")[0]  # k-shot: mean ± std over the seeds
    assert Image.open(run.paths["plot"]).format == "PNG"

    def refuse_to_load(*args, **kwargs):
        raise AssertionError("a model was loaded although all its cells are done")

    monkeypatch.setattr("clip_med.inference.model.load", refuse_to_load)
    scored.clear()
    again = run_benchmark(cfg)
    assert not scored and (again.computed, again.reused) == (0, total)


def test_a_changed_option_rescores_only_what_depends_on_it_and_an_unreadable_set_is_reported(fixtures, tmp_path,
                                                                                           monkeypatch):
    root, models, suite = fixtures
    sets = {"lc25000_colon": suite.sets["lc25000_colon"],
            "missing": SuiteSet(source={"name": "medmnist", "root": str(tmp_path / "nowhere"), "subset": "octmnist"})}
    tiny = SuiteConfig(name="tiny", sets=sets)
    cfg = _config(root, models[:1], tiny, tmp_path / "bench")
    first = run_benchmark(cfg)
    assert first.computed == 2 and list(first.problems) == ["run_a/step-00000005 / missing"]
    assert "does not exist" in first.problems["run_a/step-00000005 / missing"]
    assert "## Not evaluated" in first.paths["md"].read_text()
    scored = _counting(monkeypatch)
    changed = run_benchmark(_config(root, models[:1], tiny, tmp_path / "bench",
                                    eval=EvalConfig(batch_size=16, workers=0, probe_folds=2, probe_Cs=[0.5])))
    assert sorted(scored) == [("lc25000_colon", "linear probe"), ("lc25000_colon", "zero-shot")]
    assert changed.computed == 2 and changed.reused == 0
    checkpoint = Path(models[0])
    os.utime(checkpoint, ns=(checkpoint.stat().st_atime_ns, checkpoint.stat().st_mtime_ns + 10**9))
    assert run_benchmark(cfg).computed == 2  # the checkpoint was written again: its cells are scored again


def test_a_model_that_cannot_be_loaded_stops_the_run(fixtures, tmp_path):
    root, models, suite = fixtures
    garbage = tmp_path / "nope.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="model .*nope.pt cannot be loaded: "):
        run_benchmark(_config(root, [garbage.as_posix()], suite, tmp_path / "bench"))
    with pytest.raises(FileNotFoundError, match="model .*gone.pt: .* does not exist"):  # before the first model runs
        run_benchmark(_config(root, [models[0], str(tmp_path / "gone.pt")], suite, tmp_path / "bench"))
    assert not (tmp_path / "bench").exists()


def test_models_must_be_given():
    with pytest.raises(ValueError, match="give the models"):
        benchmark.model_list("???")
    with pytest.raises(ValueError, match="twice"):
        benchmark.model_list(["a.pt", "a.pt"])


# ---------------------------------------------------------------------------------------------
# The summary: one metric at a time; the CSV: everything


def _record(model: str, dataset: str, kind: str, method: str, metrics: dict, k: int = -1, error: str = "") -> dict:
    cell = suite_eval.Cell(dataset, dataset, ("t",), kind, method, k)
    return suite_eval.cell_record(cell, metrics, model, model, {"model_label": model, "modality": "radiology",
                                                                **({"error": error} if error else {})})


def test_the_summary_never_averages_an_accuracy_with_an_auroc_and_the_csv_keeps_every_cell():
    records = [_record(model, "organamnist", "multiclass", "zero_shot", {"acc1": acc, "mean_per_class_recall": 0.5,
                                                                          "acc5": None, "n": 10})
               for model, acc in (("a", 0.9), ("b", 0.7))]
    records += [_record(model, "chestmnist", "multilabel", "zero_shot", {"auroc": auroc, "auroc/edema": auroc})
                for model, auroc in (("a", 0.5), ("b", 0.6))]
    records += [_record("a", "pneumoniamnist", "multiclass", "zero_shot", {}, error="one class only"),
                _record("a", "organamnist", "multiclass", "few_shot", {"lp_acc1": 0.4, "lp_acc1_std": 0.05,
                                                                       "lp_mean_per_class_recall": 0.3,
                                                                       "C": [1.0, 1.0], "seeds": [0, 1]}, k=1)]
    models = ["a", "b"]
    rows = {(row.family, row.metric, row.modality): (row.count, row.means)
            for row in suite_report.summary(suite_report.table_by_family(records, models), models)}
    assert rows[("zero-shot", "top-1 accuracy", "all")] == (1, [0.9, 0.7])  # not (0.9 + 0.5) / 2
    assert rows[("zero-shot", "mean AUROC over findings", "all")] == (1, [0.5, 0.6])
    assert rows[("zero-shot", "mean per-class recall", "all")] == (1, [0.5, 0.5])
    assert ("1-shot", "top-1 accuracy", "all") not in rows  # model b has no 1-shot number
    table = suite_report.render_markdown("t", records, models, {}, {})
    assert "| chestmnist | radiology | mean AUROC over findings | 0.500 | **0.600** |" in table
    assert "| organamnist | radiology | top-1 accuracy | 0.400 ± 0.050 | – |" in table
    assert "- a / pneumoniamnist / zero-shot: one class only" in table

    csv_rows = [dict(zip(suite_report.CSV_COLUMNS, row)) for row in suite_report.csv_rows(records)]
    assert len(csv_rows) == 2 * 4 + 2 * 2 + 1 + 5  # every metric of every cell, and the cell without a result
    failed = next(row for row in csv_rows if row["dataset"] == "pneumoniamnist")
    assert (failed["metric"], failed["value"], failed["error"]) == ("acc1", "", "one class only")
    few = {row["metric"]: row for row in csv_rows if row["family"] == "1-shot"}
    assert few["C"]["value"] == "[1.0, 1.0]" and few["lp_acc1"]["metric_name"] == "top-1 accuracy"
    assert few["lp_acc1"]["headline"] and few["lp_acc1"]["main"] and not few["lp_acc1_std"]["headline"]
    assert next(row for row in csv_rows if row["metric"] == "auroc/edema")["kind"] == "multilabel"


def _embedded(labels: list[str], seed: int) -> Embedded:
    rng = np.random.default_rng(seed)
    centres = {label: rng.normal(size=16) for label in sorted(set(labels))}
    image = np.stack([centres[label] + rng.normal(scale=0.3, size=16) for label in labels]).astype(np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    ids = [f"{seed}-{index}" for index in range(len(labels))]
    return Embedded(ids=ids, image=image, text=image, texts=ids, labels={"modality": labels}, groups=ids)


def test_few_shot_c_is_cross_validated_where_it_can_be_and_fixed_at_k_1():
    labels = ["ct", "mr", "xray"] * 8
    data = suite_eval.SetEmbeddings(_embedded(labels[:9], 1), _embedded(labels, 2))
    eval_cfg = EvalConfig(probe_Cs=[0.1, 1.0, 10.0], probe_folds=2)
    options = SuiteOptions(few_shot_ks=[1, 3], few_shot_seeds=2)

    def few_shot(k: int) -> dict:
        cell = suite_eval.Cell("x", "x", ("modality",), suite_eval.MULTICLASS, "few_shot", k)
        return suite_eval.compute_cell(cell, data, lambda *_: np.zeros(0), eval_cfg, options)

    one = few_shot(1)
    assert one["C"] == [1.0, 1.0] and one["C_chosen_by"] == ["fixed", "fixed"] and one["n_train"] == 3
    three = few_shot(3)
    assert three["C_chosen_by"] == ["cross-validation"] * 2 and all(c in (0.1, 1.0, 10.0) for c in three["C"])
    assert 0 <= three["lp_acc1"] <= 1 and "lp_acc1_std" in three


# ---------------------------------------------------------------------------------------------
# What a rerun looks at; the user's mistakes


def test_a_replaced_array_file_changes_the_cells_fingerprint(tmp_path):
    path = make_medmnist(tmp_path, "pathmnist", {"test": 3})
    source = source_config("p", {"name": "medmnist", "root": str(tmp_path), "subset": "pathmnist"})
    before = benchmark.data_state(source)
    assert before == benchmark.data_state(source) and before[0][0][0] == "pathmnist.npz"
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert benchmark.data_state(source) != before


def test_model_names_and_missing_models_are_refused_before_any_work(tmp_path):
    assert benchmark.model_source("ViT-B-16@laion2b_s34b_b88k") == ("ViT-B-16", "laion2b_s34b_b88k")
    assert benchmark.model_source("hf-hub:org/repo") == ("hf-hub:org/repo", None)
    odd = tmp_path / "run@1.pt"
    odd.write_bytes(b"")
    assert benchmark.model_source(str(odd)) == (str(odd), None)  # a file that exists is a file
    with pytest.raises(FileNotFoundError, match="model .*missing.pt: .* does not exist"):
        benchmark.check_models([str(odd), str(tmp_path / "missing.pt")])
    with pytest.raises(FileNotFoundError, match="local-dir:"):
        benchmark.check_models([f"local-dir:{tmp_path / 'no-export'}"])
    benchmark.check_models(["ViT-B-16@openai", "hf-hub:org/repo", str(odd)])


def test_an_empty_or_unknown_set_list_is_refused():
    suite = SuiteConfig(name="s", sets={"a": SuiteSet()})
    with pytest.raises(ValueError, match="sets=\\[\\] chooses no set"):
        benchmark.chosen_sets(suite, [])
    with pytest.raises(ValueError, match="suite s has no set\\(s\\) \\['b'\\]; it has a"):
        benchmark.chosen_sets(suite, ["b"])
