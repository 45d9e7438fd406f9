"""``python -m clip_med.train``: see :mod:`clip_med.cli.train`."""

from clip_med.cli.train import main

if __name__ == "__main__":
    main()
