"""``python -m clip_med.probe checkpoint=<ckpt> data=<source> [out=<folder>]``: fit and save probe heads."""

from __future__ import annotations

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from clip_med.cli.common import command, register_command
from clip_med.cli.config import setup_logging, to_object
from clip_med.eval.report import classification_table
from clip_med.inference.probing import ProbeConfig, probe_checkpoint

register_command("probe", ProbeConfig)


@command("probe")
def main(cfg: DictConfig) -> None:
    setup_logging()
    config: ProbeConfig = to_object(cfg)
    config.out = config.out or HydraConfig.get().runtime.output_dir
    report = probe_checkpoint(config)
    print(f"linear probes fitted on {report['train_split']}, scored on {report['split']} of {report['source']}:")
    print("\n".join(classification_table(report)))
    for task, path in report["heads"].items():
        print(f"{task} head: {path}")


if __name__ == "__main__":
    main()
