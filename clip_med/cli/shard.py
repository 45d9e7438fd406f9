"""``python -m clip_med.shard source=<name> source.root=<path> out=shards/<name>``: write shards.

Reads any registered source (``conf/source/<name>.yaml``), writes its webdataset shards and one
``<split>.manifest.json`` per split, and prints what was written and skipped. Re-running on an
unchanged source does nothing; re-running after an interruption finishes the job.

The heavy imports (the writer imports webdataset, which imports torch) happen inside the
functions: the writer's worker processes are started with "spawn" and import this module again
as their ``__main__``, and they only need Pillow and numpy.
"""

from __future__ import annotations

from omegaconf import DictConfig

from clip_med.cli.common import command


def register() -> None:
    from hydra.core.config_store import ConfigStore

    from clip_med.cli.config import register_schemas, schema_node
    from clip_med.data.shardset import ShardCommandConfig

    ConfigStore.instance().store(name="shard_schema", node=schema_node(ShardCommandConfig))
    register_schemas()


@command("shard", register=register)
def main(cfg: DictConfig) -> None:
    from clip_med.cli.config import setup_logging, to_object
    from clip_med.data.shardset import describe, shard_source

    setup_logging()
    print(describe(shard_source(to_object(cfg))))


if __name__ == "__main__":
    main()
