"""Writer processes and progress: workers start light, progress is logged with rate and ETA."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from helpers import write_png

from clip_med.data.record import Record
from clip_med.data.writer import ShardConfig, write_split

ROOT = Path(__file__).resolve().parents[1]


def test_worker_processes_do_not_import_the_parents_main_module(tmp_path):
    """A spawned worker imports its parent's script first (for `python -m clip_med.train`: torch);
    the writer's pool starts its workers without it."""
    marker = tmp_path / "imported.txt"
    script = tmp_path / "main_script.py"
    script.write_text(textwrap.dedent(f"""
        import os
        with open({str(marker)!r}, "a") as handle:
            handle.write(str(os.getpid()) + "\\n")
        if __name__ == "__main__":
            import sys
            sys.path.insert(0, {str(ROOT / 'tests')!r})
            from pathlib import Path
            from helpers import write_png
            from clip_med.data.record import Record
            from clip_med.data.writer import ShardConfig, write_split
            folder = Path({str(tmp_path / 'img')!r})
            folder.mkdir()
            records = [Record(id=str(i), split="train", image=str(write_png(folder / f"{{i}}.png", seed=i)),
                              caption="c", text="c") for i in range(6)]
            manifest = write_split(records, "train", {str(tmp_path / 'out')!r},
                                   ShardConfig(workers=2, progress=False), "src")
            assert manifest.written_count == 6
    """))
    result = subprocess.run([sys.executable, str(script)], env={**os.environ, "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(marker.read_text().split()) == 1  # the parent only


def test_progress_is_logged_with_rate_and_eta(tmp_path, caplog):
    folder = tmp_path / "img"
    folder.mkdir()
    records = [Record(id=str(i), split="train", image=str(write_png(folder / f"{i}.png", seed=i)), caption="c",
                      text="c") for i in range(5)]
    write_split(records, "train", tmp_path / "out", ShardConfig(workers=0, progress=True, log_every_s=1e-9), "src")
    lines = [record.message for record in caplog.records if "ETA" in record.message]
    assert lines and "/s, ETA" in lines[-1] and "/5 records" in lines[-1]
