"""notebooks/quickstart.ipynb runs top to bottom (tiny model, tiny MedPix-layout folder), so it never rots."""

import os
import sys
from pathlib import Path

import nbformat
from api_helpers import save_checkpoint
from helpers import make_medpix
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    root = make_medpix(tmp_path / "medpix", {"train": 4, "dev": 4}, images_per_case=2)
    monkeypatch.setenv("CLIP_MED_CHECKPOINT", str(save_checkpoint(tmp_path / "run", max_side=40)))
    monkeypatch.setenv("MEDPIX_ROOT", str(root))
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # The kernel runs "python": make it this interpreter.
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    notebook = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    text = "\n".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                     for output in cell.get("outputs", []))
    assert "8 images in dev" in text
    assert "modality: accuracy" in text and "anatomy: accuracy" in text
    assert "text -> image recall over 8 pairs" in text
    assert "CT_small.dcm" in text and "MR_small.dcm" in text
    images = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
              if "image/png" in output.get("data", {})]
    assert len(images) == 3  # predictions, confusion matrices, retrieval grid
