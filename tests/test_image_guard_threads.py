"""The image-size guard holds under concurrent decodes without touching process-wide state.

Inference decodes in a thread pool and the HTTP service runs sync routes in threads: a guard that
switched Pillow's ``Image.MAX_IMAGE_PIXELS`` off and back around each decode could, interleaved,
leave Pillow's decompression-bomb check off for the whole process.
"""

from __future__ import annotations

import io
import logging
import struct
import sys
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from clip_med.data.images import ImageLimits, ImageRejected, open_image_bytes
from clip_med.data.record import SkipReason


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(
        b"IEND", b"")


def _png(side: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side), dtype=np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


LIMITS = ImageLimits(max_pixels=200 * 200)
CASES = {
    "normal": (_png(64), None),
    "over clip_med's limit, real pixels": (_png(256, seed=1), SkipReason.TOO_MANY_PIXELS),
    # between Pillow's warning and error limits: only clip_med's check refuses it
    "header over Pillow's warning limit": (_png_claiming(12_000, 9_000), SkipReason.TOO_MANY_PIXELS),
    # over twice Pillow's limit: Pillow itself refuses it, reported as clip_med's ImageRejected
    "header over Pillow's error limit": (_png_claiming(30_000, 30_000), SkipReason.TOO_MANY_PIXELS),
}


def _decode(name: str) -> str:
    data, expected = CASES[name]
    try:
        image = open_image_bytes(data, LIMITS, name)
    except ImageRejected as exc:
        return exc.reason
    assert image.size == (64, 64)
    return "ok"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_concurrent_decodes_never_change_pillows_limit_and_always_refuse_oversized_images():
    original = Image.MAX_IMAGE_PIXELS
    assert original is not None, "another test left Pillow's decompression-bomb guard off"
    seen, stop = set(), threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.add(Image.MAX_IMAGE_PIXELS)

    watcher = threading.Thread(target=watch, daemon=True)
    names = list(CASES) * 300
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, as a loaded server would: a per-call toggle shows up here
    try:
        watcher.start()
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(_decode, names))
    finally:
        sys.setswitchinterval(interval)
        stop.set()
        watcher.join()
    expected = [CASES[name][1] or "ok" for name in names]
    assert results == expected
    assert Image.MAX_IMAGE_PIXELS == original, "a decode left Pillow's limit changed"
    assert seen == {original}, f"Pillow's limit was changed during decodes: {seen}"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_the_oversized_images_are_refused_by_clip_meds_check_in_one_thread_too():
    for name, (data, reason) in CASES.items():
        if reason is None:
            continue
        with pytest.raises(ImageRejected) as caught:
            open_image_bytes(data, LIMITS, name)
        assert caught.value.reason == reason, name
        assert "pixels" in caught.value.detail


def test_quieting_pydicom_touches_neither_its_logger_level_nor_other_threads(caplog):
    pytest.importorskip("pydicom")
    from clip_med.data import dicom

    dicom._pydicom()
    logger = logging.getLogger("pydicom")
    level, inside, release = logger.level, threading.Event(), threading.Event()

    def quiet() -> None:
        with dicom._quiet_pydicom():
            logging.getLogger("pydicom.pixels.decoders.base").warning("hidden: a failed plugin")
            logger.warning("hidden too")
            inside.set()
            release.wait(10)

    with caplog.at_level(logging.WARNING):
        thread = threading.Thread(target=quiet)
        thread.start()
        assert inside.wait(10)
        assert logger.level == level
        logger.warning("visible from another thread")
        release.set()
        thread.join()
    messages = [record.getMessage() for record in caplog.records]
    assert "visible from another thread" in messages
    assert not [message for message in messages if message.startswith("hidden")]
    assert logger.level == level
