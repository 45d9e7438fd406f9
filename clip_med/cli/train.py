"""``python -m clip_med.train [exp=<experiment>] [key=value ...]``: shard, train, evaluate."""

from __future__ import annotations

import logging

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from clip_med.cli.common import command
from clip_med.cli.config import register_schemas, setup_logging, to_object
from clip_med.training.trainer import train

log = logging.getLogger("clip_med.train")

register_schemas()


@command("train")
def main(cfg: DictConfig) -> None:
    setup_logging()
    config = to_object(cfg)
    config.run_dir = config.run_dir or HydraConfig.get().runtime.output_dir
    report = train(config)
    if report:
        log.info("done: report in %s/report.md", config.run_dir)


if __name__ == "__main__":
    main()
