import atexit
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# The DICOM id key (clip_med.data.dicom_deid) in a folder of the test run, not in ~/.config;
# set here so that the commands the tests start inherit it too.
if "CLIP_MED_ID_SECRET_FILE" not in os.environ:
    _SECRET_DIR = tempfile.mkdtemp(prefix="clip_med_tests_")
    atexit.register(shutil.rmtree, _SECRET_DIR, ignore_errors=True)
    os.environ["CLIP_MED_ID_SECRET_FILE"] = str(Path(_SECRET_DIR) / "id_secret")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes minutes; run with --runslow")
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it")
    config.addinivalue_line("markers", "browser: drives headless Chromium (chromium, chromedriver); skipped without")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    missing_browser = browser_missing() if any("browser" in item.keywords for item in items) else ""
    skip_browser = pytest.mark.skip(reason=f"needs headless Chromium: {missing_browser}")
    for item in items:
        if "browser" in item.keywords and missing_browser:
            item.add_marker(skip_browser)
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def browser_missing() -> str:
    """Why the browser tests cannot run here ('' when they can): Chromium, its driver and selenium."""
    if not (shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")):
        return "no chromium on PATH (apt-get install chromium chromium-driver)"
    if not shutil.which("chromedriver"):
        return "no chromedriver on PATH (apt-get install chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return ""


@pytest.fixture
def medpix_real_root():
    root = SHARED_DATA / "medpix-2.0"
    if not (root / "Descriptions.json").is_file():
        pytest.skip("../shared/data/medpix-2.0 is not present")
    return root


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.INFO)
