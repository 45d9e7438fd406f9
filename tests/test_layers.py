"""The package's layers import downwards only (README, "Layout"): a module never imports from a
layer above its own, at module level or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import clip_med

PACKAGE = Path(clip_med.__file__).parent
LAYERS = ["core", "labels", "data", "modeling", "eval", "training", "inference", "cli"]
TOP = len(LAYERS)  # clip_med/__init__.py and the `python -m clip_med.<command>` shims


def layer_of(module: str) -> int:
    parts = module.split(".")
    if parts[0] != "clip_med":
        raise ValueError(module)
    if len(parts) == 1 or parts[1] not in LAYERS:
        return TOP
    return LAYERS.index(parts[1])


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            # `from clip_med import taxonomy` names a module through its parent package
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] == "clip_med"]


def _is_module(name: str) -> bool:
    child = name.split(".")[1]
    return (PACKAGE / f"{child}.py").is_file() or (PACKAGE / child).is_dir()


def upward_imports() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        own = layer_of(name)
        for line, target in imported_modules(path):
            if target == "clip_med" or layer_of(target) <= own:
                continue
            if target.count(".") == 1 and not _is_module(target):
                continue  # `from clip_med import __version__`: an attribute of the package, not a module
            where = LAYERS[own] if own < TOP else "top"
            problems.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {name} ({where}) imports {target}")
    return problems


def test_every_layer_exists():
    for layer in LAYERS:
        assert (PACKAGE / layer / "__init__.py").is_file(), layer


def test_no_module_imports_from_a_layer_above_its_own():
    assert upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The check itself: a function-level import from a higher layer is found."""
    assert layer_of("clip_med.data.loader") < layer_of("clip_med.inference.model")
    probe = PACKAGE / "data" / "_layer_probe_tmp.py"
    probe.write_text("def f():\n    from clip_med.inference.model import load\n    return load\n", encoding="utf-8")
    try:
        assert any("_layer_probe_tmp" in line for line in upward_imports())
    finally:
        probe.unlink()


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_modules_are_importable(layer):
    import importlib

    importlib.import_module(f"clip_med.{layer}")
