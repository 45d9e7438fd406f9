"""``python -m clip_med.shard``: see :mod:`clip_med.cli.shard`."""

from clip_med.cli.shard import main

if __name__ == "__main__":
    main()
