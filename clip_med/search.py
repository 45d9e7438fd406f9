"""``python -m clip_med.search``: see :mod:`clip_med.cli.search`."""

from clip_med.cli.search import main

if __name__ == "__main__":
    main()
