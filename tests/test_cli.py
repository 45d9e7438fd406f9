import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_command_honours_hydra_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    overrides = [
        f"hydra.run.dir={run_dir}", f"shards.out={tmp_path / 'shards'}", "source.image_size=32",
        "source.sizes={train:64,dev:32}", "model.image_size=32", "trainer.epochs=1", "trainer.progress=false",
        "shards.progress=false", "shards.workers=0", "data.loader.workers=0", "data.loader.batch_size=16",
        "eval.workers=0", "eval.probe_folds=2", "shards.max_samples=16",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "clip_med.train", *overrides], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["step"] == 4 and report["source"] == "synthetic"
    assert (run_dir / "metrics.jsonl").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    assert (tmp_path / "shards" / "train.manifest.json").is_file()


def test_medpix_without_data_says_how_to_get_it(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "MEDPIX_ROOT"}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, "-m", "clip_med.train", "+exp=medpix", f"hydra.run.dir={tmp_path}"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "github.com/CHILab1/MedPix-2.0" in result.stderr and "MEDPIX_ROOT" in result.stderr
    # one line, no traceback (tests/test_cli_errors.py: every command)
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
