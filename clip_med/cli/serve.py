"""``python -m clip_med.serve checkpoint=<ckpt> [index=<folder>] [+heads.<name>=<file>]``: the HTTP service."""

from __future__ import annotations

import uvicorn
from omegaconf import DictConfig

from clip_med.cli.common import command, register_command
from clip_med.cli.config import setup_logging, to_object
from clip_med.inference.service import ServeConfig, build_service

register_command("serve", ServeConfig)


@command("serve")
def main(cfg: DictConfig) -> None:
    setup_logging()
    config: ServeConfig = to_object(cfg)
    app = build_service(config)
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level)


if __name__ == "__main__":
    main()
