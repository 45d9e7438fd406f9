"""``python -m clip_med.benchmark suite=<name> models=[<checkpoint|local-dir:export|hf-hub:name|arch@tag>,...]``.

Scores every model on every data set of the suite (zero-shot, linear probe, k-shot probes,
retrieval where the set has captions) and writes one CLIP_benchmark JSON per cell, results.csv,
results.md (the models side by side) and results.png into the run folder (default
``runs/benchmark/<suite>``; a rerun there skips the cells already written). See
:mod:`clip_med.inference.benchmark`.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from clip_med.cli.common import command, register_command
from clip_med.cli.config import setup_logging, to_object
from clip_med.eval.suite import SuiteConfig
from clip_med.inference.benchmark import BenchmarkConfig, BenchmarkRun, run_benchmark

register_command("benchmark", BenchmarkConfig)
ConfigStore.instance().store(group="suite", name="suite_schema", node=SuiteConfig)


def summary_text(run: BenchmarkRun) -> str:
    """The Markdown summary table (up to the first per-family table), the problems and where the files are."""
    text = run.paths["md"].read_text(encoding="utf-8")
    start = text.find("## Summary")
    end = text.find("\n## ", start + 1)
    lines = [text[start:end].strip() if start >= 0 else ""]
    lines += [f"not evaluated: {where}: {why}" for where, why in run.problems.items()]
    lines.append(f"{run.computed} cells scored, {run.reused} already there, {run.failed} without a result")
    lines.append(f"results: {run.paths['md']} ({run.paths['csv'].name}, {run.paths['plot'].name}, "
                 f"{run.out / 'results'}/<model>/<cell>.json)")
    return "\n".join(lines)


@command("benchmark")
def main(cfg: DictConfig) -> None:
    setup_logging()
    config: BenchmarkConfig = to_object(cfg)
    config.out = config.out or HydraConfig.get().runtime.output_dir
    print(summary_text(run_benchmark(config)))


if __name__ == "__main__":
    main()
