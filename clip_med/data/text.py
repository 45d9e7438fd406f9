"""Caption cleaning and the training-text template."""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from typing import Any

from clip_med.core import templates
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
    """The named fields of ``template`` (not ``{}``), by :func:`clip_med.core.templates.template_fields`:
    a template with format specs, conversions, attributes or indexes is refused (``TemplateError``)."""
    return [name for name in templates.template_fields(template) if name]


def render_text(template: str, fields: Mapping[str, Any]) -> str:
    """Fill ``template`` (plain ``{name}`` fields, :mod:`clip_med.core.templates`) and tidy what empty
    fields leave behind.

    Missing or empty fields become empty strings, then dangling separators are removed, so
    ``"{modality} image, {plane} plane. {caption}"`` with no plane still reads cleanly. A field the
    template names but ``fields`` lacks is an :class:`~clip_med.core.errors.UnknownName`.
    """
    templates.check_template(template, fields.keys())
    values = {key: clean_caption("" if value is None else str(value)) for key, value in fields.items()}
    # No cap on the filled length here: without format specs it is at most the template's (capped) length
    # plus its fields' values, and captions are bounded by their readers.
    text = templates.fill_template(template, values, max_chars=sys.maxsize)
    text = _EMPTY_BRACKETS.sub("", text)
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = _REPEATED_PUNCT.sub(lambda match: match.group(0)[-1], text)
    text = _LEADING_PUNCT.sub("", text)
    return _SPACES.sub(" ", text).strip()
