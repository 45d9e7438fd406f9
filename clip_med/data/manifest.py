"""The per-split manifest written next to the shards: what was written, what was skipped, why."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clip_med.core.io import write_json_atomic  # noqa: F401  (re-exported: written through clip_med.core.io)
from clip_med.core.names import check_name, check_shard_file

MANIFEST_SUFFIX = ".manifest.json"


@dataclass
class ShardInfo:
    name: str
    count: int
    bytes: int


@dataclass
class SkippedItem:
    id: str
    image: str
    reason: str
    detail: str = ""


@dataclass
class Manifest:
    split: str
    source: str
    fingerprint: str
    options: dict[str, Any]
    input_count: int
    shards: list[ShardInfo] = field(default_factory=list)
    skipped: list[SkippedItem] = field(default_factory=list)
    label_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    # Where the written samples' labels came from, per task: metadata, caption, description,
    # folder, config or none (see clip_med.data.record.Record.label_origin).
    label_origins: dict[str, dict[str, int]] = field(default_factory=dict)
    complete: bool = True
    # What the source kept, dropped, cleaned and hashed of its inputs (DICOM: clip_med.data.dicom_deid.summary).
    deidentification: dict[str, Any] = field(default_factory=dict)

    @property
    def written_count(self) -> int:
        return sum(shard.count for shard in self.shards)

    def skipped_by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(item.reason for item in self.skipped).items()))

    def label_coverage(self) -> dict[str, float]:
        written = self.written_count
        return {
            task: round(1.0 - counts.get("unknown", 0) / written, 4) if written else 0.0
            for task, counts in self.label_counts.items()
        }

    def labels(self, task: str) -> list[str]:
        """Labels of ``task`` present in this split, most frequent first, ``unknown`` excluded."""
        counts = self.label_counts.get(task, {})
        return [label for label, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if label != "unknown"]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["written_count"] = self.written_count
        data["skipped_count"] = len(self.skipped)
        data["skipped_by_reason"] = self.skipped_by_reason()
        data["label_coverage"] = self.label_coverage()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        return cls(
            split=data["split"],
            source=data["source"],
            fingerprint=data["fingerprint"],
            options=data["options"],
            input_count=data["input_count"],
            shards=[ShardInfo(**shard) for shard in data["shards"]],
            skipped=[SkippedItem(**item) for item in data["skipped"]],
            label_counts=data["label_counts"],
            label_origins=data.get("label_origins", {}),
            complete=data.get("complete", True),
            deidentification=data.get("deidentification", {}),
        )


def manifest_path(out_dir: str | Path, split: str) -> Path:
    return Path(out_dir) / f"{check_name(split, 'split name')}{MANIFEST_SUFFIX}"


def save_manifest(manifest: Manifest, out_dir: str | Path) -> Path:
    path = manifest_path(out_dir, manifest.split)
    write_json_atomic(path, manifest.to_dict())
    return path


class ManifestError(ValueError):
    """A manifest that cannot be read or is not a clip_med manifest; the message names the file."""


def parse_manifest(data: str | bytes, source: str | Path) -> Manifest:
    """The one manifest parser: JSON text (or UTF-8 bytes) read from ``source`` -> :class:`Manifest`.

    Raises :class:`ManifestError` naming ``source`` for anything that is not a clip_med manifest.
    """
    try:
        manifest = Manifest.from_dict(json.loads(data))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ManifestError(f"{source} is not a clip_med manifest ({type(exc).__name__}: {exc})") from None
    # Its split and shard names become file names, URLs and pipe: commands: names only, never paths.
    try:
        check_name(manifest.split, f"the split of {source}")
        check_name(manifest.source, f"the source name of {source}")
        for shard in manifest.shards:
            check_shard_file(shard.name, manifest.split, str(source))
    except ValueError as exc:
        raise ManifestError(str(exc)) from None
    return manifest


def read_manifest(path: str | Path) -> Manifest:
    """A local manifest file; :class:`ManifestError` (naming the file) when it is unreadable or malformed."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"cannot read the manifest {path} ({exc})") from None
    return parse_manifest(data, path)


def load_manifest(out_dir: str | Path, split: str) -> Manifest | None:
    """The manifest of ``split`` in ``out_dir``; None when there is none, :class:`ManifestError` when it is bad."""
    path = manifest_path(out_dir, split)
    if not path.is_file():
        return None
    return read_manifest(path)


def manifest_is_current(manifest: Manifest | None, out_dir: str | Path, fingerprint: str) -> bool:
    """True when the manifest matches ``fingerprint`` and every shard it lists is on disk intact."""
    if manifest is None or not manifest.complete or manifest.fingerprint != fingerprint:
        return False
    for shard in manifest.shards:
        path = Path(out_dir) / shard.name
        if not path.is_file() or path.stat().st_size != shard.bytes:
            return False
    return True
