"""``python -m clip_med.serve checkpoint=<ckpt> [index=<folder>] [+heads.<name>=<file>]``: the HTTP service.

The page is at ``http://127.0.0.1:8000/``. Another ``host=`` needs an access token
(``CLIP_MED_SERVE_TOKEN=<secret>`` or ``auth.token=<secret>``); without one it refuses to start.
uvicorn's access log is off: clip_med's own (``clip_med.inference.access``) leaves out query strings.
"""

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
    # uvicorn's access log would record query strings (search texts); clip_med.inference.auth logs without them
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level, access_log=False)


if __name__ == "__main__":
    main()
