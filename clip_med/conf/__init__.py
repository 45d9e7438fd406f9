"""The Hydra configuration shipped with the package (searched as ``pkg://clip_med.conf``)."""
