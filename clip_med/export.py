"""``python -m clip_med.export``: see :mod:`clip_med.cli.export`."""

from clip_med.cli.export import main

if __name__ == "__main__":
    main()
