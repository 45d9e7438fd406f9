"""``python -m clip_med.search index=<folder> text="..." | image=<path> [k=10]``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from clip_med.cli.common import register_command, user_errors
from clip_med.cli.config import setup_logging, to_object
from clip_med.inference.commands import SearchConfig, format_search, run_search

register_command("search", SearchConfig)


@hydra.main(version_base="1.3", config_path="pkg://clip_med.conf", config_name="search")
@user_errors
def main(cfg: DictConfig) -> None:
    setup_logging()
    config: SearchConfig = to_object(cfg)
    print(format_search(run_search(config), config.format))


if __name__ == "__main__":
    main()
