"""Coverage and hand-checked precision of the caption label rules on ROCO's radiology captions.

    python benchmarks/caption_label_check.py                  # coverage + precision of the judged samples
    python benchmarks/caption_label_check.py --write-sample --tag c --seed 11 --size 100   # a new sample

Coverage: the share of captions of ``data/<split>/radiology/captions.txt`` that get a modality
(and an anatomy) label from :mod:`clip_med.labels.caption_rules`. Precision: a random sample of
``--size`` captions (``--seed``) is written to ``benchmarks/caption_label_sample_<tag>.csv``
with the rules' labels (ROCO ids only: the captions stay in the ROCO files, which are not
redistributed here, and are looked up by id); a person reads each caption and records, in
``benchmarks/caption_label_judgements_<tag>.csv``, whether each given label is right (``y``/``n``;
empty where the rules said ``unknown``) and, for unknowns, the label they would have given
(to estimate what the rules miss). The labels are recomputed with the current rules each time;
a judged sample whose labels no longer match its judgements is reported as stale.
Judging follows the taxonomy's display names: the pelvis is ``urogenital``, the breast ``thorax``,
limbs and joints ``spine_msk``; a label is right when it names the modality or region of the
*image* the caption describes.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clip_med.labels.caption_rules import anatomy_from_text, modality_from_text  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_ROCO = HERE.parents[1] / "shared" / "data" / "roco"


def sample_path(tag: str) -> Path:
    return HERE / f"caption_label_sample_{tag}.csv"


def judgements_path(tag: str) -> Path:
    return HERE / f"caption_label_judgements_{tag}.csv"


def read_captions(root: Path, split: str) -> list[tuple[str, str]]:
    path = root / "data" / split / "radiology" / "captions.txt"
    rows = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            roco_id, _, caption = line.rstrip("\n").partition("\t")
            rows.append((roco_id.strip(), " ".join(caption.split())))
    return rows


def coverage(rows: list[tuple[str, str]]) -> dict[str, Counter]:
    counts = {"modality": Counter(), "anatomy": Counter()}
    for _, caption in rows:
        counts["modality"][modality_from_text(caption).label] += 1
        counts["anatomy"][anatomy_from_text(caption).label] += 1
    return counts


def write_sample(rows: list[tuple[str, str]], size: int, seed: int, tag: str) -> None:
    sample = random.Random(seed).sample(rows, size)
    with open(sample_path(tag), "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["n", "seed", "roco_id", "modality", "anatomy"])
        for index, (roco_id, caption) in enumerate(sample, 1):
            writer.writerow([index, seed, roco_id, modality_from_text(caption).label,
                             anatomy_from_text(caption).label])
    print(f"wrote {size} captions (seed {seed}) to {sample_path(tag)}")


def precision(tag: str, captions: dict[str, str]) -> None:
    if not judgements_path(tag).is_file():
        print(f"\nsample {tag}: no judgements yet ({judgements_path(tag)})")
        return
    with open(sample_path(tag), encoding="utf-8") as handle:
        sample = {row["roco_id"]: row for row in csv.DictReader(handle)}
    with open(judgements_path(tag), encoding="utf-8") as handle:
        judged = list(csv.DictReader(handle))
    stale = [row["roco_id"] for row in judged for task in ("modality", "anatomy")
             if row[f"rules_{task}"] != {"modality": modality_from_text, "anatomy": anatomy_from_text}[task](
                 captions[row["roco_id"]]).label]
    print(f"\nhand check, sample {tag}: {len(judged)} captions (seed {next(iter(sample.values()))['seed']})"
          + (f"; STALE: the rules now label {sorted(set(stale))} differently, judge them again" if stale else ""))
    print(f"{'task':<10} {'labelled':>9} {'correct':>8} {'precision':>10} {'unknown':>8} {'missed':>7}")
    for task in ("modality", "anatomy"):
        given = [row for row in judged if row[f"rules_{task}"] != "unknown"]
        right = sum(row[f"{task}_ok"].strip().lower() == "y" for row in given)
        unknown = [row for row in judged if row[f"rules_{task}"] == "unknown"]
        missed = sum(bool(row[f"{task}_should_be"].strip()) for row in unknown)
        print(f"{task:<10} {len(given):>9} {right:>8} {right / max(len(given), 1):>10.1%} {len(unknown):>8} "
              f"{missed:>7}")
        wrong = [row["roco_id"] for row in given if row[f"{task}_ok"].strip().lower() != "y"]
        if wrong:
            print(f"  wrong {task}: {', '.join(wrong)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--roco", type=Path, default=DEFAULT_ROCO)
    parser.add_argument("--split", default="validation")
    parser.add_argument("--size", type=int, default=150)
    parser.add_argument("--seed", type=int, default=20240603)
    parser.add_argument("--write-sample", action="store_true")
    parser.add_argument("--tag", default=None, help="sample name (a, b, ...); default: every judged sample")
    args = parser.parse_args()
    rows = read_captions(args.roco, args.split)
    counts = coverage(rows)
    print(f"ROCO {args.split}/radiology: {len(rows)} captions")
    for task, counter in counts.items():
        labelled = len(rows) - counter["unknown"]
        spread = ", ".join(f"{label} {count}" for label, count in counter.most_common() if label != "unknown")
        print(f"  {task:<9} labelled {labelled} ({labelled / len(rows):.1%}): {spread}")
    if args.write_sample:
        write_sample(rows, args.size, args.seed, args.tag or "new")
    tags = [args.tag] if args.tag else sorted(path.stem.rsplit("_", 1)[1] for path in
                                              HERE.glob("caption_label_judgements_*.csv"))
    captions = dict(rows)
    for tag in tags:
        precision(tag, captions)


if __name__ == "__main__":
    main()
