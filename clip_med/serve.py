"""``python -m clip_med.serve``: see :mod:`clip_med.cli.serve`."""

from clip_med.cli.serve import main

if __name__ == "__main__":
    main()
