"""Hydra glue shared by the model-use commands (evaluate, probe, embed, search, serve, classify).

The ``data`` config group: ``data=<source>`` is that source's own config (``conf/source/``)
plus ``split`` and ``train_split``, so ``data=medpix data.root=/path data.split=test`` works for
every registered source, and ``data=shards data.dir=<folder>`` evaluates shards written earlier.
A source without a ``conf/data/<name>.yaml`` gets its data option generated here.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import typing
from collections.abc import Callable
from dataclasses import field, make_dataclass
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING
from omegaconf.errors import MissingMandatoryValue

from clip_med.cli.config import CONF_DIR, register_schemas
from clip_med.data.images import ImageRejected
from clip_med.data.sources import all_sources
from clip_med.eval.datasets import ShardsData

_DATA_FIELDS = (("split", Optional[str], None), ("train_split", Optional[str], "train"))


def data_schema(config_class: type) -> type:
    """``config_class`` plus split/train_split.

    Inherited fields default to MISSING, which a merge never writes over, so the values of the
    source's own YAML (merged before this schema) survive.
    """
    hints = typing.get_type_hints(config_class)
    fields = [(item.name, hints[item.name], field(default=MISSING)) for item in dataclasses.fields(config_class)]
    own = {item.name for item in dataclasses.fields(config_class)}
    # A source with its own `split` option keeps it (the evaluation then picks the held-out split itself).
    fields += [(name, kind, field(default=default)) for name, kind, default in _DATA_FIELDS if name not in own]
    return make_dataclass(f"{config_class.__name__}Data", fields, bases=(config_class,))


def register_data_options() -> None:
    store = ConfigStore.instance()
    store.store(group="data", name="shards_schema", node=ShardsData)
    for name, spec in all_sources().items():
        store.store(group="data", name=f"{name}_data_schema", node=data_schema(spec.config_class))
        if (CONF_DIR / "data" / f"{name}.yaml").is_file():
            continue
        source = f"/source/{name}" if (CONF_DIR / "source" / f"{name}.yaml").is_file() else f"/source/{name}_schema"
        store.store(group="data", name=name, node={"defaults": [f"{source}@_here_", f"{name}_data_schema", "_self_"]})


def register_command(name: str, schema: type) -> None:
    """Store ``<name>_schema`` (the command's top-level dataclass), the source schemas and the data options."""
    ConfigStore.instance().store(name=f"{name}_schema", node=schema)
    register_schemas()
    register_data_options()


# Errors that mean "the command was asked for something impossible": a message, not a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, ImageRejected, MissingMandatoryValue)


def user_errors(main: Callable) -> Callable:
    """Print a user error (bad path, bad key, bad checkpoint, ...) as one line and exit with status 2."""

    @functools.wraps(main)
    def wrapper(cfg):
        try:
            return main(cfg)
        except USER_ERRORS as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)

    return wrapper
