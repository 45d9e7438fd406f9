from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from clip_med.cli.config import CONF_DIR, register_schemas, to_object
from clip_med.training.config import TrainConfig

register_schemas()


def _options(group):
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


def _compose(overrides=()):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("group", ["source", "model", "loss"])
def test_every_group_option_composes(group, monkeypatch):
    monkeypatch.setenv("MEDPIX_ROOT", "/data/medpix")
    for option in _options(group):
        cfg = to_object(_compose([f"{group}={option}"]))
        assert isinstance(cfg, TrainConfig)


@pytest.mark.parametrize("experiment", _options("exp"))
def test_every_experiment_composes(experiment):
    cfg = to_object(_compose([f"+exp={experiment}"]))
    assert cfg.source.name and cfg.run_name


def test_medpix_root_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("MEDPIX_ROOT", "/somewhere/MedPix-2-0")
    assert to_object(_compose(["+exp=medpix"])).source.root == "/somewhere/MedPix-2-0"
    monkeypatch.delenv("MEDPIX_ROOT")
    assert to_object(_compose(["+exp=medpix"])).source.root is None


@pytest.mark.parametrize("override", ["optim.lrr=1", "source.rooot=/x", "trainer.epochs=many", "nonsense=1",
                                      "model=does_not_exist"])
def test_typos_fail_at_compose_time(override):
    with pytest.raises(ConfigCompositionException):
        _compose([override])


@pytest.mark.parametrize("override", ["+source.extra=1", "+optim.lrr=1"])
def test_forced_unknown_keys_are_refused_before_any_work(override):
    with pytest.raises(ValueError, match="unknown config key"):
        to_object(_compose([override]))


def test_default_is_the_synthetic_set():
    cfg = to_object(_compose())
    assert cfg.source.name == "synthetic" and cfg.model.name == "medclip-tiny"
    assert Path(CONF_DIR / "train.yaml").is_file()
