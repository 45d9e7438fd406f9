"""``python -m clip_med.med_mat``: see :mod:`clip_med.cli.med_mat`."""

from clip_med.cli.med_mat import main

if __name__ == "__main__":
    main()
