"""The suite's summary: a long CSV of every metric, a Markdown table with the models side by side, a plot.

Each table row is one cell's *main* number (``acc1``, ``lp_acc1``, ``auroc`` for a multi-label
set, ``mean_recall`` for retrieval). The summary averages them per task family (zero-shot,
linear probe, each k-shot, retrieval) and per family and modality, over the data sets where
every model has a number, so that the models are compared on the same sets.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from clip_med.core.io import atomic_write, write_text_atomic  # noqa: E402

CSV_COLUMNS = ["model", "model_name", "pretrained", "dataset", "set", "modality", "family", "task", "fewshot_k",
               "metric", "value", "main"]


def family_order(family: str) -> tuple[int, int]:
    if family == "zero-shot":
        return 0, 0
    if family == "linear probe":
        return 1, 0
    shots = re.fullmatch(r"(\d+)-shot", family)
    return (2, int(shots.group(1))) if shots else (3, 0)


def main_value(record: dict[str, Any]) -> float | None:
    value = record.get("metrics", {}).get(record["clip_med"]["main_metric"])
    return float(value) if isinstance(value, int | float) and not math.isnan(value) else None


def csv_rows(records: Sequence[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for record in records:
        info = record["clip_med"]
        for metric, value in record.get("metrics", {}).items():
            if isinstance(value, list | dict):
                continue
            rows.append([info["model_label"], record["model"], record["pretrained"], record["dataset"], info["set"],
                         info["modality"], info["family"], record["task"], record.get("fewshot_k", ""), metric,
                         "" if value is None else value, metric == info["main_metric"]])
    return rows


def _fmt(value: float | None, best: bool = False) -> str:
    if value is None:
        return "–"
    text = f"{value:.3f}"
    return f"**{text}**" if best else text


def _row(cells: list[float | None]) -> list[str]:
    known = [value for value in cells if value is not None]
    best = max(known) if len(known) > 1 else None
    return [_fmt(value, best is not None and value == best) for value in cells]


def table_by_family(records: Sequence[dict[str, Any]], models: list[str]) -> dict[str, list[list[Any]]]:
    """family -> rows ``[dataset, modality, metric, value per model]``."""
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for record in records:
        info = record["clip_med"]
        entry = cells.setdefault((info["family"], record["dataset"]), {"modality": info["modality"],
                                                                        "metric": info["main_metric"], "values": {}})
        entry["values"][info["model_label"]] = main_value(record)
    families: dict[str, list[list[Any]]] = {}
    for (family, dataset), entry in sorted(cells.items(), key=lambda item: (family_order(item[0][0]), item[0][1])):
        families.setdefault(family, []).append([dataset, entry["modality"], entry["metric"],
                                                *(entry["values"].get(model) for model in models)])
    return families


def summary(families: dict[str, list[list[Any]]], models: list[str]) -> list[list[Any]]:
    """Rows ``[family, modality, data sets, mean per model]``: per family over all modalities, then per modality,
    each over the data sets where every model has a number."""
    rows = []
    for family, table in families.items():
        complete = [row for row in table if all(value is not None for value in row[3:])]
        groups = {"all": complete}
        for row in complete:
            groups.setdefault(row[1], []).append(row)
        for modality, members in groups.items():
            if not members or (modality != "all" and len(groups) == 2):
                continue  # no complete data set; or one modality only, the same as "all"
            means = [float(np.mean([row[3 + index] for row in members])) for index in range(len(models))]
            rows.append([family, modality, len(members), *means])
    return rows


def render_markdown(suite: str, records: Sequence[dict[str, Any]], models: list[str], pretrained: dict[str, str],
                    problems: dict[str, str]) -> str:
    families = table_by_family(records, models)
    header = "| " + " | ".join(models) + " |"
    rule = "|---" * len(models) + "|"
    lines = [f"# Benchmark suite `{suite}`", "", "Models:", ""]
    lines += [f"- `{model}`: `{pretrained.get(model, model)}`" for model in models]
    lines += ["", "## Summary", "", "Mean of each data set's main number (accuracy; mean AUROC for multi-label sets; "
              "mean recall@k for retrieval), over the data sets where every model has one.", "",
              "| family | modality | data sets " + header, "|---|---|---" + rule]
    lines += [f"| {family} | {modality} | {count} | " + " | ".join(_row(list(means))) + " |"
              for family, modality, count, *means in summary(families, models)]
    for family, table in families.items():
        lines += ["", f"## {family}", "", "| data set | modality | metric " + header, "|---|---|---" + rule]
        lines += [f"| {dataset} | {modality} | {metric} | " + " | ".join(_row(list(values))) + " |"
                  for dataset, modality, metric, *values in table]
    if problems:
        lines += ["", "## Not evaluated", ""] + [f"- {where}: {why}" for where, why in problems.items()]
    lines += ["", "![summary](results.png)"]
    return "\n".join(lines) + "\n"


def plot_summary(rows: list[list[Any]], models: list[str], path: Path) -> None:
    """Two panels of grouped bars: the mean per family, and per modality (all families)."""
    families = [row for row in rows if row[1] == "all"]
    modalities: dict[str, list[list[float]]] = {}
    for row in rows:
        if row[1] != "all" and row[0] != "retrieval":
            modalities.setdefault(row[1], []).append(row[3:])
    classification = [row[3:] for row in families if row[0] != "retrieval"]
    if not modalities and classification:  # one modality only: its means are the families'
        modalities = {"all": classification}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), squeeze=False)
    panels = [(axes[0][0], [row[0] for row in families], [row[3:] for row in families], "mean per task family"),
              (axes[0][1], list(modalities), [list(np.mean(values, axis=0)) for values in modalities.values()],
               "mean per modality (classification)")]
    width = 0.8 / max(1, len(models))
    for ax, names, values, title in panels:
        positions = np.arange(len(names))
        for index, model in enumerate(models):
            heights = [row[index] if row[index] is not None else 0.0 for row in values]
            ax.bar(positions + index * width, heights, width, label=model)
        ax.set_xticks(positions + width * (len(models) - 1) / 2, names, rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_title(title)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    with atomic_write(path, "path") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def write_summary(out: Path, suite: str, records: Sequence[dict[str, Any]], models: list[str],
                  pretrained: dict[str, str], problems: dict[str, str]) -> dict[str, Path]:
    """``results.csv``, ``results.md`` and ``results.png`` in ``out``."""
    paths = {"csv": out / "results.csv", "md": out / "results.md", "plot": out / "results.png"}
    with atomic_write(paths["csv"], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(csv_rows(records))
    write_text_atomic(paths["md"], render_markdown(suite, records, models, pretrained, problems))
    plot_summary(summary(table_by_family(records, models), models), models, paths["plot"])
    return paths
