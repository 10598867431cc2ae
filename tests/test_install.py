"""What ``pip install -e .`` gives a new user is enough to run every entry point, without torch.

The test environment has more than a fresh install (torch and what it pulls in, jinja2 among them),
which once hid a missing requirement: every record of the README's main command was skipped with
``ImportError: apply_chat_template requires jinja2`` and the run still exited 0. These tests run the
entry points in an environment holding only the requirement closure of ``install_requires``
(``tests/clean_env.py``).
"""
import ast
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.clean_env import REPO, _norm, clean_env, clean_site, declared_requirements, python_command


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level third-party modules imported anywhere in jaxprm/ and configs/ -> files."""
    out: dict[str, set[str]] = {}
    for root in ("jaxprm", "configs"):
        for p in (REPO / root).rglob("*.py"):
            for node in ast.walk(ast.parse(p.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in ("jaxprm", "configs"):
                        out.setdefault(top, set()).add(str(p.relative_to(REPO)))
    return out


def test_every_import_is_a_declared_requirement():
    """Each third-party module the package imports comes from a distribution named in install_requires
    (not only pulled in by another one, which may drop it)."""
    declared = {_norm(r.name) for r in declared_requirements()}
    owners = md.packages_distributions()
    missing = {}
    for mod, files in sorted(_third_party_imports().items()):
        dists = {_norm(d) for d in owners.get(mod, [])}
        if not dists & declared:
            missing[mod] = (sorted(dists), sorted(files)[:3])
    assert not missing, f"imported but not in setup.py's install_requires: {missing}"


def test_declared_requirements_cover_transformers_chat_templates():
    """transformers renders chat templates with jinja2 but does not require it; the prompt needs it."""
    assert "jinja2" in {_norm(r.name) for r in declared_requirements()}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    d = tmp_path_factory.mktemp("clean_site")
    dists = clean_site(d)
    assert "torch" not in dists and "jax" in dists
    return d


def _run(site, cwd, *args, timeout=900):
    r = subprocess.run(python_command(*args), cwd=cwd, env=clean_env(site), capture_output=True, text=True,
                       timeout=timeout)
    return r, r.stdout + r.stderr


def test_clean_environment_has_no_torch(site, tmp_path):
    r, out = _run(site, tmp_path, "-c", "import jax, transformers, jinja2; import torch")
    assert r.returncode != 0 and "No module named 'torch'" in out, out[-2000:]


@pytest.mark.slow
def test_readme_main_command_in_a_fresh_install(site, tmp_path):
    """The README's first command (shortened by config overrides) trains, skips no record, exports, and
    the README's eval command scores the export, with only the declared requirements installed."""
    work = tmp_path / "tiny"
    r, out = _run(site, tmp_path, "-m", "jaxprm.train", f"--config={REPO / 'configs' / 'tiny.py'}",
                  f"--config.workdir={work}", "--config.data.synthetic_train=64", "--config.data.synthetic_eval=16",
                  "--config.train.max_steps=3", "--config.train.progress=False")
    assert r.returncode == 0, out[-4000:]
    final = dict(kv.split("=", 1) for kv in re.search(r"^final: (.*)$", out, re.M).group(1).split())
    assert int(final["step"]) == 3 and int(final["skipped_records"]) == 0, final
    assert "skipped record" not in out, out[-4000:]
    spec = json.loads((work / "export" / "prm.json").read_text())
    assert spec["history"] == "placeholder" and spec["task"]["image_size"] == [56, 56]

    r, out = _run(site, tmp_path, "-m", "jaxprm.eval", "synthetic", "--prm", str(work / "export"), "--n", "4",
                  "--no-progress", "--out", str(tmp_path / "eval"))
    assert r.returncode == 0, out[-4000:]
    res = json.loads((tmp_path / "eval" / "synthetic_results.json").read_text())
    assert res["task"]["image_size"] == [56, 56] and res["overall"]["n_steps"] > 0
    assert (tmp_path / "eval" / "synthetic_f1.png").stat().st_size > 0


@pytest.mark.slow
def test_synth_command_in_a_fresh_install(site, tmp_path):
    """``python -m jaxprm.synth`` (offline, scripted) with only the declared requirements."""
    r, out = _run(site, tmp_path, "-m", "jaxprm.synth", "--config", str(REPO / "configs" / "synth_tiny.py"),
                  "--config.num_questions=4", "--out", str(tmp_path / "synth"))
    assert r.returncode == 0, out[-4000:]
    assert any((tmp_path / "synth").iterdir())
