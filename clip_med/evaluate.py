"""``python -m clip_med.evaluate``: see :mod:`clip_med.cli.evaluate`."""

from clip_med.cli.evaluate import main

if __name__ == "__main__":
    main()
