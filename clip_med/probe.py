"""``python -m clip_med.probe``: see :mod:`clip_med.cli.probe`."""

from clip_med.cli.probe import main

if __name__ == "__main__":
    main()
