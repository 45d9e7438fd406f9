"""One home for each default: the dataclass.

Each command's YAML composed without overrides (but the required ``???`` values) is exactly its
dataclass with its defaults, every config-group option composes, and no YAML file copies a
default of its schema (a copy would be a second home that can drift from the dataclass).
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra import compose, initialize_config_dir

from clip_med.cli.common import _DATA_FIELDS
from clip_med.cli.config import CONF_DIR, to_object
from clip_med.cli.med_mat import MedMatConfig
from clip_med.data.shardset import ShardCommandConfig
from clip_med.data.sources import all_sources
from clip_med.data.sources.medpix import MedPixSourceConfig
from clip_med.eval.datasets import ShardsData
from clip_med.eval.suite import SuiteConfig
from clip_med.inference.benchmark import BenchmarkConfig
from clip_med.inference.commands import ClassifyConfig, EmbedConfig, SearchConfig
from clip_med.inference.evaluation import EvaluateConfig
from clip_med.inference.probing import ProbeConfig
from clip_med.inference.service import ServeConfig
from clip_med.modeling.export import ExportConfig
from clip_med.training.config import TrainConfig

for _module in ("train", "serve", "embed", "classify", "evaluate", "search", "probe", "export", "med_mat", "benchmark"):
    importlib.import_module(f"clip_med.cli.{_module}")  # each registers its schema as its command does
importlib.import_module("clip_med.cli.shard").register()

# command -> (schema, the minimum overrides: its required values)
COMMANDS: dict[str, tuple[type, dict[str, str]]] = {
    "train": (TrainConfig, {}),
    "shard": (ShardCommandConfig, {}),
    "serve": (ServeConfig, {"checkpoint": "c.pt"}),
    "embed": (EmbedConfig, {"checkpoint": "c.pt", "shards": "s.tar", "out": "emb"}),
    "classify": (ClassifyConfig, {"checkpoint": "c.pt", "images": "a.png"}),
    "evaluate": (EvaluateConfig, {"checkpoint": "c.pt"}),
    "search": (SearchConfig, {"index": "emb"}),
    "probe": (ProbeConfig, {"checkpoint": "c.pt"}),
    "export": (ExportConfig, {"checkpoint": "c.pt", "out": "export"}),
    "med_mat": (MedMatConfig, {"checkpoint": "c.pt"}),
    "benchmark": (BenchmarkConfig, {"models": "c.pt", "suite": "medpix"}),
}
# Commands whose `data` group option (data=medpix) the dataclass leaves to the caller (data=None).
DATA_COMMANDS = ("evaluate", "probe")
# Commands whose `suite` group option (suite=medpix, required) the dataclass leaves to the caller (suite=None).
SUITE_COMMANDS = ("benchmark",)
GROUPS = ("source", "model", "loss", "data", "exp")


def _compose(command: str, overrides=()) -> Any:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return to_object(compose(command, overrides=list(overrides)))


def _options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


@pytest.fixture(autouse=True)
def _no_dataset_roots(monkeypatch):
    for name in ("MEDPIX_ROOT", "ROCO_ROOT", "PMC_OA_ROOT", "DICOM_ROOT"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_the_composed_default_is_the_dataclass_default(command):
    schema, required = COMMANDS[command]
    composed = _compose(command, [f"{key}={value}" for key, value in required.items()])
    expected = schema(**required)
    if command in DATA_COMMANDS:
        # data=medpix is the YAML's group choice (its root from MEDPIX_ROOT); the dataclass has no data default.
        assert isinstance(composed.data, MedPixSourceConfig)
        expected_data = {**{name: default for name, _, default in _DATA_FIELDS},
                         **dataclasses.asdict(MedPixSourceConfig())}
        assert dataclasses.asdict(composed.data) == expected_data
        composed = dataclasses.replace(composed, data=None)
    if command in SUITE_COMMANDS:
        assert isinstance(composed.suite, SuiteConfig) and composed.suite.name == required["suite"]
        composed, expected = dataclasses.replace(composed, suite=None), dataclasses.replace(expected, suite=None)
    assert type(composed) is schema
    for item in dataclasses.fields(schema):  # field by field, for a readable failure
        assert getattr(composed, item.name) == getattr(expected, item.name), item.name
    assert composed == expected


def test_train_without_arguments_is_train_config_defaults():
    cfg = TrainConfig()
    assert cfg.source.name == "synthetic" and cfg.model.name == "medclip-tiny" and cfg.loss.name == "clip"
    assert cfg.run_name is None and cfg.resolved_run_name() == "synthetic"
    assert TrainConfig(run_name="mine").resolved_run_name() == "mine"
    assert TrainConfig(source=MedPixSourceConfig()).resolved_run_name() == "medpix"


@pytest.mark.parametrize("overrides, run_dir", [([], "runs/synthetic/"), (["source=medpix"], "runs/medpix/"),
                                                (["+exp=roco"], "runs/roco/"), (["run_name=mine"], "runs/mine/")])
def test_the_hydra_run_folder_follows_run_name_or_the_source(overrides, run_dir):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    assert cfg.hydra.run.dir.startswith(run_dir)


def _group_cases() -> list[tuple[str, str]]:
    return [(group, option) for group in GROUPS for option in _options(group)]


@pytest.mark.parametrize("group, option", _group_cases())
def test_every_group_option_composes(group, option):
    if group == "exp":
        cfg = _compose("train", [f"+exp={option}"])
        assert isinstance(cfg, TrainConfig) and cfg.source.name and cfg.resolved_run_name()
    elif group == "data":
        extra = ["data.dir=shards/x"] if option == "shards" else []
        for command in DATA_COMMANDS:
            cfg = _compose(command, ["checkpoint=c.pt", f"data={option}", *extra])
            assert cfg.data.name == option
    else:
        cfg = _compose("train", [f"{group}={option}"])
        assert isinstance(cfg, TrainConfig)
        if group == "source":
            assert _compose("shard", [f"source={option}"]).source.name == option


# ---------------------------------------------------------------------------------------------
# No YAML value copies its schema's default


def _source_defaults(name: str) -> dict[str, Any]:
    return dataclasses.asdict(all_sources()[name].config_class())


def _data_defaults(name: str) -> dict[str, Any]:
    if name == "shards":
        return dataclasses.asdict(ShardsData())
    return {**{field: default for field, _, default in _DATA_FIELDS}, **_source_defaults(name)}


def schema_defaults(path: Path) -> tuple[dict[str, Any], bool]:
    """The defaults a YAML file's values land on, and whether the file is a group option (its `name` may stay)."""
    group = path.parent.name if path.parent != CONF_DIR else None
    if group is None:
        schema, required = COMMANDS[path.stem]
        return dataclasses.asdict(schema(**{key: "???" for key in required})), False
    if group == "exp":
        return dataclasses.asdict(TrainConfig()), False
    if group == "suite":
        return dataclasses.asdict(SuiteConfig()), True
    if group == "source":
        return _source_defaults(path.stem), True
    if group == "data":
        return _data_defaults(path.stem), True
    return dataclasses.asdict(getattr(TrainConfig(), group)), True  # model, loss


def _same(value: Any, default: Any) -> bool:
    if isinstance(value, bool) or isinstance(default, bool):
        return value is default
    if isinstance(value, (int, float)) and isinstance(default, (int, float)):
        return value == default
    return type(value) is type(default) and value == default


def copied_defaults(values: dict[str, Any], defaults: dict[str, Any], group_option: bool, prefix: str = "") -> list:
    """Keys of ``values`` (a YAML mapping) whose value is the schema's default."""
    found = []
    for key, value in values.items():
        if not prefix and key in ("defaults", "hydra"):
            continue
        if not prefix and group_option and key == "name":
            continue  # a group option's name (model: RN50, loss: siglip) says which option it is
        if key not in defaults or (isinstance(value, str) and "${" in value):
            continue  # a key the schema has no default for, or an interpolation (${oc.env:MEDPIX_ROOT,null})
        default = defaults[key]
        if isinstance(value, dict) and isinstance(default, dict) and value != default:
            found += copied_defaults(value, default, False, f"{prefix}{key}.")
        elif _same(value, default):
            found.append(f"{prefix}{key}: {value!r}")
    return found


def _yaml_files() -> list[Path]:
    return sorted(CONF_DIR.glob("*.yaml")) + sorted(CONF_DIR.glob("*/*.yaml"))


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda path: str(path.relative_to(CONF_DIR)))
def test_no_yaml_value_copies_a_dataclass_default(path):
    values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    defaults, group_option = schema_defaults(path)
    copies = copied_defaults(values, defaults, group_option)
    assert not copies, (f"{path.relative_to(CONF_DIR)} repeats its schema's defaults {copies}: the dataclass is "
                        "their one home; delete them from the YAML (or change the dataclass)")


def test_the_copy_check_sees_copies():
    defaults = dataclasses.asdict(TrainConfig())
    values = {"seed": 0, "run_name": "${source.name}", "optim": {"lr": 1.0e-3, "warmup": defaults["optim"]["warmup"]},
              "trainer": {"progress": True}, "data": {"loader": {"batch_size": 64}}, "eval": {"tasks": ["modality"]}}
    assert copied_defaults(values, defaults, False) == [
        "seed: 0", f"optim.warmup: {defaults['optim']['warmup']!r}", "trainer.progress: True",
        "data.loader.batch_size: 64"]
    assert copied_defaults({"name": "medclip-tiny", "pretrained": None}, dataclasses.asdict(TrainConfig().model),
                           True) == ["pretrained: None"]
    assert copied_defaults({"shards": {"root": "shards"}}, dataclasses.asdict(ShardCommandConfig()), False) == [
        "shards.root: 'shards'"]
