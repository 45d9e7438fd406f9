"""Writing an evaluation report: report.json, report.md and one confusion-matrix PNG per task."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402

from clip_med.core.io import atomic_write, write_json_atomic, write_text_atomic  # noqa: E402


def write_report(report: dict[str, Any], out_dir: str | Path, stem: str = "report") -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    for method in ("zero_shot", "linear_probe"):
        for task, metrics in report.get(method, {}).items():
            path = out_dir / f"confusion_{method}_{task}.png"
            plot_confusion(metrics, f"{method.replace('_', ' ')}: {task} ({report.get('split', '')})", path)
            paths[f"confusion_{method}_{task}"] = path
    write_json_atomic(paths["json"], report)
    write_text_atomic(paths["md"], render_markdown(report))
    return paths


def plot_confusion(metrics: dict[str, Any], title: str, path: Path) -> None:
    matrix = np.asarray(metrics["confusion_matrix"])
    size = max(4.0, 0.9 * len(metrics["labels"]) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(matrix, display_labels=metrics["labels"]).plot(ax=ax, colorbar=False,
                                                                           xticks_rotation=45)
    ax.set_title(f"{title}\naccuracy {metrics['accuracy']:.3f}")
    fig.tight_layout()
    with atomic_write(path, "path") as tmp:
        fig.savefig(tmp, dpi=100, format="png")  # the temporary's name does not end in .png
    plt.close(fig)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def classification_table(report: dict[str, Any]) -> list[str]:
    lines = ["| method | task | n | accuracy | balanced acc. | macro-F1 | AUROC |", "|---|---|---|---|---|---|---|"]
    for method in ("zero_shot", "linear_probe"):
        for task, m in report.get(method, {}).items():
            lines.append(f"| {method} | {task} | {m['n']} | {_fmt(m['accuracy'])} | {_fmt(m['balanced_accuracy'])} "
                         f"| {_fmt(m['macro_f1'])} | {_fmt(m['auroc'])} |")
    return lines


def case_level_table(report: dict[str, Any]) -> list[str]:
    lines = ["| method | task | cases (mixed) | case accuracy | balanced | image accuracy, case-pooled "
             "| image accuracy |", "|---|---|---|---|---|---|---|"]
    for method, tasks in report["case_level"].items():
        for task, m in tasks.items():
            single = report.get(method, {}).get(task, {}).get("accuracy")
            lines.append(f"| {method} | {task} | {m['cases']} ({m['mixed_cases']}) | {_fmt(m['accuracy'])} | "
                         f"{_fmt(m['balanced_accuracy'])} | {_fmt(m['image_accuracy'])} | {_fmt(single)} |")
    return lines


def retrieval_table(retrieval: dict[str, Any]) -> list[str]:
    ks = [key for key in retrieval["image_to_text"] if key.startswith("R@")]
    lines = ["| direction | " + " | ".join(ks) + " | median rank |", "|---" * (len(ks) + 2) + "|"]
    for direction in ("image_to_text", "text_to_image"):
        r = retrieval[direction]
        lines.append(f"| {direction} | " + " | ".join(_fmt(r[k]) for k in ks) + f" | {_fmt(r['median_rank'])} |")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Evaluation on split `{report.get('split', '?')}`", ""]
    for key in ("source", "checkpoint", "step", "n_images"):
        if key in report:
            lines.append(f"- {key}: `{report[key]}`")
    lines.append("")
    lines += ["## Classification", "", *classification_table(report)]
    for method in ("zero_shot", "linear_probe"):
        for task, m in report.get(method, {}).items():
            lines += ["", f"### {method} / {task}: per class", "", "| label | precision | recall | F1 | support |",
                      "|---|---|---|---|---|"]
            for label, c in m["per_class"].items():
                lines.append(f"| {label} | {_fmt(c['precision'])} | {_fmt(c['recall'])} | {_fmt(c['f1'])} "
                             f"| {c['support']} |")
            lines += ["", f"![confusion matrix](confusion_{method}_{task}.png)"]
    if report.get("case_level"):
        lines += ["", "## Case level (each case's image embeddings pooled)", "", *case_level_table(report)]
    retrieval = report.get("retrieval")
    if retrieval:
        lines += ["", f"## Retrieval ({retrieval['n']} pairs)", "", *retrieval_table(retrieval)]
    return "\n".join(lines) + "\n"


def render_summary(report: dict[str, Any]) -> str:
    """The headline tables (classification totals and retrieval), for a terminal."""
    lines = [f"split {report.get('split', '?')} of {report.get('source', '?')}: {report.get('n_images', '?')} images",
             *classification_table(report)]
    if report.get("retrieval"):
        lines += ["", *retrieval_table(report["retrieval"])]
    return "\n".join(lines)


def load_report(path: str | Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)
