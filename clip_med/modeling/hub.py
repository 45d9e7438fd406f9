"""Where a model's files come from: open_clip's pretrained tags, ``hf-hub:`` repos, ``local-dir:`` folders.

Everything downloaded goes through ``huggingface_hub``'s cache (``HF_HOME`` / ``HF_HUB_CACHE``);
with ``HF_HUB_OFFLINE=1`` only the cache is read. clip_med fetches a model's own files itself
(an ``hf-hub:`` repo's ``open_clip_config.json`` and weights, a tag's weights), because open_clip
carries on with random weights when a hub download fails; it then builds the model with open_clip
from those files, and the towers' own files (a Hugging Face text tower's config and tokenizer, a
timm tower's pretrained weights) come through transformers and timm, which use the same cache.
Whatever fails because a file is neither cached nor reachable becomes one :class:`ModelUnavailable`
line naming the model, the cache folder and the ``hf download`` commands that fetch it ahead of time.

Under ``torchrun``, :func:`first_on_rank_zero` lets rank 0 download while the other ranks wait,
then read the cache.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import open_clip
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

from clip_med.core import distributed

log = logging.getLogger(__name__)

HF_HUB = "hf-hub:"
LOCAL_DIR = "local-dir:"
T = TypeVar("T")

# Weights files of an exported (or open_clip hub-style) folder, most preferred first (open_clip's order).
FOLDER_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                  "model.safetensors", "pytorch_model.bin")


class ModelUnavailable(ValueError):
    """A model whose files are neither in the cache nor downloadable (one line: what, where, what to do)."""


def has_schema(name: str) -> bool:
    """Whether ``name`` names its own files (``hf-hub:`` repo or ``local-dir:`` folder) rather than an architecture."""
    return name.startswith((HF_HUB, LOCAL_DIR))


def starts_pretrained(name: str, pretrained: str | None) -> bool:
    """Whether a model of this name and ``pretrained`` setting starts from weights trained elsewhere."""
    return bool(pretrained) or has_schema(name)


def portable_name(name: str) -> str:
    """A model name as a checkpoint or embedding folder records it: ``local-dir:<folder>`` by the folder's absolute
    path (a relative one would name another folder, or none, from another working directory); others as given."""
    if not name.startswith(LOCAL_DIR):
        return name
    folder = Path(name.removeprefix(LOCAL_DIR)).expanduser()
    return LOCAL_DIR + str(folder.resolve()) if folder.exists() else name


def portable_pretrained(name: str, pretrained: str | None) -> str | None:
    """``pretrained`` as a checkpoint or embedding folder records it: a local file or folder by its absolute path
    (the model is rebuilt from it in another working directory); a tag, or a path that is not there, as given."""
    if not pretrained or has_schema(name) or open_clip.get_pretrained_cfg(name, pretrained):
        return pretrained
    path = Path(pretrained).expanduser()
    return str(path.resolve()) if path.exists() else pretrained


def hub_cache() -> str:
    """The folder huggingface_hub downloads into (``HF_HUB_CACHE``, by default ``$HF_HOME/hub``)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


@dataclass
class ModelSource:
    """What open_clip is asked to build for a model name, once its files are local."""

    name: str  # as the user wrote it
    open_clip_name: str  # an hf-hub: model is built from its snapshot folder in the cache (local-dir:)
    tokenizer_name: str
    model_cfg: dict[str, Any]
    weights: str | None = None  # the CLIP weights file (None: none, or a local-dir folder's own)
    create_kwargs: dict[str, Any] = field(default_factory=dict)  # more open_clip.create_model arguments
    repos: tuple[str, ...] = ()  # hub repos the model needs (named when one is unavailable)

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """Hub failures inside (transformers' and timm's too) as one :class:`ModelUnavailable` line."""
        with hub_errors(self.name, self.repos):
            yield


# ---------------------------------------------------------------------------------------------
# Resolving a name


def resolve_source(name: str, pretrained: str | None = None, load_weights: bool = True) -> ModelSource:
    """The files of model ``name`` (+ ``pretrained``: a tag or a local file), fetched into the cache if needed.

    ``load_weights=False`` is for rebuilding a model whose weights come from a checkpoint: then
    only what defines the architecture and preprocessing is read (no CLIP or tower weights).
    """
    if name.startswith(HF_HUB):
        return _hub_source(name, load_weights)
    if name.startswith(LOCAL_DIR):
        return _local_dir_source(name, load_weights)
    model_cfg = open_clip.get_model_config(name) or {}
    tag = open_clip.get_pretrained_cfg(name, pretrained) if pretrained else {}
    if tag:
        return _tag_source(name, pretrained or "", tag, model_cfg, load_weights)
    weights = resolve_pretrained(pretrained) if pretrained and load_weights else None
    return ModelSource(name, name, name, model_cfg, weights, _tower_kwargs(model_cfg, load_weights and not weights),
                       _tower_repos(model_cfg, load_weights and not weights))


def resolve_pretrained(path: str | None) -> str | None:
    """The weights file ``model.pretrained`` names as a local path (a file, or the weights file inside a folder)."""
    if not path:
        return None
    candidate = Path(path).expanduser()
    if candidate.is_dir():
        for name in FOLDER_WEIGHTS:
            if (candidate / name).is_file():
                return str(candidate / name)
        raise FileNotFoundError(f"model.pretrained={path} is a folder without open_clip weights "
                                f"(looked for {', '.join(FOLDER_WEIGHTS)})")
    if not candidate.is_file():
        raise FileNotFoundError(
            f"model.pretrained={path} is not a file, nor a pretrained tag of this architecture. Give one of "
            "open_clip's tags (python -c \"import open_clip; print(open_clip.list_pretrained())\"), the path of a "
            "local open_clip checkpoint (.pt, .bin or .safetensors) or an exported folder, or name the model "
            "hf-hub:<org>/<repo> or local-dir:<folder>"
        )
    return str(candidate)


def _hub_source(name: str, load_weights: bool) -> ModelSource:
    repo = name[len(HF_HUB):]
    if not repo.strip("/"):
        raise ModelUnavailable(f"model {name}: give the hub repository, e.g. hf-hub:<org>/<repo>")
    with hub_errors(name, (repo,), also=_TEXT_TOWER_HINT):
        config_path = download(repo, HF_CONFIG_NAME)
    config = _read_config(Path(config_path), name)
    model_cfg = config["model_cfg"]
    snapshot = Path(config_path).parent  # <cache>/models--org--repo/snapshots/<commit>/
    weights = None
    repos = (repo, *_tower_repos(model_cfg, False))
    if load_weights:
        with hub_errors(name, repos):
            weights = download_weights(repo, revision=snapshot.name)
    return ModelSource(name, f"{LOCAL_DIR}{snapshot}", name, model_cfg, weights,
                       {"load_weights": load_weights, **_tower_kwargs(model_cfg, False)}, repos)


def _local_dir_source(name: str, load_weights: bool) -> ModelSource:
    folder = Path(name[len(LOCAL_DIR):]).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"model {name}: no such folder")
    model_cfg = _read_config(folder / HF_CONFIG_NAME, name)["model_cfg"]
    weights = next((str(folder / file) for file in FOLDER_WEIGHTS if (folder / file).is_file()), None)
    weights = weights if load_weights else None
    towers_pretrained = load_weights and weights is None  # a folder holding only a config: towers start alone
    return ModelSource(name, f"{LOCAL_DIR}{folder}", f"{LOCAL_DIR}{folder}", model_cfg, weights,
                       {"load_weights": load_weights, **_tower_kwargs(model_cfg, towers_pretrained)},
                       _tower_repos(model_cfg, towers_pretrained))


def _tag_source(name: str, tag: str, tag_cfg: dict[str, Any], model_cfg: dict[str, Any],
                load_weights: bool) -> ModelSource:
    """An architecture with one of open_clip's pretrained tags: its weights file, preprocessing and QuickGELU."""
    repo, filename = os.path.split(str(tag_cfg.get("hf_hub", "")))
    kwargs: dict[str, Any] = {"force_preprocess_cfg": {key: value for key, value in tag_cfg.items()
                                                       if key in _PREPROCESS_KEYS and key != "size"}}
    if tag_cfg.get("quick_gelu") and not model_cfg.get("quick_gelu"):
        # open_clip only warns about the mismatch; the weights were trained with QuickGELU.
        kwargs["force_quick_gelu"] = True
        model_cfg = {**model_cfg, "quick_gelu": True}
    repos = (repo, *_tower_repos(model_cfg, False)) if repo else _tower_repos(model_cfg, False)
    weights = None
    if load_weights:
        if not repo:
            raise ModelUnavailable(f"model {name} pretrained={tag}: open_clip gives no hub repository for this "
                                   "tag; download its weights yourself and give their path as model.pretrained")
        with hub_errors(f"{name} (pretrained={tag})", repos):
            weights = download_weights(repo, filename or None)
    kwargs.update(_tower_kwargs(model_cfg, False))
    return ModelSource(name, name, name, model_cfg, weights, kwargs, repos)


_PREPROCESS_KEYS = {"size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color"}


def _read_config(path: Path, name: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"model {name}: {path.parent} has no {HF_CONFIG_NAME}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"model {name}: {path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise ValueError(f"model {name}: {path} has no model_cfg (not an open_clip model config)")
    return config


def _tower_kwargs(model_cfg: dict[str, Any], towers_pretrained: bool) -> dict[str, Any]:
    """open_clip's tower flags. ``towers_pretrained``: no CLIP weights follow, so towers may start from their own.

    open_clip ignores a config's ``timm_model_pretrained`` (its ``pretrained_image`` argument
    decides) and loads a Hugging Face text tower's weights unless told not to; clip_med follows the
    config (``timm_model_pretrained``, ``hf_model_pretrained``), and a model whose CLIP weights
    follow from a checkpoint downloads no tower weights. Nothing is passed for other architectures.
    """
    vision, text = model_cfg.get("vision_cfg") or {}, model_cfg.get("text_cfg") or {}
    kwargs: dict[str, Any] = {}
    if vision.get("timm_model_name") and vision.get("timm_model_pretrained"):
        kwargs["pretrained_image"] = towers_pretrained
    if text.get("hf_model_name"):
        kwargs["pretrained_text"] = towers_pretrained and bool(text.get("hf_model_pretrained", True))
    return kwargs


def _tower_repos(model_cfg: dict[str, Any], towers_pretrained: bool) -> tuple[str, ...]:
    """Hub repos of the towers: a Hugging Face text tower (config, tokenizer), a timm tower's weights."""
    vision, text = model_cfg.get("vision_cfg") or {}, model_cfg.get("text_cfg") or {}
    repos = [text.get("hf_model_name"), text.get("hf_tokenizer_name")]
    if towers_pretrained and vision.get("timm_model_pretrained") and vision.get("timm_model_name"):
        repos.append(_timm_repo(str(vision["timm_model_name"])))
    return tuple(dict.fromkeys(repo for repo in repos if repo and not Path(repo).expanduser().is_dir()))


def _timm_repo(model_name: str) -> str | None:
    import timm

    cfg = timm.models.get_pretrained_cfg(model_name)
    return getattr(cfg, "hf_hub_id", None) or None


# ---------------------------------------------------------------------------------------------
# Downloading through the cache


def download(repo: str, filename: str, revision: str | None = None) -> str:
    """One file of a hub repo, from the cache or downloaded into it (huggingface_hub's rules, HF_HUB_OFFLINE too)."""
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo, filename, revision=revision, library_name="clip_med")


def download_weights(repo: str, filename: str | None = None, revision: str | None = None) -> str:
    """A repo's open_clip weights, preferring the safetensors file as open_clip does.

    A candidate the cache already knows to be missing from the repo (huggingface_hub's
    ``.no_exist`` marker, written when the hub answered 404) is skipped without asking the hub
    again: with the hub unreachable, asking would only wait out huggingface_hub's retries.
    """
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError
    from huggingface_hub.file_download import _CACHED_NO_EXIST

    filename = filename or HF_WEIGHTS_NAME
    candidates = [*_safetensors_alternatives(filename), filename]
    for candidate in candidates:
        if candidate != candidates[-1] and \
                try_to_load_from_cache(repo, candidate, revision=revision) is _CACHED_NO_EXIST:
            continue
        try:
            return download(repo, candidate, revision)
        except EntryNotFoundError:
            if candidate == candidates[-1]:
                raise
    raise AssertionError("unreachable: the last candidate returns or raises")


def _safetensors_alternatives(filename: str) -> list[str]:
    """open_clip's safetensors names for a weights file (``_get_safe_alternatives``)."""
    if filename == HF_WEIGHTS_NAME:
        return [HF_SAFE_WEIGHTS_NAME]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors"]
    return []


# Before its config is read, the repos a hub model's text tower needs are not known yet.
_TEXT_TOWER_HINT = ("and the repository its open_clip_config.json names for a Hugging Face text tower "
                    "(text_cfg.hf_model_name / hf_tokenizer_name), if any")


@contextlib.contextmanager
def hub_errors(model: str, repos: tuple[str, ...] | list[str], also: str = "") -> Iterator[None]:
    """Turn a hub failure raised inside (by huggingface_hub, or wrapped by transformers, timm or open_clip)
    into one :class:`ModelUnavailable` line; anything else passes unchanged."""
    try:
        yield
    except ModelUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001  (re-raised unless a hub error is in its chain)
        cause = _hub_cause(exc)
        if cause is None:
            raise
        raise ModelUnavailable(unavailable_message(model, repos, cause, also)) from None


def _hub_cause(exc: BaseException) -> BaseException | None:
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
    )

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, EntryNotFoundError)):
            return current
        current = current.__cause__ or current.__context__
    return None


def unavailable_message(model: str, repos: tuple[str, ...] | list[str], cause: BaseException, also: str = "") -> str:
    """What went wrong with ``model``'s files, and what to do (one line)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repos = [repo for repo in repos if repo]
    fetch = " and ".join(f"`hf download {repo}`" for repo in repos) or "`hf download <repo>`"
    fetch += f" ({also})" if also else ""
    cache = hub_cache()
    if isinstance(cause, GatedRepoError):
        return (f"model {model}: {_repo_of(cause, repos)} is a gated repository on the Hugging Face hub: accept its "
                "terms on the hub, then log in (`hf auth login`) or set HF_TOKEN")
    if isinstance(cause, RepositoryNotFoundError):
        return (f"model {model}: the Hugging Face hub ({constants.ENDPOINT}) has no repository "
                f"{_repo_of(cause, repos)} (check the name; a private one needs `hf auth login` or HF_TOKEN)")
    if isinstance(cause, RevisionNotFoundError):
        return f"model {model}: {_repo_of(cause, repos)} has no such revision on the hub"
    if isinstance(cause, RemoteEntryNotFoundError):
        return f"model {model}: {_repo_of(cause, repos)} on the hub lacks a file the model needs ({_url_of(cause)})"
    if isinstance(cause, (LocalEntryNotFoundError, OfflineModeIsEnabled)) or offline():
        why = ("HF_HUB_OFFLINE=1 forbids downloading" if offline()
               else f"the hub ({constants.ENDPOINT}) cannot be reached")
        return (f"model {model} is not in the Hugging Face cache ({cache}) and {why}. Fetch it ahead of time: "
                f"on a machine with internet access run {fetch}, then copy that machine's cache folder "
                f"(its HF_HUB_CACHE, by default ~/.cache/huggingface/hub) to {cache} here, or point HF_HUB_CACHE "
                "(or HF_HOME) at the copy")
    return f"model {model}: the Hugging Face hub ({constants.ENDPOINT}) refused a download: {_first_line(cause)}"


def _repo_of(cause: BaseException, repos: list[str]) -> str:
    url = _url_of(cause)
    return next((repo for repo in repos if f"/{repo}/" in url), repos[0] if repos else "the repository")


def _url_of(cause: BaseException) -> str:
    response = getattr(cause, "response", None)
    return str(getattr(getattr(response, "request", None), "url", "") or "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# torchrun


def first_on_rank_zero(info: distributed.DistInfo, build: Callable[[], T]) -> T:
    """``build()`` on rank 0 first (it downloads into the cache), then on the other ranks (they read the cache).

    A failure on rank 0 is sent to the others, which stop with the same message instead of waiting.
    The others wait for the download through the store (``distributed.barrier``, under the long phase
    timeout), not under the collectives' timeout, which a large download could outlast.
    """
    result: Any = None
    failure: tuple[bool, str] | None = None
    error: Exception | None = None
    if info.is_main:
        try:
            result = build()
        except Exception as exc:
            failure, error = (isinstance(exc, ModelUnavailable), str(exc)), exc
    distributed.barrier(info, "rank 0's model download")
    failure = distributed.broadcast_object(failure, info)
    if info.is_main:
        if error is not None:
            raise error
        return result
    if failure is not None:
        unavailable, message = failure
        if unavailable:
            raise ModelUnavailable(message)
        raise RuntimeError(f"rank 0 could not create the model: {message}")
    return build()
