"""The one way clip_med fills a text template (training texts, captions, zero-shot prompts).

Templates come from configs, the command line and HTTP requests, so they are filled by a
restricted substitution, never by ``str.format``: only ``{name}`` fields (letters, digits and
``_``; ``{}`` is the positional field of zero-shot prompts, the class name), no format specs
(``{x:>99999999}`` allocates whatever width it asks for), no conversions (``!r``), no attribute
or index lookups (``{x.__class__}``, ``{x[0]}``). ``{{`` and ``}}`` are literal braces. A
template that breaks a rule is refused with a message naming the problem; the filled text is
bounded by ``max_chars``.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Optional

from clip_med.core.errors import UnknownName

POSITIONAL = ""  # the name of the ``{}`` field
MAX_TEMPLATE_CHARS = 1000
MAX_FILLED_CHARS = 100_000
_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


class TemplateError(ValueError):
    """A template that is not a plain ``{name}`` template."""


def template_fields(template: str) -> list[str]:
    """The field names of ``template`` in order (``""`` for ``{}``); refuses anything but ``{name}`` fields."""
    if len(template) > MAX_TEMPLATE_CHARS:
        raise TemplateError(f"a template of {len(template)} characters is longer than the {MAX_TEMPLATE_CHARS} "
                            "allowed: shorten it")
    fields = []
    for match in _TOKEN.finditer(template):
        token = match.group(0)
        if token in ("{{", "}}"):
            continue
        name = match.group(1)
        if name is None:
            raise TemplateError(f"template {_shown(template)} has an unmatched {token!r} at character "
                                f"{match.start()}: write {token * 2} for a literal brace")
        if name and not _FIELD.fullmatch(name):
            raise TemplateError(f"template {_shown(template)} has the field {{{_shown(name, 40)}}}: only plain "
                                "{name} fields (letters, digits, _) are allowed, without format specs (:...), "
                                "conversions (!r), attributes or indexes")
        fields.append(name)
    return fields


def check_template(template: str, allowed: Optional[Collection[str]] = None) -> list[str]:
    """:func:`template_fields`, also refusing a field that is not in ``allowed`` (when given)."""
    fields = template_fields(template)
    if allowed is not None:
        unknown = sorted({name or "{}" for name in fields if name not in allowed})
        if unknown:
            names = sorted(name or "{}" for name in allowed)
            raise UnknownName(f"template {_shown(template)} uses unknown field(s) {unknown}; available: {names}")
    return fields


def fill_template(template: str, fields: Mapping[str, object], max_chars: int = MAX_FILLED_CHARS) -> str:
    """``template`` with each ``{name}`` replaced by ``str(fields[name])`` (``{}`` by ``fields[""]``)."""
    check_template(template, fields.keys())

    def replace(match: re.Match) -> str:
        token = match.group(0)
        if token == "{{":
            return "{"
        if token == "}}":
            return "}"
        return str(fields[match.group(1)])

    filled = _TOKEN.sub(replace, template)
    if len(filled) > max_chars:
        raise TemplateError(f"template {_shown(template)} filled in gives {len(filled)} characters, more than "
                            f"the {max_chars} allowed")
    return filled


def _shown(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
