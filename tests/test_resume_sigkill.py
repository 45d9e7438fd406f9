"""Step-exact resume after SIGKILL: mid-epoch, in the middle of a checkpoint write, and from outside.

Each training process runs this file as its script (see ``__main__``): the ``kill`` setting
makes it SIGKILL itself at a chosen point (nothing can be cleaned up: it is what a pre-empted
or OOM-killed process leaves behind). The resumed runs must land on the same final step with
the same per-step losses and weights as an uninterrupted run. Two loader workers per process,
so the resumed epoch must also continue the workers' round-robin where it stopped.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers import tiny_train_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12  # 96 pairs, 2 workers x 2 shards of 24, batch 16: 6 steps per epoch, 2 epochs


def run_config(base: Path, settings: dict):
    cfg = tiny_train_config(base)
    cfg.run_dir = str(base / settings.get("run", "run"))
    cfg.data.loader.workers = 2
    cfg.data.loader.prefetch_factor = 2
    cfg.trainer.checkpoint_every_steps = settings.get("checkpoint_every", 5)
    cfg.trainer.keep_checkpoints = 2
    cfg.eval.tasks = ["modality"]
    cfg.resume = "latest" if settings.get("resume") else None
    return cfg


# ---------------------------------------------------------------------------------------------
# Driver: one training process


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install_kill(kill: dict) -> None:
    import clip_med.training.trainer as trainer

    if "at_step" in kill:  # dies as step `at_step` begins: steps before it are done
        original = trainer._train_step

        def step(run, group):
            if run.state.step + 1 == kill["at_step"]:
                run.writer.wait()  # the background write of the checkpoint before lands first (mid-write: below)
                _kill_self()
            return original(run, group)

        trainer._train_step = step
    if "in_write_of_step" in kill:  # dies with half of that checkpoint on disk (written by the background thread)
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if isinstance(obj, dict) and obj.get("train_state", {}).get("step") == kill["in_write_of_step"]:
                buffer = io.BytesIO()
                real_save(obj, buffer)
                data = buffer.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                _kill_self()
            return real_save(obj, f, *args, **kwargs)

        torch.save = save


def _driver(base: Path, settings: dict) -> None:
    from clip_med.training.trainer import train

    torch.set_num_threads(1)
    _install_kill(settings.get("kill", {}))
    train(run_config(base, settings))


# ---------------------------------------------------------------------------------------------
# The test side


def _start(base: Path, settings: dict) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, __file__, str(base), json.dumps(settings)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _run_killed(base: Path, settings: dict) -> None:
    process = _start(base, settings)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL, output[-4000:]


def _run_here(base: Path, settings: dict) -> None:
    """A run that is not killed, in this process (one thread, like the driver processes: same numbers)."""
    from clip_med.training.trainer import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(run_config(base, settings))
    finally:
        torch.set_num_threads(threads)


def _losses(run_dir: Path) -> dict[int, float]:
    from clip_med.training.metrics_log import read_metrics

    return {row["step"]: row["train/loss"] for row in read_metrics(run_dir) if "train/loss" in row}


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from clip_med.training.checkpoint import latest_checkpoint, load_checkpoint

    checkpoint = load_checkpoint(latest_checkpoint(run_dir))
    assert checkpoint["train_state"]["step"] == STEPS
    return checkpoint["state_dict"]


def _assert_latest_loads(run_dir: Path) -> int:
    from clip_med.training.checkpoint import find_resume_checkpoint, list_checkpoints

    found = find_resume_checkpoint("latest", run_dir)
    assert found is not None and found[0] == list_checkpoints(run_dir)[-1]
    return found[1]["train_state"]["step"]


def _assert_same_as_reference(run_dir: Path, reference: Path) -> None:
    losses, expected = _losses(run_dir), _losses(reference)
    assert sorted(losses) == list(range(1, STEPS + 1)) == sorted(expected)
    assert [losses[step] for step in sorted(losses)] == pytest.approx([expected[s] for s in sorted(expected)],
                                                                      abs=1e-5)
    weights, reference_weights = _final_weights(run_dir), _final_weights(reference)
    for name, value in weights.items():
        torch.testing.assert_close(value, reference_weights[name], rtol=0, atol=1e-5, msg=name)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["step"] == STEPS and report["resumed_from"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Shards and one uninterrupted reference run, shared by the tests here."""
    folder = tmp_path_factory.mktemp("sigkill")
    _run_here(folder, {"run": "reference"})
    return folder


def test_sigkill_mid_epoch_and_mid_checkpoint_write_then_resume_matches(base):
    run_dir, settings = base / "killed", {"run": "killed", "checkpoint_every": 3}
    # Checkpoints fall at steps 3 and 9 (mid-epoch, worker 1's batch due next) and 6 and 12 (epoch ends).
    # 1. Killed as step 6 begins: metrics are ahead of the newest checkpoint (step 3).
    _run_killed(base, {**settings, "kill": {"at_step": 6}})
    assert _assert_latest_loads(run_dir) == 3 and max(_losses(run_dir)) == 5
    # 2. Resumed, then killed half-way through writing the checkpoint of step 9.
    _run_killed(base, {**settings, "resume": True, "kill": {"in_write_of_step": 9}})
    assert list((run_dir / "checkpoints").glob(".step-00000009.pt.*.tmp")), "the kill was not mid-write"
    assert _assert_latest_loads(run_dir) == 6
    # 3. Resumed, killed again in epoch 2 after the checkpoint of step 9.
    _run_killed(base, {**settings, "resume": True, "kill": {"at_step": 11}})
    assert _assert_latest_loads(run_dir) == 9
    assert not list((run_dir / "checkpoints").glob("*.tmp"))  # the half-written file was cleared away
    # 4. Resumed from step 9: runs to the end.
    _run_here(base, {**settings, "resume": True})
    _assert_same_as_reference(run_dir, base / "reference")


def test_external_sigkill_while_a_checkpoint_is_written(base):
    run_dir, settings = base / "external", {"run": "external", "checkpoint_every": 3}
    process = _start(base, settings)
    deadline = time.monotonic() + 240
    # Wait until the checkpoint of step 9 is being written, then kill the process group from outside.
    while not list((run_dir / "checkpoints").glob(".step-00000009.pt.*.tmp")):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.002)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    assert _assert_latest_loads(run_dir) in (6, 9)  # 9 only if the write finished before the kill landed
    _run_here(base, {**settings, "resume": True})
    _assert_same_as_reference(run_dir, base / "reference")


def test_resume_with_other_loader_workers_restarts_the_epoch(tmp_path, monkeypatch, caplog):
    import clip_med.training.trainer as trainer

    original = trainer._train_step

    def crash_at_step_9(run, group):
        if run.state.step == 8:
            raise RuntimeError("simulated crash")
        return original(run, group)

    monkeypatch.setattr(trainer, "_train_step", crash_at_step_9)
    cfg = run_config(tmp_path, {"checkpoint_every": 4})
    cfg.data.loader.workers = 1
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run_config_here(cfg)
    monkeypatch.setattr(trainer, "_train_step", original)
    resumed = run_config(tmp_path, {"checkpoint_every": 4, "resume": True})  # 2 workers now
    _run_config_here(resumed)
    assert any("epoch 2 restarts from its beginning" in r.getMessage() for r in caplog.records)
    losses = _losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, STEPS + 1))  # steps 7-8 were trained again, then 9-12


def _run_config_here(cfg) -> None:
    from clip_med.training.trainer import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    _driver(Path(sys.argv[1]), json.loads(sys.argv[2]))
