"""``python -m clip_med.classify checkpoint=<ckpt> images=<file|folder|glob|list> [task=...] [labels=[...]]``.

A folder of DICOM files is classified per series (one pooled prediction per SeriesInstanceUID, the
slices' beside it); ``series=true`` pools any inputs as one series or case, ``series=false`` never pools.
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from clip_med.cli.common import command, register_command
from clip_med.cli.config import setup_logging, to_object
from clip_med.inference.commands import ClassifyConfig, expand_images, format_classification, run_classify
from clip_med.inference.series import format_series, run_classify_series, series_inputs

register_command("classify", ClassifyConfig)


@command("classify")
def main(cfg: DictConfig) -> None:
    setup_logging()
    config: ClassifyConfig = to_object(cfg)
    groups = series_inputs(config.images, expand_images(config.images), config.series)
    if groups is not None:  # a series or case: one pooled prediction each, the per-image ones beside it
        print(format_series(run_classify_series(config, groups), config.top, config.format))
        return
    result = run_classify(config)
    print(format_classification(result, config.top, config.format))
    if not len(result):
        sys.exit(1)


if __name__ == "__main__":
    main()
