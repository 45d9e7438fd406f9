"""``python -m clip_med.embed checkpoint=<ckpt> shards=<pattern> out=<folder>`` (also under torchrun)."""

from __future__ import annotations

from omegaconf import DictConfig

from clip_med.cli.common import command, register_command
from clip_med.cli.config import setup_logging, to_object
from clip_med.inference.commands import EmbedConfig, run_embed

register_command("embed", EmbedConfig)


@command("embed")
def main(cfg: DictConfig) -> None:
    setup_logging()
    config: EmbedConfig = to_object(cfg)
    result = run_embed(config)
    if result:
        print(f"{result['count']} embeddings ({result['dim']}-d) from {len(result['shards'])} shard(s) in "
              f"{config.out}" + (f"; read errors {result['read_errors']}" if result["read_errors"] else ""))


if __name__ == "__main__":
    main()
