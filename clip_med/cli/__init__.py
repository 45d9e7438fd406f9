"""The command line: Hydra glue and one module per command (library code never imports Hydra)."""
