"""``python -m clip_med.classify checkpoint=<ckpt> images=<file|folder|glob|list> [task=...] [labels=[...]]``."""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from clip_med.cli.common import command, register_command
from clip_med.cli.config import setup_logging, to_object
from clip_med.inference.commands import ClassifyConfig, format_classification, run_classify

register_command("classify", ClassifyConfig)


@command("classify")
def main(cfg: DictConfig) -> None:
    setup_logging()
    config: ClassifyConfig = to_object(cfg)
    result = run_classify(config)
    print(format_classification(result, config.top, config.format))
    if not len(result):
        sys.exit(1)


if __name__ == "__main__":
    main()
