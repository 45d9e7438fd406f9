"""Hydra glue for the command-line entry points (library code never imports Hydra).

The YAML files under ``conf/`` sit on typed dataclass schemas registered here, so a misspelt
key or a wrong type fails when the configuration is composed, naming the key.
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from clip_med.core.bounds import check_bounds
from clip_med.data.sources import all_sources

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
_registered = False

# ${clip_med.first:a,b,...}: the first argument that is not null. conf/train.yaml's hydra.run.dir
# names the run folder by ${clip_med.first:${run_name},${source.name}}, as resolve_run_dir does
# (run_name None: the source's name), so the default lives in TrainConfig only.
if not OmegaConf.has_resolver("clip_med.first"):
    OmegaConf.register_new_resolver("clip_med.first", lambda *values: next((v for v in values if v is not None), None))


def register_schemas(schemas: dict[str, Any] | None = None) -> None:
    """Store the top-level schemas and one schema per source (``<source>_schema`` in group ``source``)."""
    global _registered
    if _registered:
        return
    from clip_med.training.config import TrainConfig

    store = ConfigStore.instance()
    store.store(name="train_schema", node=schema_node(TrainConfig))
    for name, node in (schemas or {}).items():
        store.store(name=name, node=node)
    for name, spec in all_sources().items():
        store.store(group="source", name=f"{name}_schema", node=spec.config_class)
    _registered = True


def schema_node(schema: type) -> DictConfig:
    """``schema`` as a Hydra schema node, its group-chosen fields left empty for their group.

    A field typed ``Any`` whose default is a dataclass (``TrainConfig.source``: the synthetic
    source) would type the node as that class, and another option of the group (``source=medpix``)
    could not merge into it; the defaults list picks the same option, so nothing changes.
    """
    node = OmegaConf.structured(schema)
    hints = typing.get_type_hints(schema)
    for item in dataclasses.fields(schema):
        if hints[item.name] is Any and dataclasses.is_dataclass(OmegaConf.get_type(node, item.name)):
            node[item.name] = None
    return node


def to_object(cfg: DictConfig) -> Any:
    """The composed config as dataclass instances (what library functions take).

    Keys forced in with ``+key=value`` that the schema does not know are refused here (Hydra
    lets ``+`` add them and OmegaConf would silently drop them), and so is a number outside the
    range its dataclass field declares (:mod:`clip_med.core.bounds`).
    """
    _refuse_unknown_keys(cfg, "")
    config = OmegaConf.to_object(cfg)
    check_bounds(config)  # every declared numeric range, named by its full key
    return config


def _refuse_unknown_keys(node: Any, path: str) -> None:
    if not isinstance(node, DictConfig):
        return
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        known = {field.name for field in dataclasses.fields(schema)}
        unknown = sorted(str(key) for key in set(node.keys()) - known)
        if unknown:
            raise ValueError(f"unknown config key(s) {', '.join(path + key for key in unknown)}; "
                             f"{schema.__name__} has: {', '.join(sorted(known))}")
    for key in node.keys():
        _refuse_unknown_keys(node._get_node(key), f"{path}{key!s}.")


class _QuietOpenClip(logging.Filter):
    """open_clip logs its routine steps at INFO on the root logger; keep its warnings only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "open_clip" not in record.pathname


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietOpenClip())
    for noisy in ("PIL", "matplotlib", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
