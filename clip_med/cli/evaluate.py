"""``python -m clip_med.evaluate checkpoint=<ckpt> data=<source> data.root=<path> data.split=<split>``."""

from __future__ import annotations

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from clip_med.cli.common import command, register_command
from clip_med.cli.config import setup_logging, to_object
from clip_med.eval.report import render_summary
from clip_med.inference.evaluation import EvaluateConfig, evaluate_checkpoint

register_command("evaluate", EvaluateConfig)


@command("evaluate")
def main(cfg: DictConfig) -> None:
    setup_logging()
    config: EvaluateConfig = to_object(cfg)
    config.out = config.out or HydraConfig.get().runtime.output_dir
    report = evaluate_checkpoint(config)
    print(render_summary(report))
    print(f"report: {config.out}/report.md")


if __name__ == "__main__":
    main()
