"""``python -m clip_med.classify``: see :mod:`clip_med.cli.classify`."""

from clip_med.cli.classify import main

if __name__ == "__main__":
    main()
