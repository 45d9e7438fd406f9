"""Hydra glue shared by the commands: :func:`command`, the one entry-point wrapper, and the data options.

:func:`command` makes every command fail like a tool: a user's mistake (a missing data set, a
misspelt key, a bad checkpoint, ...) is one ``error:`` line on stderr and exit status 2; a bug
keeps its traceback; ``HYDRA_FULL_ERROR=1`` shows the full traceback of any error. It also lets
``exp=<name>`` stand for ``+exp=<name>``.

The ``data`` config group: ``data=<source>`` is that source's own config (``conf/source/``)
plus ``split`` and ``train_split``, so ``data=medpix data.root=/path data.split=test`` works for
every registered source, and ``data=shards data.dir=<folder>`` evaluates shards written earlier.
A source without a ``conf/data/<name>.yaml`` gets its data option generated here.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import sys
import typing
from collections.abc import Callable
from dataclasses import field, make_dataclass
from typing import Any, NoReturn, Optional

import hydra
import yaml
from hydra.core.config_store import ConfigStore
from hydra.errors import CompactHydraException
from omegaconf import MISSING
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from clip_med.cli.config import CONF_DIR, register_schemas
from clip_med.data.images import ImageRejected
from clip_med.data.sources import all_sources

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
    from clip_med.eval.datasets import ShardsData  # imports torch: not at module level (see command)

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
# clip_med's own error classes are ValueErrors (CheckpointError, ExportError, HeadError, IndexFolderError,
# ManifestError, UnknownName, ...), except ImageRejected. Anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
    ImageRejected, MissingMandatoryValue,
)
FULL_ERROR = "HYDRA_FULL_ERROR"
_HINT = f"[{FULL_ERROR}=1 shows the traceback]"


def _full_error() -> bool:
    return os.environ.get(FULL_ERROR, "") not in ("", "0")


def fail(message: object, status: int = 2) -> NoReturn:
    """Print ``error: <message>`` as one line on stderr and exit with ``status``."""
    print(f"error: {' '.join(str(message).split())} {_HINT}", file=sys.stderr, flush=True)
    sys.exit(status)


def user_errors(main: Callable) -> Callable:
    """Run the job ``main(cfg)``, reporting a user error (bad path, bad key, bad checkpoint, ...) as one
    line with exit status 2 (or, with ``HYDRA_FULL_ERROR=1``, raising it for Hydra to show in full)."""

    @functools.wraps(main)
    def wrapper(cfg: Any) -> Any:
        _restore_full_error()
        try:
            return main(cfg)
        except USER_ERRORS as exc:
            if _full_error():
                raise
            fail(exc)

    return wrapper


def command(config_name: str, register: Callable[[], None] | None = None) -> Callable[[Callable], Callable]:
    """The entry point of one command: ``@command("train")`` on ``def main(cfg: DictConfig)``.

    ``main()`` then runs it as ``@hydra.main`` does (its config ``conf/<config_name>.yaml``,
    overrides from ``sys.argv``), but as a tool: a user error (in composing the config, say a
    misspelt key, or in the job) is one ``error:`` line and exit status 2, a bug a traceback.
    ``exp=<name>`` is read as ``+exp=<name>``. ``register`` (storing the command's schemas) runs
    first; the shard command registers there rather than at import time, to keep its worker
    processes light. ``main(cfg)`` runs the job on a composed config, as Hydra's decorator allows.
    """

    def decorate(job: Callable) -> Callable:
        hydra_main = hydra.main(version_base="1.3", config_path="pkg://clip_med.conf",
                                config_name=config_name)(user_errors(job))

        @functools.wraps(job)
        def main(cfg: Any = None) -> Any:
            if cfg is not None:
                return hydra_main(cfg)
            return run_as_tool(hydra_main, register, config_name)

        return main

    return decorate


def normalise_overrides(overrides: list[str], config_name: str | None = None) -> list[str]:
    """``exp=<name>`` -> ``+exp=<name>``: an experiment is not in any defaults list, so Hydra only
    takes it appended; lightning-hydra-template users write ``experiment=<name>`` without ``+``.

    ``model=<value>`` names a model on every command (Hydra would read it as a ``model`` group
    choice only): a ``conf/model`` option (``model=biomedclip``) stays a group choice where the
    command has the group (train) and becomes that option's ``model_name``/``pretrained`` elsewhere;
    any other value (``hf-hub:<org>/<repo>``, ``local-dir:<folder>``, an architecture) becomes
    ``model.name=<value>`` (train) or ``model_name=<value>`` (the commands that use a model).
    """
    has_group = _has_model_group(config_name)
    normalised = []
    for item in overrides:
        key, equals, value = item.partition("=")
        if item.startswith("exp="):
            normalised.append("+" + item)
        elif key != "model" or not equals:
            normalised.append(item)
        elif (CONF_DIR / "model" / f"{value}.yaml").is_file():
            normalised += [item] if has_group else _model_option_overrides(value)
        else:
            normalised.append(f"model.name={value}" if has_group else f"model_name={value}")
    return normalised


def _has_model_group(config_name: str | None) -> bool:
    path = CONF_DIR / f"{config_name}.yaml"
    if config_name is None or not path.is_file():
        return False
    defaults = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("defaults") or []
    return any(isinstance(entry, dict) and "model" in entry for entry in defaults)


def _model_option_overrides(option: str) -> list[str]:
    """A ``conf/model`` option's name (and pretrained tag) as a command's ``model_name=``/``pretrained=``."""
    values = yaml.safe_load((CONF_DIR / "model" / f"{option}.yaml").read_text(encoding="utf-8")) or {}
    overrides = [f"model_name={values['name']}"] if values.get("name") else []
    return overrides + ([f"pretrained={values['pretrained']}"] if values.get("pretrained") else [])


_saved_full_error: list[str | None] = []


def _restore_full_error() -> None:
    """Give ``HYDRA_FULL_ERROR`` back its own value (run_as_tool set it to compose the config)."""
    while _saved_full_error:
        value = _saved_full_error.pop()
        if value is None:
            os.environ.pop(FULL_ERROR, None)
        else:
            os.environ[FULL_ERROR] = value


def run_as_tool(hydra_main: Callable[[], Any], register: Callable[[], None] | None = None,
                config_name: str | None = None) -> Any:
    """Call a ``@hydra.main`` function on ``sys.argv``, turning Hydra's report of a composition error
    (several lines, with advice that does not apply here) into one ``error:`` line.

    Hydra prints the errors it meets itself, unless ``HYDRA_FULL_ERROR=1``, when it raises them: that
    is set while Hydra composes the config and given back its own value when the job starts (see
    :func:`user_errors`), so the job's own bugs are reported by Hydra as usual.
    """
    sys.argv[1:] = normalise_overrides(sys.argv[1:], config_name)
    if register is not None:
        register()
    if _full_error():
        return hydra_main()
    _saved_full_error.append(os.environ.get(FULL_ERROR))
    os.environ[FULL_ERROR] = "1"
    try:
        return hydra_main()
    except CompactHydraException as exc:
        fail(composition_message(exc))
    except USER_ERRORS as exc:
        fail(exc)
    finally:
        _restore_full_error()


def composition_message(exc: BaseException) -> str:
    """Hydra's report of a composition error on one line, saying what to do (not Hydra's advice to
    append an unknown key with ``+``, which the schemas then refuse)."""
    cause = exc.__cause__ if isinstance(exc.__cause__, OmegaConfBaseException) else None
    lines = str(exc).splitlines() + (str(cause).splitlines() if cause is not None else [])
    parts: list[str] = []
    for line in lines:
        if line.startswith("Config search path:"):
            break  # the rest of Hydra's report: where it looked
        text = line.strip()
        if not text or text.startswith(("full_key:", "reference_type=", "object_type=", "To append to your config")):
            continue
        if line.startswith("\t") and parts:  # "Available options in 'source':", then one option a line
            if not text.endswith("_schema"):
                parts[-1] += ("" if parts[-1].endswith(":") else ",") + " " + text
        else:
            parts.append(text.rstrip("."))
    message = "; ".join(parts)
    override = getattr(exc, "override", None)
    if override:
        message = f"cannot parse {override!r}: {message}"
        if any(char in override for char in "{}[], "):
            message += "; quote a value holding braces, brackets, commas or spaces: key='value'"
    key, schema = getattr(cause, "key", None), getattr(cause, "object_type", None)
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and isinstance(key, str) \
            and isinstance(schema, type) and dataclasses.is_dataclass(schema):
        known = [item.name for item in dataclasses.fields(schema)]
        parent = str(getattr(cause, "full_key", None) or key).rpartition(".")[0]
        close = difflib.get_close_matches(key, known, n=1)
        prefix = f"{parent}." if parent else ""
        message += f"; did you mean {prefix}{close[0]}?" if close else f"; {schema.__name__} has: {', '.join(known)}"
        message += " (--cfg job prints every key)"
    return message
