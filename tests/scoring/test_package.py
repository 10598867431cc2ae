"""jaxprm.scoring is the one home of the PRM API: the names users import from jaxprm, jaxprm.search and
the old jaxprm.search.scorer are the same objects, and scoring/ does not import the layers above it."""
import ast
import importlib
from pathlib import Path

import pytest

import jaxprm

PACKAGE = Path(jaxprm.__file__).parent
ABOVE = ("jaxprm.search", "jaxprm.eval", "jaxprm.synth", "jaxprm.serve", "jaxprm.reproduce")


@pytest.mark.parametrize("name", ["PRM", "Scorer", "load_prm"])
def test_public_names_are_one_object(name):
    import jaxprm.scoring
    import jaxprm.search
    import jaxprm.search.scorer

    real = getattr(jaxprm.scoring, name)
    assert getattr(jaxprm, name) is real
    assert getattr(jaxprm.search, name) is real
    assert getattr(jaxprm.search.scorer, name) is real
    assert real.__module__.startswith("jaxprm.scoring.")


def test_old_module_reexports_everything():
    import jaxprm.scoring
    import jaxprm.search.scorer as old

    for name in jaxprm.scoring.__all__:
        assert getattr(old, name) is getattr(jaxprm.scoring, name), name
    assert sorted(old.__all__) == jaxprm.scoring.__all__
    # what benchmarks and tests reach for, private or not
    assert old._resolve_dtype is importlib.import_module("jaxprm.scoring.prm")._resolve_dtype
    assert old.IncrementalScorer._from_split is jaxprm.scoring.IncrementalScorer._from_split


def test_old_module_defines_nothing():
    """search/ holds search strategies only: the old scorer module is its docstring and imports."""
    tree = ast.parse((PACKAGE / "search" / "scorer.py").read_text())
    for node in tree.body[1:]:  # after the docstring
        assert isinstance(node, (ast.ImportFrom, ast.Import)), ast.dump(node)[:80]


def _imports(path: Path) -> set[str]:
    pkg = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                base = f"{parent}.{base}" if base else parent
                out |= {f"{base}.{a.name}" for a in node.names}  # ``from . import x``: x may be a module
            out.add(base)
    return out


def test_scoring_does_not_import_the_layers_above():
    files = sorted((PACKAGE / "scoring").rglob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "device.py", "prm.py"}
    for f in files:
        bad = sorted(m for m in _imports(f) if m.startswith(ABOVE))
        assert not bad, f"{f.relative_to(PACKAGE.parent)} imports {bad}"
