"""Caption cleaning and the training-text template."""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from typing import Any

from clip_med.core.errors import UnknownName
from clip_med.data.record import SkipReason

_SPACES = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:)])")
_EMPTY_BRACKETS = re.compile(r"\(\s*\)")
_REPEATED_PUNCT = re.compile(r"([,;:.])(?:\s*[,;:.])+")
_LEADING_PUNCT = re.compile(r"^[\s,;:.]+")


def clean_caption(text: str | None) -> str:
    """Collapse whitespace (captions often hold tabs, newlines and double spaces)."""
    return _SPACES.sub(" ", text or "").strip()


def decode_caption(raw: bytes) -> tuple[str, str | None]:
    """Decode caption bytes strictly: returns (text, problem) where problem is a SkipReason."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return "", f"{SkipReason.CAPTION_NOT_UTF8}: byte {exc.start}: {exc.reason}"
    return clean_caption(text), None


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def render_text(template: str, fields: Mapping[str, Any]) -> str:
    """Fill ``template`` (``str.format`` syntax) and tidy what empty fields leave behind.

    Missing or empty fields become empty strings, then dangling separators are removed, so
    ``"{modality} image, {plane} plane. {caption}"`` with no plane still reads cleanly.
    """
    unknown = [name for name in template_fields(template) if name not in fields]
    if unknown:
        raise UnknownName(f"text template uses unknown field(s) {unknown}; available: {sorted(fields)}")
    values = {key: clean_caption("" if value is None else str(value)) for key, value in fields.items()}
    text = template.format(**values)
    text = _EMPTY_BRACKETS.sub("", text)
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = _REPEATED_PUNCT.sub(lambda match: match.group(0)[-1], text)
    text = _LEADING_PUNCT.sub("", text)
    return _SPACES.sub(" ", text).strip()
