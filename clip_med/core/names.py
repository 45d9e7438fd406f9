"""Names that come from data (split names, shard names) and become parts of file names or URLs.

A split value in a table, a shard name in a fetched manifest or a name in a request is data, not
a path: before clip_med builds a file name, a URL or a ``pipe:`` command from one, it must be a
*safe name*: 1 to 64 ASCII letters, digits, ``_``, ``-`` and ``.``, starting with a letter or
digit, without ``..``. That leaves out every separator (``/``, ``\\``), drive letters (``C:``),
percent-encoding, whitespace and shell metacharacters (``;``, ``|``, ``$``, backquotes), NUL, and
Unicode look-alikes (fullwidth solidus, division slash, ...), since only ASCII passes.
"""

from __future__ import annotations

import re

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SHARD_FILE = re.compile(r"(?P<split>[A-Za-z0-9][A-Za-z0-9_.-]{0,63})-(?P<index>\d{6})\.tar")


def is_safe_name(value: object) -> bool:
    return isinstance(value, str) and SAFE_NAME.fullmatch(value) is not None and ".." not in value


def check_name(value: object, what: str) -> str:
    """``value`` when it is a safe name; otherwise a ValueError saying what is allowed."""
    if not is_safe_name(value):
        raise ValueError(f"{what} {_shown(value)} is not a safe name: use 1-64 ASCII letters, digits, '_', '-' or "
                         "'.' (starting with a letter or digit, no '..'); it becomes part of file names")
    return str(value)


def check_shard_file(value: object, split: str, where: str) -> str:
    """A shard name as the writer makes it, ``<split>-NNNNNN.tar``, for ``split``."""
    match = SHARD_FILE.fullmatch(value) if isinstance(value, str) else None
    if match is None or match.group("split") != split or ".." in split:
        raise ValueError(f"{where} lists the shard {_shown(value)}, which is not a {split}-NNNNNN.tar name as "
                         "clip_med writes them; refusing to open it (a manifest names shards, never paths or "
                         "commands)")
    return str(value)


def _shown(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"
