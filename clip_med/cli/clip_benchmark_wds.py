"""``python -m clip_med.cli.clip_benchmark_wds``: write a shard split in CLIP_benchmark's webdataset layout
(``write ...``), or run CLIP_benchmark's own command line with the NumPy 2 fix (``clip_benchmark eval ...``).
The work is :mod:`clip_med.eval.clip_benchmark_wds`; this module only parses arguments and prints."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Optional

from clip_med.eval.clip_benchmark_wds import patch_clip_benchmark_accuracy, write_clip_benchmark_wds


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["clip_benchmark"]:  # CLIP_benchmark's own command line, with the NumPy 2 fix
        patch_clip_benchmark_accuracy()
        from clip_benchmark.cli import main as clip_benchmark_main

        sys.argv = ["clip_benchmark", *argv[1:]]
        clip_benchmark_main()
        return
    parser = argparse.ArgumentParser(prog="python -m clip_med.cli.clip_benchmark_wds",
                                     description="Write a clip_med shard split in CLIP_benchmark's webdataset "
                                                 "layout (or: `clip_benchmark eval ...` to run CLIP_benchmark).")
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="a shard set's split, for one task, in CLIP_benchmark's layout")
    write.add_argument("--shards", required=True, help="the shard folder (holding <split>.manifest.json)")
    write.add_argument("--split", required=True)
    write.add_argument("--task", required=True, help="modality, anatomy, ...")
    write.add_argument("--out", required=True)
    write.add_argument("--name", help="the dataset name (clip_benchmark --dataset wds/<name>); default: out's name")
    write.add_argument("--train-split", help="take the classes from this split (as evaluate does)")
    write.add_argument("--template", action="append", help="a prompt template (repeatable); default: the task's")
    write.add_argument("--no-synonyms", action="store_true", help="only each label's display name in the prompts")
    write.add_argument("--cb-split", default="test", help="the split folder CLIP_benchmark reads (--split)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    info = write_clip_benchmark_wds(args.shards, args.split, args.task, args.out, name=args.name,
                                    train_split=args.train_split, templates=args.template,
                                    synonyms=not args.no_synonyms, cb_split=args.cb_split)
    print(json.dumps(info, indent=1, ensure_ascii=False))






if __name__ == "__main__":
    main()
