"""``python -m clip_med.search index=<folder> text="..." | image=<path> [k=10]``."""

from __future__ import annotations

from omegaconf import DictConfig

from clip_med.cli.common import command, register_command
from clip_med.cli.config import setup_logging, to_object
from clip_med.inference.commands import SearchConfig, format_search, run_search

register_command("search", SearchConfig)


@command("search")
def main(cfg: DictConfig) -> None:
    setup_logging()
    config: SearchConfig = to_object(cfg)
    print(format_search(run_search(config), config.format))


if __name__ == "__main__":
    main()
