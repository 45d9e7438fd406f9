"""``python -m clip_med.embed``: see :mod:`clip_med.cli.embed`."""

from clip_med.cli.embed import main

if __name__ == "__main__":
    main()
