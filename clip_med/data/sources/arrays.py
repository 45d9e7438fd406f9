"""Images stored as rows of an array: members of a NumPy ``.npz`` file (MedMNIST) and HDF5 datasets (PCam).

A record's locator names the file, the array and the row (:func:`array_locator`); the decoders
``npz_array`` and ``h5_array`` (:data:`clip_med.data.images.DECODERS`) read just that row:

* ``.npz``: the member's ``.npy`` header is parsed (``numpy.lib.format``: shape, dtype, order;
  nothing is unpickled, and only unsigned 8-bit or other plain numeric dtypes are accepted), and
  the row's bytes are read from the member's stream. The stream of each (file, member) stays open
  in the process, so rows read in order cost one pass over the member even when it is compressed.
* HDF5: the row is read with h5py (chunked, compressed datasets included); files stay open in
  the process.

An open stream or file is opened again when its file has another size or modification time (a
replaced file); the same two enter the shard writer's fingerprint (:attr:`Record.input_file`),
so a replaced file is resharded rather than taken as unchanged.

Rows must be ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)``; other dtypes than ``uint8`` are rescaled
to 0..255 like any other image (:func:`clip_med.data.images.rescale_to_uint8`).
"""

from __future__ import annotations

import json
import math
import os
import threading
import zipfile
from collections import OrderedDict
from typing import Any

import numpy as np
from PIL import Image

from clip_med.data.images import ImageLimits, ImageRejected, check_dimensions, rescale_to_uint8
from clip_med.data.record import SkipReason

MAX_OPEN = 8  # open streams / files kept per process
_lock = threading.Lock()


def array_locator(path: str, array: str, row: int) -> str:
    return json.dumps([str(path), array, int(row)])


def _parse(locator: str) -> tuple[str, str, int]:
    path, array, row = json.loads(locator)
    if not isinstance(path, str) or not isinstance(array, str) or not isinstance(row, int) or row < 0:
        raise ValueError(f"not an array locator: {locator[:200]}")
    return path, array, row


def npy_header(handle: Any) -> tuple[tuple[int, ...], np.dtype, bool]:
    """(shape, dtype, fortran order) of the ``.npy`` stream at its start; refuses object dtypes."""
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
    if dtype.hasobject or dtype.kind not in "uif" or dtype.fields is not None:
        raise ValueError(f"holds {dtype} values; only plain numbers can be images")
    return tuple(shape), dtype, bool(fortran)


class _NpzStream:
    """One member of a ``.npz`` file, read row by row from a stream kept open."""

    def __init__(self, path: str, member: str):
        self.archive = zipfile.ZipFile(path)
        self.member = member
        self._open()

    def _open(self) -> None:
        self.handle = self.archive.open(self.member)
        self.shape, self.dtype, fortran = npy_header(self.handle)
        if fortran and len(self.shape) > 1:
            raise ValueError("is stored in Fortran order; rows cannot be read one by one")
        self.data_start = self.handle.tell()
        self.row_bytes = self.dtype.itemsize * math.prod(self.shape[1:])

    def row(self, index: int) -> np.ndarray:
        if not self.shape or index >= self.shape[0]:
            raise IndexError(f"row {index} is outside the {self.shape[0] if self.shape else 0} rows")
        offset = self.data_start + index * self.row_bytes
        if self.handle.tell() > offset:  # backwards: a compressed stream starts again
            self.handle.close()
            self._open()
        self.handle.seek(offset)
        data = self.handle.read(self.row_bytes)
        if len(data) != self.row_bytes:
            raise EOFError(f"row {index} is cut short")
        return np.frombuffer(data, dtype=self.dtype).reshape(self.shape[1:])

    def close(self) -> None:
        self.handle.close()
        self.archive.close()


_npz_streams: OrderedDict[tuple[str, str], _NpzStream] = OrderedDict()
_h5_files: OrderedDict[str, Any] = OrderedDict()


def _cached(cache: OrderedDict, key: Any, path: str, make, close) -> Any:
    """The open stream or file of ``key``, opened again when the file at ``path`` was replaced since
    (another size or modification time): a resharded file is never read through a stale handle."""
    stat = os.stat(path)
    state = (stat.st_size, stat.st_mtime_ns)
    found = cache.get(key)
    if found is not None and found[0] != state:
        close(cache.pop(key)[1])
        found = None
    if found is None:
        found = cache[key] = (state, make())
        while len(cache) > MAX_OPEN:
            close(cache.popitem(last=False)[1][1])
    cache.move_to_end(key)
    return found[1]


def npz_row(path: str, array: str, row: int) -> np.ndarray:
    member = array if array.endswith(".npy") else f"{array}.npy"
    with _lock:
        stream = _cached(_npz_streams, (path, member), path, lambda: _NpzStream(path, member), _NpzStream.close)
        return stream.row(row)


def h5_row(path: str, array: str, row: int) -> np.ndarray:
    import h5py

    with _lock:
        handle = _cached(_h5_files, path, path, lambda: h5py.File(path, "r"), lambda file: file.close())
        dataset = handle[array]
        if not isinstance(dataset, h5py.Dataset) or dataset.dtype.kind not in "uif":
            raise ValueError(f"{array} is not a numeric dataset")
        if row >= dataset.shape[0]:
            raise IndexError(f"row {row} is outside the {dataset.shape[0]} rows")
        return np.asarray(dataset[row])


def row_to_image(values: np.ndarray, limits: ImageLimits, where: str) -> Image.Image:
    if values.ndim == 3 and values.shape[2] == 1:
        values = values[:, :, 0]
    if values.ndim not in (2, 3) or (values.ndim == 3 and values.shape[2] != 3):
        raise ImageRejected(SkipReason.UNSUPPORTED_MODE, f"{where} has shape {values.shape}; an image row must be "
                                                         "(H, W), (H, W, 1) or (H, W, 3)")
    check_dimensions(values.shape[1], values.shape[0], limits, where)
    if values.dtype != np.uint8:
        values = rescale_to_uint8(values.astype(np.float64))
    return Image.fromarray(np.ascontiguousarray(values), mode="L" if values.ndim == 2 else "RGB")


def _read(reader, locator: str, limits: ImageLimits) -> tuple[Image.Image, None]:
    path, array, row = _parse(locator)
    where = f"{path}:{array}[{row}]"
    try:
        values = reader(path, array, row)
    except FileNotFoundError:
        raise ImageRejected(SkipReason.MISSING_FILE, f"{path} does not exist") from None
    except (OSError, ValueError, KeyError, IndexError, EOFError, zipfile.BadZipFile) as exc:
        raise ImageRejected(SkipReason.TRUNCATED, f"{where}: {exc}") from None
    return row_to_image(values, limits, where), None


def read_npz_item(locator: str, limits: ImageLimits, max_side: int | None = None) -> tuple[Image.Image, None]:
    """The ``npz_array`` decoder: ``[file, array, row]`` -> that row of the ``.npz`` member as an image."""
    return _read(npz_row, locator, limits)


def read_h5_item(locator: str, limits: ImageLimits, max_side: int | None = None) -> tuple[Image.Image, None]:
    """The ``h5_array`` decoder: ``[file, dataset, row]`` -> that row of the HDF5 dataset as an image."""
    return _read(h5_row, locator, limits)
