"""The architecture as folders: each layer of lqlib imports only from the layers before it."""

from __future__ import annotations

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "lqlib"
#: Folders in layer order. A module may import lqlib modules of its own folder, of an earlier folder,
#: and the shared top-level modules; the CLI and the package root sit above everything.
LAYERS = ["core", "coding", "kernels", "cache", "evaluation", "ddt", "alloc", "book"]
SHARED = {"errors", "store"}  # imported by every layer, import no other lqlib module
TOP = {"__init__", "__main__", "cli"}
SEED = {"e8": "core"}  # the seed's compatibility module sits with the core


def _module(path: Path) -> list[str]:
    return list(path.relative_to(LIBRARY).with_suffix("").parts)


def _lqlib_imports(path: Path) -> set[str]:
    """First component below ``lqlib`` of every lqlib module ``path`` imports (any depth, any scope)."""
    here = _module(path)
    package = here[:-1] if here[-1] != "__init__" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                parts = base + (node.module.split(".") if node.module else [])
                if not parts:  # "from . import x" at the root
                    parts = [alias.name for alias in node.names]
                    found.update(parts)
                    continue
                found.add(parts[0])
            elif node.module and node.module.split(".")[0] == "lqlib":
                parts = node.module.split(".")[1:] or [alias.name for alias in node.names]
                found.add(parts[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "lqlib" and len(parts) > 1:
                    found.add(parts[1])
    return found


def _layer(name: str) -> int | None:
    name = SEED.get(name, name)
    return LAYERS.index(name) if name in LAYERS else None


def test_every_module_lives_in_a_layer_folder():
    loose = {p.stem for p in LIBRARY.glob("*.py")}
    assert loose <= SHARED | TOP | set(SEED), f"modules outside the layer folders: {loose - SHARED - TOP - set(SEED)}"
    folders = {p.name for p in LIBRARY.iterdir() if p.is_dir() and not p.name.startswith("__")}
    assert folders == set(LAYERS)
    for folder in LAYERS:
        assert (LIBRARY / folder / "__init__.py").is_file(), folder


def test_layers_import_only_from_earlier_layers():
    violations = []
    for path in sorted(LIBRARY.rglob("*.py")):
        parts = _module(path)
        own = parts[0] if len(parts) > 1 else parts[0]
        if own in TOP:
            continue
        imports = _lqlib_imports(path)
        if own in SHARED:
            if imports - {"errors"}:
                violations.append(f"{path.relative_to(LIBRARY)} (shared) imports {sorted(imports)}")
            continue
        mine = _layer(own)
        for name in imports - SHARED:
            theirs = _layer(name)
            if theirs is None or theirs > mine:
                violations.append(f"{path.relative_to(LIBRARY)} imports lqlib.{name}")
    assert not violations, "\n".join(violations)


def test_the_layering_check_sees_a_violation(tmp_path):
    """The checker itself: an import from a later layer, written relatively or absolutely, is found."""
    bad = LIBRARY / "core" / "lattices.py"
    assert _lqlib_imports(bad) <= {"errors"}
    probe = LIBRARY / "core" / "_layering_probe.py"
    probe.write_text("from ..cache.compressed import CompressedKVCache\nimport lqlib.book.tables\n")
    try:
        assert _lqlib_imports(probe) == {"cache", "book"}
    finally:
        probe.unlink()
