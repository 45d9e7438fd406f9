"""clip_med: CLIP-style contrastive pretraining on medical image–caption pairs, and using the models.

``clip_med.load(checkpoint)`` returns a :class:`~clip_med.inference.model.ClipMedModel`
(``classify``, ``embed_images``, ``embed_texts``, ``search``); ``clip_med.open_index(dir)`` opens
a search index written by ``python -m clip_med.embed``. Both are imported lazily: importing
``clip_med`` itself stays light (no torch), because the shard writer's worker processes import
``clip_med.data`` through it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["load", "open_index", "__version__"]

_LAZY = {
    "load": ("clip_med.inference.model", "load"),
    "open_index": ("clip_med.inference.index", "open_index"),
}

if TYPE_CHECKING:  # pragma: no cover
    from clip_med.inference.index import open_index
    from clip_med.inference.model import load


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module_name, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module_name), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'clip_med' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
