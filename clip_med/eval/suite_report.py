"""The suite's summary: a long CSV of every metric, a Markdown table with the models side by side, a plot.

The tables show each cell's *headline* metrics (:func:`clip_med.eval.suite.headline_metrics`):
top-1 accuracy and mean per-class recall for a single-label data set, the mean AUROC over the
findings for a multi-label one, the mean recall@k for retrieval, each row naming its metric. The
summary averages one metric at a time — never an accuracy with an AUROC — per task family
(zero-shot, linear probe, each k-shot, retrieval) and per family and modality, over the data sets
where every model has a number, so that the models are compared on the same sets. The CSV holds
every metric of every cell, and one row per cell without a result (its ``error``).
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from clip_med.core.io import atomic_write, write_text_atomic  # noqa: E402
from clip_med.eval.suite import METRIC_NAMES, headline_metrics, metric_name  # noqa: E402

CSV_COLUMNS = ["model", "model_name", "pretrained", "dataset", "set", "modality", "family", "task", "kind",
               "fewshot_k", "metric", "metric_name", "value", "main", "headline", "error"]
METRIC_ORDER = list(METRIC_NAMES.values())
EXPLANATION = (
    "Means are taken one metric at a time, never across metrics: single-label data sets give zero-shot (or probe) "
    "top-1 accuracy and mean per-class recall (balanced accuracy), multi-label data sets the mean AUROC over their "
    "findings, retrieval the mean of image→text and text→image recall@k. Each mean is over the data sets where "
    "every model has a number (the count is shown).")
FEW_SHOT_NOTE = (
    "k training images per class, drawn with seeds 0..n-1: mean ± standard deviation over the seeds. C is chosen by "
    "cross-validation on the k-shot sample itself, which needs two images of every class: at k = 1 it is fixed at "
    "1.0 (each cell's JSON lists C and how it was chosen per seed).")


def family_order(family: str) -> tuple[int, int]:
    if family == "zero-shot":
        return 0, 0
    if family == "linear probe":
        return 1, 0
    shots = re.fullmatch(r"(\d+)-shot", family)
    return (2, int(shots.group(1))) if shots else (3, 0)


def _number(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)
    return float(value) if ok else None


def record_headlines(record: dict[str, Any]) -> list[str]:
    info = record["clip_med"]
    return headline_metrics(info["kind"], info["method"])


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, list | dict) else value


def csv_rows(records: Sequence[dict[str, Any]]) -> list[list[Any]]:
    """Every metric of every cell; a cell without a result gives one row: its main metric, empty, and the error."""
    rows = []
    for record in records:
        info = record["clip_med"]
        headlines = record_headlines(record)
        metrics = record.get("metrics") or {info["main_metric"]: None}
        for metric, value in metrics.items():
            rows.append([info["model_label"], record["model"], record["pretrained"], record["dataset"], info["set"],
                         info["modality"], info["family"], record["task"], info["kind"], record.get("fewshot_k", ""),
                         metric, metric_name(metric) if metric in headlines else "", _csv_value(value),
                         metric == info["main_metric"], metric in headlines, info.get("error", "")])
    return rows


@dataclass
class TableRow:
    """One (data set, headline metric) of a family: a value (and, for k-shot, a standard deviation) per model."""

    dataset: str
    modality: str
    metric: str  # the metric's key in the cells (lp_acc1)
    values: list[float | None]
    stds: list[float | None]

    @property
    def name(self) -> str:
        return metric_name(self.metric)

    @property
    def complete(self) -> bool:
        return all(value is not None for value in self.values)


def table_by_family(records: Sequence[dict[str, Any]], models: list[str]) -> dict[str, list[TableRow]]:
    """family -> its rows, in family order, then by data set and metric."""
    rows: dict[tuple[str, str, str], TableRow] = {}
    for record in records:
        info, metrics = record["clip_med"], record.get("metrics") or {}
        column = models.index(info["model_label"])
        for metric in record_headlines(record):
            row = rows.setdefault((info["family"], record["dataset"], metric), TableRow(
                record["dataset"], info["modality"], metric, [None] * len(models), [None] * len(models)))
            row.values[column] = _number(metrics.get(metric))
            row.stds[column] = _number(metrics.get(f"{metric}_std"))
    families: dict[str, list[TableRow]] = {}
    for (family, _, _), row in sorted(rows.items(), key=lambda item: (
            family_order(item[0][0]), item[0][1], METRIC_ORDER.index(item[1].name))):
        families.setdefault(family, []).append(row)
    return families


@dataclass
class SummaryRow:
    family: str
    metric: str  # the metric's name (top-1 accuracy)
    modality: str  # "all" or one modality
    count: int  # data sets averaged
    means: list[float]  # one per model


def summary(families: dict[str, list[TableRow]], models: list[str]) -> list[SummaryRow]:
    """Per family and metric: the mean over all modalities, then per modality (where there are several), each
    over the data sets where every model has a number."""
    rows = []
    for family, table in families.items():
        for name in METRIC_ORDER:
            complete = [row for row in table if row.name == name and row.complete]
            groups: dict[str, list[TableRow]] = {"all": complete}
            for row in complete:
                groups.setdefault(row.modality, []).append(row)
            for modality, members in groups.items():
                if not members or (modality != "all" and len(groups) == 2):
                    continue  # no complete data set; or one modality only, the same as "all"
                means = [float(np.mean([row.values[index] for row in members])) for index in range(len(models))]
                rows.append(SummaryRow(family, name, modality, len(members), means))
    return rows


def _fmt(value: float | None, std: float | None = None, best: bool = False) -> str:
    if value is None:
        return "–"
    text = f"{value:.3f}" + (f" ± {std:.3f}" if std is not None else "")
    return f"**{text}**" if best else text


def _cells(values: Sequence[float | None], stds: Sequence[float | None] | None = None) -> str:
    known = [value for value in values if value is not None]
    best = max(known) if len(set(known)) > 1 else None  # no bold for one number, or for a tie of all
    stds = stds or [None] * len(values)
    return " | ".join(_fmt(value, std, best is not None and value == best) for value, std in zip(values, stds))


def _header(first: list[str], models: list[str]) -> list[str]:
    names = first + models
    return ["| " + " | ".join(names) + " |", "|---" * len(names) + "|"]


def _notes(records: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    notes: dict[str, list[str]] = {}
    for record in records:
        for note in record["clip_med"].get("notes", []):
            found = notes.setdefault(record["clip_med"]["set"], [])
            if note not in found:
                found.append(note)
    return notes


def _closing_sections(records: Sequence[dict[str, Any]], problems: dict[str, str]) -> list[str]:
    lines = []
    notes = _notes(records)
    if notes:
        lines += ["", "## Notes", ""] + [f"- {name}: {note}" for name, found in notes.items() for note in found]
    failed = [record for record in records if record["clip_med"].get("error")]
    if failed:
        lines += ["", "## Cells without a result", ""]
        lines += [f"- {r['clip_med']['model_label']} / {r['dataset']} / {r['clip_med']['family']}: "
                  f"{r['clip_med']['error']}" for r in failed]
    if problems:
        lines += ["", "## Not evaluated", ""] + [f"- {where}: {why}" for where, why in problems.items()]
    return lines


def render_markdown(suite: str, records: Sequence[dict[str, Any]], models: list[str], pretrained: dict[str, str],
                    problems: dict[str, str]) -> str:
    families = table_by_family(records, models)
    lines = [f"# Benchmark suite `{suite}`", "", "Models:", ""]
    lines += [f"- `{model}`: `{pretrained.get(model, model)}`" for model in models]
    lines += ["", "## Summary", "", EXPLANATION, "", *_header(["family", "metric", "modality", "data sets"], models)]
    lines += [f"| {row.family} | {row.metric} | {row.modality} | {row.count} | {_cells(row.means)} |"
              for row in summary(families, models)]
    for family, table in families.items():
        lines += ["", f"## {family}", ""]
        if family_order(family)[0] == 2:  # k-shot
            lines += [FEW_SHOT_NOTE, ""]
        lines += _header(["data set", "modality", "metric"], models)
        lines += [f"| {row.dataset} | {row.modality} | {row.name} | {_cells(row.values, row.stds)} |" for row in table]
    lines += _closing_sections(records, problems)
    lines += ["", "![summary](results.png)"]
    return "\n".join(lines) + "\n"


def plot_summary(rows: list[SummaryRow], models: list[str], path: Path) -> None:
    """One panel per metric: the mean per task family (all modalities), a bar per model."""
    metrics = [name for name in METRIC_ORDER if any(row.metric == name and row.modality == "all" for row in rows)]
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(4 + 3.5 * len(metrics), 4.5), squeeze=False)
    width = 0.8 / max(1, len(models))
    for ax, name in zip(axes[0], metrics):
        chosen = [row for row in rows if row.metric == name and row.modality == "all"]
        positions = np.arange(len(chosen))
        for index, model in enumerate(models):
            ax.bar(positions + index * width, [row.means[index] for row in chosen], width, label=model)
        ax.set_xticks(positions + width * (len(models) - 1) / 2, [f"{row.family} ({row.count})" for row in chosen],
                      rotation=30, ha="right")
        ax.set_xlim(-0.5, max(len(chosen), 3) - 0.5)  # a lone family keeps bars of the usual width
        ax.set_ylim(0, 1)
        ax.set_title(name)
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
