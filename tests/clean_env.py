"""A clean environment made from this one: only jaxprm's declared requirements, nothing else.

``pip install -e .`` on a fresh machine installs ``install_requires`` and their own requirements,
nothing more. The test environment has much more (torch, and what torch pulls in, e.g. jinja2),
which can hide a missing requirement. ``clean_site(dir)`` rebuilds a fresh install from the files
already here: every distribution in the requirement closure of jaxprm is linked, file by file (from
its RECORD), into ``dir``; ``python -S`` with ``PYTHONPATH=dir:repo`` then sees exactly those
packages (and their metadata), as a fresh virtualenv would.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import re
import sys
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_requirements() -> list[Requirement]:
    """``install_requires`` of setup.py, read without running setuptools."""
    import ast

    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            return [Requirement(s) for s in ast.literal_eval(node.value)]
    raise AssertionError("setup.py has no install_requires")


def requirement_closure(roots: list[Requirement]) -> dict[str, md.Distribution]:
    """Installed distributions reachable from ``roots`` (markers evaluated, no extras)."""
    env = default_environment()
    out: dict[str, md.Distribution] = {}
    todo = [(r, frozenset(r.extras)) for r in roots]
    while todo:
        req, extras = todo.pop()
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError as e:
            raise AssertionError(f"requirement {req} is not installed here") from e
        key = _norm(dist.metadata["Name"])
        seen = key in out
        out[key] = dist
        for s in dist.requires or ():
            sub = Requirement(s)
            if sub.marker is not None and not any(sub.marker.evaluate({**env, "extra": e}) for e in (extras or {""})):
                continue
            if not seen or extras:
                todo.append((sub, frozenset(sub.extras)))
    return out


def clean_site(target: Path) -> dict[str, md.Distribution]:
    """Link every file of jaxprm's requirement closure into ``target``; returns the closure."""
    dists = requirement_closure(declared_requirements())
    for dist in dists.values():
        base = Path(dist.locate_file(""))
        for rel in dist.files or ():
            src = base / rel
            parts = Path(rel).parts
            if parts and parts[0] == ".." or not src.exists() or src.suffix == ".pth":
                continue
            dst = target / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                os.symlink(src.resolve(), dst)
    return dists


def clean_env(site: Path) -> dict[str, str]:
    """Environment for ``python -S`` that sees only ``site`` and the repository."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO)])
    env["PYTHONNOUSERSITE"] = "1"
    return env


def python_command(*args: str) -> list[str]:
    return [sys.executable, "-S", *args]
