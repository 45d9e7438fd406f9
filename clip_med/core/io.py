"""Durable, atomic file writes: the one place that creates temporaries, fsyncs and renames.

Every file another process may read (shards, manifests, journals, checkpoints, exports, indexes,
probe heads, reports, embedding parts) is written through :func:`atomic_write`:

* the data goes to a temporary file in the destination's own folder, named
  ``.<name>.<8 hex digits>.tmp`` (:func:`temporary_target` recognises it, so stale ones left by a
  killed process can be cleaned up);
* on success it is flushed and fsynced, renamed over the destination (``os.replace``) and the
  folder is fsynced, so a reader sees the old file or the new one, never half of one;
* on any exception the temporary is removed and the destination is untouched.

Files get the permissions of any newly created file of the process (``0o666 & ~umask``, and
a folder's default ACL where there is one), not the ``0600`` of ``tempfile.mkstemp``, also when
a library (safetensors, faiss, pyarrow) writes the temporary itself from its path.

Append-only logs (the writer's journal) use :func:`append_text`, which fsyncs each append.
``tests/test_atomic_write.py`` checks that no other module calls ``os.replace`` or ``os.fsync``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[0-9a-f]{8}\.tmp")
_LEGACY_TEMPORARY = re.compile(r"\.?(?P<name>.+)\.tmp")  # `<name>.tmp` / `.<name>.tmp` of earlier versions

Mode = Literal["wb", "w", "path"]


def temporary_name(name: str) -> str:
    """A fresh temporary name for destination ``name``: ``.<name>.<8 hex digits>.tmp``."""
    return f".{name}.{secrets.token_hex(4)}{TMP_SUFFIX}"


def temporary_target(name: str) -> str | None:
    """The destination name a temporary called ``name`` was written for, or None if it is not one.

    Also recognises the fixed ``<name>.tmp`` / ``.<name>.tmp`` temporaries of earlier clip_med versions."""
    match = _TEMPORARY.fullmatch(name) or _LEGACY_TEMPORARY.fullmatch(name)
    return match.group("name") if match else None


def temporaries(folder: str | Path, pattern: str = "*") -> list[Path]:
    """Temporaries in ``folder`` for destinations whose name matches the glob ``pattern``: debris of a
    write that was killed. Only for folders a single writer owns (a live writer's temporary matches too)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir()
                  if (target := temporary_target(path.name)) is not None and fnmatch.fnmatchcase(target, pattern))


def fsync_dir(folder: str | Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened or synced."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        log.debug("fsync of folder %s not supported", folder)
    finally:
        os.close(fd)


def fsync_path(path: str | Path) -> None:
    """Flush a file that something else wrote (by its path) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_temporary(path: Path) -> tuple[Path, int]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.with_name(temporary_name(path.name))
        try:
            # 0o666: the kernel applies the umask (and a default ACL), as for any newly created file
            return tmp, os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file next to {path}")


class AtomicFile:
    """One pending atomic write of ``path``: :meth:`commit` publishes it, :meth:`abort` drops it.

    For writes that span several calls (the shard writer's open shard); elsewhere use :func:`atomic_write`.
    ``mode`` is ``"wb"`` (``file`` is a binary file object), ``"w"`` (text, UTF-8 unless ``encoding``)
    or ``"path"`` (``file`` is None; write to ``tmp`` by path, e.g. with ``faiss.write_index``,
    safetensors ``save_file``, ``pyarrow.parquet.write_table`` or ``np.lib.format.open_memmap``;
    the library must write exactly that path: ``np.save`` appends ``.npy`` and ``savefig`` guesses the
    format from the suffix, so give those a file object or an explicit ``format``)."""

    def __init__(self, path: str | Path, mode: Mode = "wb", *, encoding: str | None = None,
                 newline: str | None = None):
        if mode not in ("wb", "w", "path"):
            raise ValueError(f"mode must be 'wb', 'w' or 'path', not {mode!r}")
        self.path = Path(path)
        self.tmp, fd = _create_temporary(self.path)
        self.file: IO[Any] | None = None
        self._finished = False
        try:
            self._permissions = os.fstat(fd).st_mode & 0o7777
            if mode == "path":
                os.close(fd)
            elif mode == "wb":
                self.file = os.fdopen(fd, "wb")
            else:
                self.file = os.fdopen(fd, "w", encoding=encoding or "utf-8", newline=newline)
        except BaseException:
            if self.file is None:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.tmp.unlink(missing_ok=True)
            raise

    def commit(self) -> Path:
        """Flush and fsync the temporary, rename it over ``path``, fsync the folder; returns ``path``.
        On failure the temporary is removed and ``path`` is untouched."""
        if self._finished:
            raise RuntimeError(f"the write of {self.path} is already finished")
        try:
            if self.file is not None:
                self.file.flush()
                os.fsync(self.file.fileno())
                self.file.close()
            else:
                fsync_path(self.tmp)
            # a library writing by path may have recreated the file with its own mode (0600)
            os.chmod(self.tmp, self._permissions)
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._finished = True
        fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        """Close and remove the temporary; ``path`` is untouched. Safe to call more than once."""
        if self._finished:
            return
        self._finished = True
        if self.file is not None:
            with contextlib.suppress(OSError, ValueError):  # flushing the rest may fail again (disk full)
                self.file.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: Mode = "wb", *, encoding: str | None = None,
                 newline: str | None = None) -> Iterator[Any]:
    """Write ``path`` atomically and durably (see the module docstring).

    Yields a binary file object (``mode="wb"``), a text one (``"w"``, UTF-8 unless ``encoding``) or,
    with ``mode="path"``, the temporary's :class:`~pathlib.Path` for libraries that write by name
    (see :class:`AtomicFile` for the caveats). The file is published when the block ends without an
    exception; on any exception the temporary is removed and ``path`` is untouched."""
    pending = AtomicFile(path, mode, encoding=encoding, newline=newline)
    try:
        yield pending.file if pending.file is not None else pending.tmp
    except BaseException:
        pending.abort()
        raise
    pending.commit()


def write_text_atomic(path: str | Path, text: str, *, encoding: str = "utf-8", newline: str | None = None) -> Path:
    with atomic_write(path, "w", encoding=encoding, newline=newline) as handle:
        handle.write(text)
    return Path(path)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    with atomic_write(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """``data`` as JSON (indent 1, sorted keys, UTF-8 unescaped), written atomically."""
    return write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False))


def append_text(path: str | Path, text: str, *, encoding: str = "utf-8") -> None:
    """Append ``text`` to an append-only log and fsync it (a reader may see a last line cut short by a
    kill, never a line lost after this returns). Not atomic: logs are parsed line by line."""
    with open(path, "a", encoding=encoding) as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
