"""Worker process pools for CPU-bound data work (image preparation, caption rules).

Pools use "spawn": the parent may hold torch's thread pools, which do not survive a fork. A
spawned process imports its parent's ``__main__`` module first (``python -m clip_med.train``
or a benchmark script: torch and everything, seconds per worker), although these workers only
run functions of light modules (Pillow, numpy). Spawn decides what to import from the main
module's ``__spec__`` and ``__file__`` when each process starts, so both are hidden while the
pool starts its workers and restored right after. Worker functions must therefore live in an
importable module, never in ``__main__``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import sys
from collections.abc import Iterator
from multiprocessing.pool import Pool


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    main = sys.modules.get("__main__")
    saved = {name: getattr(main, name) for name in ("__spec__", "__file__") if hasattr(main, name)}
    try:
        if main is not None:
            main.__spec__ = None
            if "__file__" in saved:
                del main.__file__
        yield
    finally:
        for name, value in saved.items():
            setattr(main, name, value)


@contextlib.contextmanager
def spawn_pool(workers: int) -> Iterator[Pool]:
    """A "spawn" pool of ``workers`` processes that start without the parent's ``__main__``."""
    with _main_module_hidden():
        pool = multiprocessing.get_context("spawn").Pool(workers)
    with pool:
        yield pool
