"""``python -m clip_med.benchmark``: see :mod:`clip_med.cli.benchmark`."""

from clip_med.cli.benchmark import main

if __name__ == "__main__":
    main()
